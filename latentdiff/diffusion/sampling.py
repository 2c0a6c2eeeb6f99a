"""The one sampling loop that the models and every pipeline call: noise levels + starting noise -> final latent.

``denoise`` takes a denoiser D(x, sigma, **cond) -> x0, the decreasing noise levels and the unit-normal noise (or
``sample`` draws it), and:

1. starts at sigmas[0] in the variance-exploding space x = x_t / sqrt(alphas_cumprod): pure noise is scaled by
   sqrt(1 + sigma_max^2), the VE image of x_T ~ N(0, I) (``initial_noise_scale``); an image latent ``init``
   (img2img, SDEdit) is noised to ``init + sigma_max * noise``;
2. wraps D in classifier-free guidance when an unconditional branch is given, then in the optional per-step
   wrapper (``KnownRegion`` re-imposes inpainting's kept region);
3. runs the registered sampler, which draws its own noise from the same generator after the initial noise;
4. returns the variance-preserving latent at sigmas[-1], x / sqrt(1 + sigma_last^2): the clean estimate when the
   levels end at 0, the slightly noisy latent at alphas_cumprod[0] where DDIM/PLMS stop in CompVis and diffusers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from latentdiff.diffusion.guidance import CFGDenoiser
from latentdiff.diffusion.samplers import Callback, Denoiser, SamplerSpec, get_sampler

logger = logging.getLogger(__name__)


def initial_noise_scale(sigma_max: float, prior: str = "vp") -> float:
    """The standard deviation of the starting noise at ``sigma_max``.

    "vp": sqrt(1 + sigma_max^2), the VE image of x_T ~ N(0, I) (x = x_T / sqrt(alphas_cumprod)), which is how
    CompVis's DDPM/DDIM/PLMS start, and the exact marginal std at sigma_max of data with unit variance
    (sigma_data = 1, as the scalings assume). "ve": sigma_max, k-diffusion's choice (ignores the data's variance).
    For SD's sigma_max = 14.61 the two differ by 0.2%.
    """
    if prior == "vp":
        return math.sqrt(1 + sigma_max ** 2)
    if prior == "ve":
        return sigma_max
    raise ValueError(f"unknown prior {prior!r}; choose vp or ve")


def start_latent(noise: torch.Tensor, sigma_max: float, init: torch.Tensor | None = None,
                 prior: str = "vp") -> torch.Tensor:
    """The sampler's starting x at ``sigma_max``: scaled noise, or the latent ``init`` noised to that level."""
    if not math.isfinite(sigma_max):
        raise ValueError("sigmas[0] is infinite; sigma-space samplers need a finite starting sigma")
    if init is None:
        return noise * initial_noise_scale(sigma_max, prior)
    return init + sigma_max * noise


def guided(denoiser: Denoiser, cond: dict[str, Any] | None, uncond: dict[str, Any] | None,
           guidance_scale: float | torch.Tensor = 1.0, guidance_rescale: float = 0.0
           ) -> tuple[Denoiser, dict[str, Any]]:
    """(model, extra_args) for a sampler: D with ``cond`` alone, or classifier-free guidance against ``uncond``,
    rescaled by ``guidance_rescale`` (phi of CFG rescale, ``guidance.rescale_guided``; 0: off).

    A guidance scale of 1 gives the conditional model, so the unconditional half is not evaluated at all (and there
    is nothing to rescale, as in diffusers).
    """
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if uncond is None or (not isinstance(guidance_scale, torch.Tensor) and guidance_scale == 1):
        return denoiser, dict(cond or {})
    extra = {"cond": cond or {}, "uncond": uncond, "scale": guidance_scale}
    if guidance_rescale:
        extra["rescale"] = guidance_rescale
    return CFGDenoiser(denoiser), extra


class KnownRegion:
    """Inpainting with a model that does not see the mask: the region to keep is reset to the original's latent,
    noised to the current level with the initial noise, before every denoiser call after the first, and pasted
    back clean at the end (``paste``).

    diffusers' ``StableDiffusionInpaintPipeline`` (4-channel UNet) does the same after every scheduler step. With a
    binary latent mask and samplers whose updates act elementwise on x (all of ours), the two are equal: the region
    to repaint is updated from the same inputs, and the kept region is overwritten before anything reads it.
    """

    def __init__(self, known: torch.Tensor, noise: torch.Tensor, repaint: torch.Tensor, first_sigma: float) -> None:
        self.known, self.noise, self.repaint, self.first_sigma = known, noise, repaint, first_sigma

    def wrap(self, model: Denoiser) -> Denoiser:
        """``model`` with the kept region re-imposed on its input."""
        def reimposed(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
            level = sigma.reshape(-1)[0]
            if float(level) < self.first_sigma:
                known = self.known + level.to(x.dtype) * self.noise
                x = self.repaint * x + (1 - self.repaint) * known
            return model(x, sigma, **extra)
        return reimposed

    def paste(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampled latents inside the region to repaint, the original's outside it."""
        return (1 - self.repaint) * self.known + self.repaint * latents


def denoise(denoiser: Denoiser, sigmas: torch.Tensor, noise: torch.Tensor, *,
            sampler: str | SamplerSpec = "euler", init: torch.Tensor | None = None,
            extra_args: dict[str, Any] | None = None, uncond: dict[str, Any] | None = None,
            guidance_scale: float | torch.Tensor = 1.0, guidance_rescale: float = 0.0,
            step_wrapper: Callable[[Denoiser], Denoiser] | None = None, generator: torch.Generator | None = None,
            prior: str = "vp", callback: Callback | None = None, disable: bool | None = None,
            **sampler_options: Any) -> torch.Tensor:
    """Run ``sampler`` from ``noise`` (and ``init``) over ``sigmas``; the variance-preserving latent at sigmas[-1].

    ``extra_args`` is the conditioning D takes (its keyword arguments); with ``uncond`` and ``guidance_scale`` it
    is guided (``guided``), with CFG rescale ``guidance_rescale`` (pipelines pass it in their ``sampler_options``).
    ``step_wrapper`` wraps the (guided) denoiser, e.g. ``KnownRegion.wrap``. The sampler's noise comes from
    ``generator`` (see the module docstring).
    """
    spec = get_sampler(sampler)
    x = start_latent(noise, float(sigmas[0]), init, prior)
    model, extra = guided(denoiser, extra_args, uncond, guidance_scale, guidance_rescale)
    if step_wrapper is not None:
        model = step_wrapper(model)
    steps = len(sigmas) - 1
    logger.debug("%s: %d steps, %d model evaluations", spec.name, steps,
                 spec.model_evaluations(steps, ends_at_zero=float(sigmas[-1]) == 0))
    x = spec(model, x, sigmas, extra_args=extra, callback=callback, generator=generator, disable=disable,
             **sampler_options)
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


def sample(model: Denoiser, shape: tuple[int, ...] | torch.Size, sigmas: torch.Tensor,
           sampler: str | SamplerSpec = "euler", generator: torch.Generator | None = None,
           extra_args: dict | None = None, device: torch.device | str | None = None,
           dtype: torch.dtype = torch.float32, prior: str = "vp", callback: Callback | None = None,
           disable: bool | None = None, **options: Any) -> torch.Tensor:
    """Draw starting noise of ``shape`` in ``dtype`` and ``denoise`` it on ``device``; ``options`` go to
    ``denoise`` (``uncond``, ``guidance_scale``, ...) and on to the sampler.

    The noise comes from ``generator`` on its own device (create it on the CPU: a seed then gives the same
    sample on any device and thread count; without one, torch's global CPU generator is used).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    noise_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=noise_device, dtype=dtype).to(device)
    return denoise(model, sigmas, noise, sampler=sampler, extra_args=extra_args, generator=generator, prior=prior,
                   callback=callback, disable=disable, **options)


__all__ = ["KnownRegion", "denoise", "guided", "initial_noise_scale", "sample", "start_latent"]
