"""Sinusoidal timestep embeddings: how the denoiser is told which noise level it is looking at.

The layout is CompVis' ``timestep_embedding`` (cosines first, then sines), which Stable Diffusion's UNet
weights were trained with; swapping the halves would silently break every pretrained checkpoint.
"""

from __future__ import annotations

import math

import torch


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0,
                       repeat_only: bool = False) -> torch.Tensor:
    """Embed a 1-D batch of (possibly fractional) timesteps (N,) as an (N, dim) float32 tensor.

    Frequencies run geometrically from 1 down to ``1 / max_period``; the first ``dim // 2`` features are
    ``cos(t * f)`` and the next ``dim // 2`` are ``sin(t * f)``; an odd ``dim`` gets one trailing zero.
    ``repeat_only`` skips the sinusoids and repeats the raw timestep ``dim`` times (as CompVis allows).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor (N,), got shape {tuple(timesteps.shape)}")
    if dim < 1:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim).contiguous()
    half = dim // 2
    # Phases are computed in float32 whatever the model's dtype: t * f reaches ~1000 rad, where half
    # precision would lose the fractional part that the sines depend on.
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
