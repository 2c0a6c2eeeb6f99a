"""What every sampler shares: the denoiser and callback types, the sigmas' set-up, the reported denoiser call and
the generator's noise (conventions: ``latentdiff.diffusion.samplers``' module docstring).

Its own module so that the sampler modules (``samplers`` owns the registry, ``solvers`` holds the multistep solvers
it registers) import these from below and never from each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn on the generator's device then moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def setup(x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(sigmas on x's device, the per-sample ones that make sigma a batch, extra_args or {})."""
    # Sigmas stay in at least float32 even for a float16 x: small sigmas and their ratios need the precision.
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least two values")
    return sigmas, sigmas.new_ones(x.shape[0]), extra_args or {}


def report(callback: Callback | None, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
    """Step ``i``'s state to the callback, if any."""
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def evaluate(model: Denoiser, x: torch.Tensor, sigma: torch.Tensor, s_in: torch.Tensor, extra_args: dict,
             callback: Callback | None, i: int) -> torch.Tensor:
    """Step ``i``'s denoised estimate D(x, sigma), reported to the callback."""
    denoised = model(x, sigma * s_in, **extra_args)
    report(callback, i, x, sigma, denoised)
    return denoised


__all__ = ["Callback", "Denoiser", "evaluate", "noise_like", "report", "setup"]
