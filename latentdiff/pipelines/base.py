"""What every pipeline shares: the output, the generator, the initial noise, sampling through the one sampling core,
img2img's start and the inpainting loop.

A pipeline (``StableDiffusionPipeline``, ``LatentDiffusionPipeline``) says how to build its conditioning, its noise
levels (with ``strength`` a parameter of them) and its denoiser; ``PipelineBase`` turns them into latents with
``latentdiff.diffusion.sampling.denoise``. The generator is used in this order: what the pipeline draws before the
noise (diffusers' posterior samples of the encoded images), the initial noise, then the sampler's per-step noise,
all drawn in float32 on the generator's device (the CPU), so a seed gives the same image on any device, dtype and
thread count.
"""

from __future__ import annotations

import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from latentdiff.diffusion.deepcache import deep_cache
from latentdiff.diffusion.process import draw_noise
from latentdiff.diffusion.samplers import Callback, Denoiser, get_sampler
from latentdiff.diffusion.sampling import KnownRegion, denoise
from latentdiff.diffusion.tome import token_merging
from latentdiff.diffusion.unet import UNetModel
from latentdiff.nn.attention import attention_slicing
from latentdiff.pipelines.images import to_pil_images
from latentdiff.pipelines.variation import Variation

logger = logging.getLogger(__name__)

Generator = torch.Generator | int | None


@dataclass
class PipelineOutput:
    """What a pipeline call returns: images (N, C, H, W) in [0, 1] on the CPU (None when not decoded), and the
    final latents (times the model's scale factor, as diffusers' ``output_type="latent"`` gives them) on the CPU."""

    images: torch.Tensor | None
    latents: torch.Tensor

    def pil(self) -> list:
        """The images as PIL images."""
        if self.images is None:
            raise ValueError("the latents were not decoded (decode=False)")
        return to_pil_images(self.images)


@dataclass(frozen=True)
class SamplingOptions:
    """How one pipeline call samples, besides its conditioning: the sampler and its options (those of the sampling
    core too: ``{"guidance_rescale": 0.7}`` is CFG rescale, ``sampling.denoise``; ``{"deep_cache": 3}`` runs the
    UNet in full every third step and reuses its deep features in between, with ``"deep_cache_branch"`` (default
    0) the shallow blocks that still run, ``latentdiff.diffusion.deepcache``; ``{"tome": 0.5}`` merges half the
    tokens of the highest-resolution transformers around their self-attention, or a dict of ``token_merging``'s
    keyword arguments, ``latentdiff.diffusion.tome``), the generator, the
    progress callback and bar (None: tqdm's default), the starting noise's prior (``sampling.initial_noise_scale``)
    and the denoiser when it depends on the sampler (None: ``sampling_denoiser()``), and the variation mixed into the
    initial noise (``latentdiff.pipelines.variation``; None: none)."""

    sampler: str
    generator: torch.Generator
    sampler_options: dict[str, Any] | None = None
    callback: Callback | None = None
    progress: bool | None = None
    prior: str = "vp"
    denoiser: Denoiser | None = None
    variation: Variation | None = None


def as_generator(generator: Generator) -> torch.Generator:
    """A CPU generator: as given, seeded with an int, or (None) with a fresh random seed that is logged."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = secrets.randbits(63)
        logger.info("no seed given; using seed %d", generator)
    return torch.Generator("cpu").manual_seed(int(generator))


def prompt_list(prompt: str | Sequence[str]) -> list[str]:
    """One prompt or several as a non-empty list."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt: give a string or a non-empty list of strings")
    return prompts


def per_image(tensor: torch.Tensor, batch: int, images_per_prompt: int, what: str) -> torch.Tensor:
    """One input (image, mask, map) for all images, or one per prompt (repeated for that prompt's images)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    if tensor.shape[0] * images_per_prompt == batch:
        return tensor.repeat_interleave(images_per_prompt, 0)
    raise ValueError(f"{tensor.shape[0]} {what}s for {batch // images_per_prompt} prompts; give one {what}, "
                     "or one per prompt")


class PipelineBase(ABC):
    """Noise, sampling, img2img's start and the inpainting loop over a subclass's ``sampling_denoiser``."""

    device: torch.device
    attention_slice: int | None

    @abstractmethod
    def sampling_denoiser(self) -> Denoiser:
        """D(x, sigma, **cond) -> x0 over the pipeline's network."""

    def _sampling(self, sampler: str, steps: int, generator: Generator, sampler_options: dict[str, Any] | None,
                  callback: Callback | None, progress: bool | None,
                  variation: Variation | None = None) -> SamplingOptions:
        """A call's sampling options, checked (an unknown sampler, no steps), with its CPU generator."""
        get_sampler(sampler)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return SamplingOptions(sampler, as_generator(generator), sampler_options, callback, progress,
                               variation=variation)

    def _noise(self, latents: torch.Tensor | None, shape: tuple[int, ...], run: SamplingOptions) -> torch.Tensor:
        """The initial unit-normal noise: ``latents`` as given (checked), or drawn from the run's generator; with
        the run's variation mixed in."""
        if latents is None:
            noise = draw_noise(shape, run.generator, device=self.device)
        elif tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        else:
            noise = latents.to(self.device, torch.float32)
        return noise if run.variation is None else run.variation.apply(noise)

    def _denoise(self, sigmas: torch.Tensor, noise: torch.Tensor, cond: dict[str, torch.Tensor],
                 uncond: dict[str, torch.Tensor] | None, guidance_scale: float, run: SamplingOptions,
                 init: torch.Tensor | None = None, known: KnownRegion | None = None) -> torch.Tensor:
        """The latent at sigmas[-1] from ``noise`` (or ``init`` noised), guided against ``uncond`` when given."""
        options = dict(run.sampler_options or {})
        denoiser = run.denoiser or self.sampling_denoiser()
        caching = _deep_cached(denoiser, options.pop("deep_cache", None), options.pop("deep_cache_branch", 0))
        merging = _token_merged(denoiser, options.pop("tome", None))
        with attention_slicing(self.attention_slice), caching, merging:
            return denoise(denoiser, sigmas.to(self.device), noise,
                           sampler=run.sampler, init=init, prior=run.prior, extra_args=cond, uncond=uncond,
                           guidance_scale=guidance_scale,
                           step_wrapper=None if known is None else known.wrap, generator=run.generator,
                           callback=run.callback, disable=None if run.progress is None else not run.progress,
                           **options)

    def _inpaint_latents(self, sigmas: torch.Tensor, noise: torch.Tensor, image_latents: torch.Tensor | None,
                         repaint: torch.Tensor, reimpose: bool, cond: dict[str, torch.Tensor],
                         uncond: dict[str, torch.Tensor] | None, guidance_scale: float, run: SamplingOptions,
                         full_strength: bool) -> torch.Tensor:
        """Inpainting's loop: from noise (``full_strength``) or the image's latent noised to sigmas[0]; with
        ``reimpose`` (a model that does not see the mask) the kept region is re-imposed at every step and pasted
        back clean at the end (``KnownRegion``)."""
        init = None if full_strength else image_latents
        if not reimpose:
            return self._denoise(sigmas, noise, cond, uncond, guidance_scale, run, init=init)
        known = KnownRegion(image_latents, noise, repaint, float(sigmas[0]))
        return known.paste(self._denoise(sigmas, noise, cond, uncond, guidance_scale, run, init=init, known=known))

    @staticmethod
    def _keep_unmasked(images: torch.Tensor, masks: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The generated pixels where ``masks`` is 1 (repaint), the original ``pixels`` elsewhere."""
        return masks * images + (1 - masks) * pixels


def _unet_of(denoiser: Denoiser, option: str) -> UNetModel:
    """The UNet inside a denoiser, for a sampler option that works on it."""
    modules = denoiser.modules() if isinstance(denoiser, torch.nn.Module) else ()
    unet = next((m for m in modules if isinstance(m, UNetModel)), None)
    if unet is None:
        raise ValueError(f"{option} needs a UNet denoiser; this pipeline's is not one")
    return unet


def _deep_cached(denoiser: Denoiser, interval: int | None, branch: int) -> AbstractContextManager:
    """DeepCache around one sampling run when ``interval`` is set (None or 0: the exact model)."""
    if not interval:
        return nullcontext()
    return deep_cache(_unet_of(denoiser, "deep_cache"), interval, branch)


def _token_merged(denoiser: Denoiser, tome: float | dict[str, Any] | None) -> AbstractContextManager:
    """Token merging around one sampling run: ``tome`` a ratio (None or 0: the exact model) or a dict of
    ``token_merging``'s keyword arguments."""
    if isinstance(tome, dict):
        return token_merging(_unet_of(denoiser, "tome"), **tome)
    if tome is None or (isinstance(tome, (int, float)) and tome == 0):
        return nullcontext()
    return token_merging(_unet_of(denoiser, "tome"), ratio=tome)


__all__ = ["Generator", "PipelineBase", "PipelineOutput", "SamplingOptions", "as_generator", "per_image", "prompt_list"]
