"""Classifier-free guidance (Ho & Salimans 2022): a denoiser wrapper that extrapolates from unconditional to
conditional.

D_cfg(x, sigma) = D(x, sigma, uncond) + scale * (D(x, sigma, cond) - D(x, sigma, uncond)), evaluated with one
network call on a doubled batch, optionally rescaled (``rescale_guided``). Guidance sits between the samplers and
the denoiser and knows neither's internals: a sampler calls it as ``model(x, sigma, cond=..., uncond=..., scale=...)``
through ``extra_args``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from latentdiff.diffusion.denoiser import append_dims


def _batched(name: str, value: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"conditioning {name!r} must be a tensor batched along dim 0, got {type(value).__name__}")
    if value.shape[0] == n:
        return value
    if value.shape[0] == 1:  # one shared embedding (e.g. the empty prompt) serves the whole batch
        return value.expand(n, *value.shape[1:])
    raise ValueError(f"conditioning {name!r} has batch {value.shape[0]}, expected {n} (or 1)")


def _check_same_keys(cond: dict, uncond: dict) -> None:
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys; only in one of them: "
                         f"{sorted(set(cond) ^ set(uncond))}")


def concat_conditioning(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor],
                        n: int) -> dict[str, torch.Tensor]:
    """Concatenate two conditioning dicts with the same keys along the batch, each value batched to ``n``."""
    _check_same_keys(first, second)
    return {k: torch.cat([_batched(k, first[k], n), _batched(k, second[k], n)]) for k in first}


def rescale_guided(x: torch.Tensor, guided: torch.Tensor, conditional: torch.Tensor, rescale: float,
                   anchor: float | torch.Tensor = 1.0) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4) on
    x0 estimates: the guided prediction's per-sample standard deviation is brought back to the conditional one's,
    mixed with the plain guided prediction by ``rescale`` (phi; 0 leaves it unchanged, the paper uses 0.7).

    diffusers' ``rescale_noise_cfg`` acts on the noise prediction eps. Our denoiser returns
    D = x - sigma * eps (an eps-predicting network under the VE scalings), so eps = (x - D) / sigma and the ratio
    std(eps_cond) / std(eps_cfg) = std(x - D_cond) / std(x - D_cfg): sigma cancels. With
    factor = phi * ratio + (1 - phi), eps_out = factor * eps_cfg, hence D_out = x - factor * (x - D_cfg), which is
    diffusers' step exactly for epsilon models.

    diffusers rescales whatever the network predicts. Each prediction is, up to a factor that the ratio cancels,
    ``anchor * x - D``: eps (anchor 1, the default), v (anchor 1 / (1 + sigma^2): v = (x / (1 + sigma^2) - D) /
    (sigma / sqrt(1 + sigma^2)) in these scalings; ``parameterization_anchor``) and x0 (anchor 0), so
    D_out = anchor * x - factor * (anchor * x - D_cfg) is diffusers' step for each.
    """
    dims = list(range(1, x.ndim))
    pred_cfg, pred_cond = anchor * x - guided, anchor * x - conditional
    ratio = pred_cond.std(dim=dims, keepdim=True) / pred_cfg.std(dim=dims, keepdim=True)
    return anchor * x - (rescale * ratio + (1 - rescale)) * pred_cfg


def parameterization_anchor(parameterization: str, sigma: torch.Tensor | float, ndim: int) -> float | torch.Tensor:
    """``rescale_guided``'s anchor for a network predicting ``parameterization`` ("eps", "v", "x0") at ``sigma``."""
    if parameterization == "v":
        sigma = torch.as_tensor(sigma)
        return append_dims(1 / (1 + sigma ** 2), ndim) if sigma.ndim else 1 / (1 + float(sigma) ** 2)
    return 0.0 if parameterization == "x0" else 1.0


class CFGDenoiser(nn.Module):
    """Wraps a denoiser ``D(x, sigma, **cond)`` with classifier-free guidance."""

    def __init__(self, denoiser: nn.Module | Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: dict[str, torch.Tensor],
                uncond: dict[str, torch.Tensor], scale: float | torch.Tensor = 1.0,
                rescale: float = 0.0) -> torch.Tensor:
        """The guided x0 estimate. ``scale`` is a number or an (N,) tensor; 1 gives the conditional model.
        ``rescale`` (phi in [0, 1]) applies CFG rescale (``rescale_guided``) to the guided estimate."""
        n = x.shape[0]
        if not isinstance(scale, torch.Tensor) and scale == 1:
            # The unconditional half would be multiplied by 0: skip it (still validate the inputs).
            _check_same_keys(cond, uncond)
            return self.denoiser(x, sigma, **{k: _batched(k, v, n) for k, v in cond.items()})
        sigma_in = torch.cat([sigma, sigma]) if torch.is_tensor(sigma) and sigma.ndim == 1 else sigma
        both = self.denoiser(torch.cat([x, x]), sigma_in, **concat_conditioning(uncond, cond, n))
        d_uncond, d_cond = both.chunk(2)
        if isinstance(scale, torch.Tensor):
            scale = append_dims(scale.to(x.device, x.dtype), x.ndim)
        guided = d_uncond + scale * (d_cond - d_uncond)
        if not rescale:
            return guided
        anchor = parameterization_anchor(getattr(self.denoiser, "parameterization", "eps"), sigma, x.ndim)
        return rescale_guided(x, guided, d_cond, rescale, anchor)
