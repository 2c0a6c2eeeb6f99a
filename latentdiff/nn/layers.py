"""Convolutional building blocks of the CompVis first stage, with its parameter names.

Names (``norm1``, ``conv1``, ``nin_shortcut``, ``q``/``k``/``v``/``proj_out``) match the original Stable
Diffusion checkpoints so their weights load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.nn.attention import attention
from latentdiff.nn.onednn import Conv2d, Linear


def Normalize(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm as used throughout the CompVis autoencoder (eps 1e-6, affine)."""
    groups = min(num_groups, channels)
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} normalisation groups")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1 projected) skip; optional timestep embedding."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 temb_channels: int = 0, num_groups: int = 32) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels, num_groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels > 0:
            self.temb_proj = Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (the VAE's attention layer)."""

    def __init__(self, channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.norm = Normalize(channels, num_groups)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, c, h * w).transpose(1, 2)

        out = attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv after asymmetric (right/bottom) padding, or avg-pool."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # The original pads only right and bottom, then convolves without padding; keeping that
            # exact arithmetic is what makes Stable Diffusion's VAE weights reproduce its latents.
            self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour interpolation, then an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x
