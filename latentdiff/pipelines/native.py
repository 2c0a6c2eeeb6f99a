"""The tasks on our own latent diffusion models (run folders written by ``latentdiff train``): text-to-image,
image-to-image (SDEdit), inpainting, semantic synthesis (class map to image) and super-resolution.

A ``LatentDiffusionPipeline`` wraps one ``LatentDiffusion`` model and knows from its config which tasks it runs:

- any model: ``text_to_image`` (with a prompt when it has a text encoder), ``image_to_image``, ``inpaint``;
- a model whose conditioner takes class maps (``conditioner.class_map``): ``segmentation_to_image``;
- a model whose conditioner takes a low-res image (``conditioner.image: lowres``): ``upscale``.

Sampling is ``LatentDiffusion.sample``'s: the model's own denoiser over ``model.sigmas(steps)`` (the schedule's
"trailing" timesteps, ending at sigma 0), classifier-free guidance against the conditioner's unconditional branch
(the inputs trained with dropout replaced, the empty caption or a negative prompt in place of the caption), and the
noise drawn from a CPU generator, so ``text_to_image`` gives exactly ``model.sample``'s latents for the same seed.
The generator is used in this order: the initial noise, then the samplers' per-step noise. Images are encoded
with the first stage's posterior mean (``LatentDiffusion.encode_condition_image``), so they draw nothing.

img2img and inpainting with ``strength`` < 1 skip the first ``steps - int(steps * strength)`` levels, as the Stable
Diffusion pipelines do (``latentdiff.diffusion.noise_levels.apply_strength``). Inpainting with a dedicated inpainting
model (``conditioner.image: inpaint``) passes the image and the mask as its conditioning; with any other model the
region to keep is re-imposed at every step from the original's latent noised to that level, and pasted back clean
at the end (``latentdiff.diffusion.sampling.KnownRegion``, as for a 4-channel Stable Diffusion UNet). In both, the
latent mask is the pixel mask max-pooled to the latent grid (a latent cell that touches the mask is repainted), as
the inpainting conditioner makes it. A first stage with a mask-conditioned decoder (``mask_decoder: true``, an
"asymmetric" autoencoder) decodes the result with the known pixels, so the kept region comes back as the input rather
than as the latent's reconstruction; ``keep_unmasked`` pastes the original pixels back outside the mask.

Native models are trained at one image size: inputs must have it (the low-res image the conditioner's
``lowres_size``), except that a model conditioned on text (and labels) alone also generates at other sizes that
are multiples of ``size_multiple``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from latentdiff.conditioning.text import SPECIAL_TOKENS, WordTokenizer
from latentdiff.diffusion.denoiser import DiscreteDenoiser
from latentdiff.diffusion.model import LatentDiffusion
from latentdiff.formats.native import load_latent_diffusion
from latentdiff.io.checkpoint import read_native_config
from latentdiff.nn.attention import attention_slicing
from latentdiff.pipelines.base import Generator, PipelineBase, PipelineOutput, per_image, prompt_list
from latentdiff.pipelines.images import ImageInput, check_size, read_class_map, to_image_tensor, to_mask_tensor
from latentdiff.pipelines.variation import Variation

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE = 3.0  # when the checkpoint's training config does not say (its sample_guidance)


class LatentDiffusionOutput(PipelineOutput):
    """Images (N, C, H, W) in [0, 1] on the CPU (None when not decoded) and the final latents (times the model's
    scale factor), on the CPU."""


def word_tokenizer(model: LatentDiffusion) -> WordTokenizer | None:
    """The word-level tokenizer of the model's own jointly trained text encoder, None when it has none."""
    embedders = model.cond_stage_model.embedders if model.cond_stage_model is not None else ()
    tokenizers = (getattr(getattr(e, "transformer", None), "tokenizer", None) for e in embedders)
    return next((t for t in tokenizers if isinstance(t, WordTokenizer)), None)


def warn_unknown_words(model: LatentDiffusion, texts: Sequence[str | None], warned: set[str] | None = None
                       ) -> list[str]:
    """One WARNING line naming the words of ``texts`` (prompts, negative prompts) that the model's own word
    tokenizer does not know and reads as [UNK]; returns them (none for a model without that tokenizer). Words in
    ``warned`` are left out, and the named ones added to it (a pipeline warns once per word, not once per batch)."""
    tokenizer = word_tokenizer(model)
    if tokenizer is None:
        return []
    unknown = list(dict.fromkeys(w for text in texts if text for w in tokenizer.unknown_words(text)))
    if warned is not None:
        unknown = [w for w in unknown if w not in warned]
        warned.update(unknown)
    if unknown:
        logger.warning("not in the text encoder's vocabulary of %d words, read as [UNK]: %s (`latentdiff info "
                       "MODEL --vocab` lists the words)", len(tokenizer.tokens) - len(SPECIAL_TOKENS),
                       ", ".join(unknown))
    return unknown


def is_native_diffusion_config(config: dict[str, Any] | None) -> bool:
    """A diffusion model trained here (not a Stable Diffusion model converted to the native format)."""
    return bool(config) and config.get("task") == "diffusion" and "stable_diffusion" not in config


class LatentDiffusionPipeline(PipelineBase):
    """The tasks of one native ``LatentDiffusion`` model (see the module docstring).

    Build it with ``from_checkpoint(path)`` or from a loaded model. ``default_guidance`` is the guidance scale used
    when a call gives none (``from_checkpoint`` takes the run's ``sample_guidance``; 1 for a model without
    conditioning). ``attention_slice`` attends that many queries at a time.
    """

    def __init__(self, model: LatentDiffusion, *, device: torch.device | str | None = None,
                 default_guidance: float | None = None, attention_slice: int | None = None,
                 source: str | None = None) -> None:
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.attention_slice = attention_slice
        self.source = source or "the model"
        self.warned_words: set[str] = set()  # unknown words already named (warn_unknown_words)
        if not self.has_conditioning:
            default_guidance = 1.0
        self.default_guidance = DEFAULT_GUIDANCE if default_guidance is None else float(default_guidance)
        if not model.config.image_size:
            raise ValueError(f"{self.source} does not record its image size (model.image_size)")

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, ema: bool = True, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32, attention_slice: int | None = None,
                        vae_tile: int | None = None, prediction_type: str | None = None) -> LatentDiffusionPipeline:
        """Load a native checkpoint (file, checkpoint folder or run folder). The options that only make sense for
        Stable Diffusion files are refused with a line that says so."""
        if dtype != torch.float32:
            raise ValueError(f"{path} is a native latentdiff model; these run in float32 (leave out --dtype)")
        if vae_tile:
            raise ValueError(f"{path} is a native latentdiff model of small images; tiled decoding (--vae-tile) is "
                             "for Stable Diffusion models")
        if prediction_type:
            raise ValueError(f"{path} is a native latentdiff model: its config records what its UNet predicts "
                             "(leave out --prediction-type)")
        config = read_native_config(path) or {}
        model = load_latent_diffusion(path, device or "cpu", ema=ema)
        return cls(model, device=device, default_guidance=config.get("sample_guidance"),
                   attention_slice=attention_slice, source=str(path))

    # ---- what the model is ----------------------------------------------------------------------------------

    @property
    def conditioner_config(self):
        return self.model.config.conditioner

    @property
    def conditioning(self) -> str:
        return self.model.config.conditioning

    @property
    def inputs(self) -> tuple[str, ...]:
        """The conditioning inputs the model takes: some of caption, class_map, image, label (or class)."""
        if self.conditioner_config is not None:
            return self.conditioner_config.inputs
        return ("class",) if self.conditioning == "class" else ()

    @property
    def has_conditioning(self) -> bool:
        return bool(self.inputs)

    @property
    def has_text_conditioning(self) -> bool:
        return "caption" in self.inputs

    @property
    def has_class_map(self) -> bool:
        return "class_map" in self.inputs

    @property
    def num_map_classes(self) -> int:
        return self.conditioner_config.num_map_classes if self.has_class_map else 0

    @property
    def is_inpainting_model(self) -> bool:
        return self.conditioner_config is not None and self.conditioner_config.image == "inpaint"

    @property
    def is_upscaler(self) -> bool:
        return self.conditioner_config is not None and self.conditioner_config.image == "lowres"

    @property
    def lowres_size(self) -> int:
        return self.conditioner_config.lowres_size if self.is_upscaler else 0

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def image_channels(self) -> int:
        return self.model.image_channels

    @property
    def latent_channels(self) -> int:
        return self.model.latent_channels

    @property
    def vae_factor(self) -> int:
        return self.model.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the first stage's downsampling times the UNet's."""
        return self.vae_factor * self.model.config.unet.downsample_factor

    @property
    def size_flexible(self) -> bool:
        """Whether the model also generates at other sizes: its conditioning (text, labels) has no size."""
        return not set(self.inputs) & {"class_map", "image"}

    def describe_conditioning(self) -> str:
        """E.g. "conditioning: concat on class_map", for error messages."""
        names = {"caption": "captions", "class_map": "class maps", "label": "labels",
                 "image": "low-res images" if self.is_upscaler else "images to inpaint"}
        inputs = [names[i] for i in self.inputs if i in names]
        return f"conditioning: {self.conditioning}" + (f" on {', '.join(inputs)}" if inputs else "")

    # ---- building blocks ------------------------------------------------------------------------------------

    def _check_image_size(self, height: int, width: int, what: str) -> None:
        if self.size_flexible:
            check_size(height, width, self.size_multiple, what)
        elif (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"the {what} is {width}x{height} but this model makes {self.image_size}x"
                             f"{self.image_size} images; resize it to {self.image_size}x{self.image_size}")

    def _images(self, image: ImageInput, what: str) -> torch.Tensor:
        pixels = to_image_tensor(image, channels=self.image_channels)
        self._check_image_size(pixels.shape[-2], pixels.shape[-1], what)
        return pixels

    def encode_images(self, images: ImageInput) -> torch.Tensor:
        """Latents (times the scale factor) of images in [0, 1]: the first stage's posterior mean."""
        pixels = to_image_tensor(images, channels=self.image_channels) * 2 - 1
        with attention_slicing(self.attention_slice):
            return self.model.encode_condition_image(pixels.to(self.device)).float()

    @property
    def has_mask_decoder(self) -> bool:
        """Whether the first stage has a mask-conditioned decoder, which ``inpaint`` uses by default."""
        return self.model.has_mask_decoder

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, image: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] on the CPU from latents (times the scale factor). ``image`` (in [0, 1])
        and ``mask`` (1 = repainted): decode with the first stage's mask decoder, which sees the known pixels."""
        known = None if image is None else image.to(self.device) * 2 - 1
        with attention_slicing(self.attention_slice):
            images = self.model.decode(latents.to(self.device), known, None if mask is None else mask.to(self.device))
        return (images.float() / 2 + 0.5).clamp(0, 1).cpu()

    def latent_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) pixel masks (1 = repaint) -> the latent grid's: 1 where a cell touches the mask."""
        factor = self.vae_factor
        return F.max_pool2d(masks, factor) if factor > 1 else masks

    def _prompt_batch(self, prompt: str | Sequence[str] | None, negative_prompt: str | Sequence[str] | None,
                      num_images: int, inputs: int = 1) -> tuple[list[str] | None, list[str] | None, int]:
        """(captions, negatives, batch): one caption per image, prompts in order, each ``num_images`` times.
        ``inputs``: how many images (maps, low-res images, images to repaint) the call gave; one prompt (or none)
        with several of them is that prompt for each."""
        if num_images < 1:
            raise ValueError(f"the number of images must be at least 1, got {num_images}")
        prompts = prompt_list(prompt) if prompt is not None else [""]
        negatives = prompt_list(negative_prompt) if negative_prompt is not None else None
        if len(prompts) == 1 and inputs > 1:
            prompts = prompts * inputs
            negatives = negatives * inputs if negatives is not None and len(negatives) == 1 else negatives
        warn_unknown_words(self.model, prompts + (negatives or []), self.warned_words)
        if not self.has_text_conditioning:
            if [p for p in prompts + (negatives or []) if p]:
                raise ValueError(f"{self.source} has no text conditioning ({self.describe_conditioning()}); "
                                 "give no prompt or negative prompt")
            return None, None, len(prompts) * num_images
        if negatives is not None:
            if len(negatives) == 1 and len(prompts) > 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one "
                                 "each")
            negatives = [p for p in negatives for _ in range(num_images)]
        return [p for p in prompts for _ in range(num_images)], negatives, len(prompts) * num_images

    def _default_inputs(self, inputs: dict[str, torch.Tensor], batch: int, task: str) -> dict[str, torch.Tensor]:
        """Fill in what a task does not give: an inpainting model generating a whole image gets the full mask; an
        input trained without dropout (so without an unconditional version) is required."""
        inputs = dict(inputs)
        if self.is_inpainting_model and "image" not in inputs:
            size = self.image_size
            inputs["image"] = torch.zeros(batch, self.image_channels, size, size)
            inputs["mask"] = torch.ones(batch, 1, size, size)
        cfg = self.conditioner_config
        if cfg is not None:
            required = {"class_map": (cfg.class_map_dropout, "a class map", "seg2img"),
                        "image": (cfg.image_dropout, "a low-res image", "upscale")}
            for name, (rate, what, verb) in required.items():
                given = inputs.get("lowres" if name == "image" and self.is_upscaler else name)
                if name in self.inputs and given is None and rate == 0:
                    raise ValueError(f"{self.source} needs {what} for every image (it was trained without dropping "
                                     f"it), so it cannot {task}; use `latentdiff {verb}`")
        return inputs

    def _conditioning(self, inputs: dict[str, Any], captions: list[str] | None, negatives: list[str] | None,
                      batch: int, guidance_scale: float
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(cond, uncond) UNet dicts; uncond is None without guidance. As ``LatentDiffusion.sample``: the
        unconditional branch drops the inputs trained with dropout, and a negative prompt replaces the caption."""
        model = self.model
        if model.cond_stage_model is None:
            cond = model.prepare_cond(None, batch)  # the null class for a class model
            return {k: v.to(self.device) for k, v in cond.items()}, None
        given = dict(inputs)
        if captions is not None:
            given["caption"] = captions
        with attention_slicing(self.attention_slice):
            cond = model.encode_conditioning(given, batch)
            if guidance_scale == 1.0:
                return cond, None
            drop = model.cond_stage_model.unconditional_mask(batch)
            if negatives is not None:
                given["caption"] = negatives
                drop[:, 0] = False  # the caption column: the negative prompt stands in for the empty caption
            elif not bool(drop.any()):
                raise ValueError(f"classifier-free guidance needs an unconditional model, but {self.source} was "
                                 "trained without conditioning dropout; use guidance 1 (--guidance 1)")
            return cond, model.encode_conditioning(given, batch, drop=drop)

    def sampling_denoiser(self) -> DiscreteDenoiser:
        return self.model.denoiser()

    def _finish(self, latents: torch.Tensor, decode: bool, image: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> LatentDiffusionOutput:
        return LatentDiffusionOutput(self.decode_latents(latents, image, mask) if decode else None,
                                     latents.float().cpu())

    def _guidance(self, guidance_scale: float | None) -> float:
        return self.default_guidance if guidance_scale is None else float(guidance_scale)

    def _generate(self, inputs: dict[str, torch.Tensor], prompt: str | Sequence[str] | None,
                  negative_prompt: str | Sequence[str] | None, task: str, *, num_images: int, height: int,
                  width: int, steps: int, sampler: str, guidance_scale: float | None, generator: Generator,
                  latents: torch.Tensor | None, sampler_options: dict[str, Any] | None, decode: bool,
                  callback: Callable | None, progress: bool | None,
                  variation: Variation | None) -> LatentDiffusionOutput:
        """Sample from noise under the conditioning ``inputs`` (one for all images or one per prompt)."""
        run = self._sampling(sampler, steps, generator, sampler_options, callback, progress, variation)
        guidance = self._guidance(guidance_scale)
        given = max((v.shape[0] for v in inputs.values()), default=1)
        captions, negatives, batch = self._prompt_batch(prompt, negative_prompt, num_images, given)
        inputs = {k: per_image(v, batch, num_images, k.replace("_", " ")) for k, v in inputs.items()}
        inputs = self._default_inputs(inputs, batch, task)
        cond, uncond = self._conditioning(inputs, captions, negatives, batch, guidance)
        shape = (batch, self.latent_channels, height // self.vae_factor, width // self.vae_factor)
        noise = self._noise(latents, shape, run)
        return self._finish(self._denoise(self.model.sigmas(steps), noise, cond, uncond, guidance, run), decode)

    # ---- tasks ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def text_to_image(self, prompt: str | Sequence[str] | None = "", negative_prompt: str | Sequence[str] | None = None,
                      *, num_images: int = 1, height: int | None = None, width: int | None = None, steps: int = 25,
                      sampler: str = "dpmpp_2m", guidance_scale: float | None = None, generator: Generator = None,
                      latents: torch.Tensor | None = None, sampler_options: dict[str, Any] | None = None,
                      decode: bool = True, callback: Callable | None = None,
                      progress: bool | None = None, variation: Variation | None = None) -> LatentDiffusionOutput:
        """Generate ``num_images`` images per prompt (a model without text: leave the prompt empty).

        ``generator``: a CPU ``torch.Generator`` or a seed. ``latents``: the initial unit-normal noise (N, C, h, w).
        ``guidance_scale`` None is ``default_guidance``; 1 skips the unconditional branch. Given the same seed,
        sampler and steps, the latents are ``LatentDiffusion.sample``'s with ``cond={"caption": ...}``. ``variation``:
        A1111's variation seed and strength, mixed into the initial noise (``latentdiff.pipelines.variation``; every
        task takes it).
        """
        height, width = height or self.image_size, width or self.image_size
        self._check_image_size(height, width, "requested image")
        return self._generate({}, prompt, negative_prompt, "generate images from text alone",
                              num_images=num_images, height=height, width=width, steps=steps, sampler=sampler,
                              guidance_scale=guidance_scale, generator=generator, latents=latents,
                              sampler_options=sampler_options, decode=decode, callback=callback, progress=progress,
                              variation=variation)

    @torch.no_grad()
    def segmentation_to_image(self, class_map: torch.Tensor | str | Path, prompt: str | Sequence[str] | None = None,
                              negative_prompt: str | Sequence[str] | None = None, *, num_images: int = 1,
                              steps: int = 25, sampler: str = "dpmpp_2m", guidance_scale: float | None = None,
                              generator: Generator = None, latents: torch.Tensor | None = None,
                              sampler_options: dict[str, Any] | None = None, decode: bool = True,
                              callback: Callable | None = None, progress: bool | None = None,
                              variation: Variation | None = None) -> LatentDiffusionOutput:
        """Semantic synthesis: images whose layout follows ``class_map``, (H, W) or (N, H, W) class indices (or a
        class-map PNG, see ``latentdiff.pipelines.images.read_class_map``), at the model's image size."""
        if not self.has_class_map:
            raise ValueError(f"{self.source} takes no class map ({self.describe_conditioning()}); seg2img needs a "
                             "model trained with model.conditioner.class_map (configs/ldm-scenes-seg2img.yaml)")
        maps = self.check_class_map(class_map)
        return self._generate({"class_map": maps}, prompt, negative_prompt, "", num_images=num_images,
                              height=self.image_size, width=self.image_size, steps=steps, sampler=sampler,
                              guidance_scale=guidance_scale, generator=generator, latents=latents,
                              sampler_options=sampler_options, decode=decode, callback=callback, progress=progress,
                              variation=variation)

    def check_class_map(self, class_map: torch.Tensor | str | Path) -> torch.Tensor:
        """(N, H, W) int64 class indices, checked against the model's image size and number of classes."""
        maps = read_class_map(class_map) if isinstance(class_map, (str, Path)) else torch.as_tensor(class_map)
        if maps.is_floating_point() or maps.is_complex() or maps.dtype == torch.bool:
            raise ValueError(f"a class map holds integer class indices, got {maps.dtype}")
        maps = maps[None] if maps.ndim == 2 else maps
        if maps.ndim != 3:
            raise ValueError(f"a class map is (H, W) or (N, H, W) class indices, got shape {tuple(maps.shape)}")
        h, w = maps.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"the class map is {w}x{h} but this model makes {self.image_size}x{self.image_size} "
                             f"images; give a {self.image_size}x{self.image_size} map")
        low, high, k = int(maps.min()), int(maps.max()), self.num_map_classes
        if low < 0 or high >= k:
            raise ValueError(f"the class map holds class {low if low < 0 else high}, but this model knows {k} "
                             f"classes (0 to {k - 1})")
        return maps.long()

    @torch.no_grad()
    def upscale(self, lowres: ImageInput, prompt: str | Sequence[str] | None = None,
                negative_prompt: str | Sequence[str] | None = None, *, num_images: int = 1, steps: int = 25,
                sampler: str = "dpmpp_2m", guidance_scale: float | None = None, generator: Generator = None,
                latents: torch.Tensor | None = None, sampler_options: dict[str, Any] | None = None,
                decode: bool = True, callback: Callable | None = None,
                progress: bool | None = None, variation: Variation | None = None) -> LatentDiffusionOutput:
        """Super-resolution: images of the model's size from ``lowres`` images in [0, 1] of its ``lowres_size``."""
        if not self.is_upscaler:
            raise ValueError(f"{self.source} is not an upscaler ({self.describe_conditioning()}); upscale needs a "
                             "model trained with model.conditioner.image: lowres (configs/ldm-scenes-upscale.yaml)")
        pixels = to_image_tensor(lowres, channels=self.image_channels)
        s = self.lowres_size
        if tuple(pixels.shape[-2:]) != (s, s):
            raise ValueError(f"the low-res image is {pixels.shape[-1]}x{pixels.shape[-2]} but this model upscales "
                             f"{s}x{s} images (to {self.image_size}x{self.image_size}); resize it to {s}x{s}")
        return self._generate({"lowres": pixels * 2 - 1}, prompt, negative_prompt, "", num_images=num_images,
                              height=self.image_size, width=self.image_size, steps=steps, sampler=sampler,
                              guidance_scale=guidance_scale, generator=generator, latents=latents,
                              sampler_options=sampler_options, decode=decode, callback=callback, progress=progress,
                              variation=variation)

    @torch.no_grad()
    def image_to_image(self, image: ImageInput, prompt: str | Sequence[str] | None = "",
                       negative_prompt: str | Sequence[str] | None = None, *, strength: float = 0.6,
                       num_images: int = 1, steps: int = 25, sampler: str = "dpmpp_2m",
                       guidance_scale: float | None = None, generator: Generator = None,
                       noise: torch.Tensor | None = None, sampler_options: dict[str, Any] | None = None,
                       decode: bool = True, callback: Callable | None = None,
                       progress: bool | None = None, variation: Variation | None = None) -> LatentDiffusionOutput:
        """SDEdit (Meng et al. 2022): encode ``image`` (posterior mean), noise it to the level ``strength`` of the way
        up, and run the remaining ``int(steps * strength)`` steps. ``noise``: the unit-normal noise (drawn from the
        generator when None)."""
        run = self._sampling(sampler, steps, generator, sampler_options, callback, progress, variation)
        pixels = self._images(image, "init image")
        guidance = self._guidance(guidance_scale)
        sigmas = self.model.sigmas(steps, strength=strength)
        captions, negatives, batch = self._prompt_batch(prompt, negative_prompt, num_images, pixels.shape[0])
        inputs = self._default_inputs({}, batch, "redraw an image without it")
        cond, uncond = self._conditioning(inputs, captions, negatives, batch, guidance)
        init = per_image(self.encode_images(pixels), batch, num_images, "init image")
        noise = self._noise(noise, tuple(init.shape), run)
        return self._finish(self._denoise(sigmas, noise, cond, uncond, guidance, run, init=init), decode)

    @torch.no_grad()
    def inpaint(self, image: ImageInput, mask: ImageInput, prompt: str | Sequence[str] | None = "",
                negative_prompt: str | Sequence[str] | None = None, *, strength: float = 1.0, num_images: int = 1,
                steps: int = 25, sampler: str = "dpmpp_2m", guidance_scale: float | None = None,
                generator: Generator = None, latents: torch.Tensor | None = None, keep_unmasked: bool = False,
                mask_decoder: bool = True, sampler_options: dict[str, Any] | None = None, decode: bool = True,
                callback: Callable | None = None, progress: bool | None = None,
                variation: Variation | None = None) -> LatentDiffusionOutput:
        """Repaint where ``mask`` is white (>= 0.5) and keep the rest (see the module docstring).

        With a model that is not an inpainting model, the kept latent cells of the result are exactly the image's
        latent (its posterior mean), so the kept pixels are the original up to the autoencoder's error;
        ``keep_unmasked`` pastes the original pixels there. A first stage with a mask-conditioned decoder
        (``has_mask_decoder``) decodes with the known pixels, unless ``mask_decoder`` is False. ``latents``: the
        initial unit-normal noise, also the noise of the re-imposed region. ``strength`` < 1 starts from the image
        noised to that level.
        """
        run = self._sampling(sampler, steps, generator, sampler_options, callback, progress, variation)
        pixels = self._images(image, "image")
        masks = to_mask_tensor(mask)
        if masks.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"the mask is {masks.shape[-1]}x{masks.shape[-2]} but the image is "
                             f"{pixels.shape[-1]}x{pixels.shape[-2]}; they must be the same size")
        guidance = self._guidance(guidance_scale)
        sigmas = self.model.sigmas(steps, strength=strength)
        captions, negatives, batch = self._prompt_batch(prompt, negative_prompt, num_images,
                                                        max(pixels.shape[0], masks.shape[0]))
        pixels_b = per_image(pixels, batch, num_images, "image")
        masks_b = per_image(masks, batch, num_images, "mask")
        inputs = {"image": pixels_b * 2 - 1, "mask": masks_b} if self.is_inpainting_model else {}
        inputs = self._default_inputs(inputs, batch, "inpaint without it")
        cond, uncond = self._conditioning(inputs, captions, negatives, batch, guidance)
        image_latents = per_image(self.encode_images(pixels), batch, num_images, "image")
        noise = self._noise(latents, tuple(image_latents.shape), run)
        repaint = self.latent_mask(masks_b).to(self.device)
        out = self._inpaint_latents(sigmas, noise, image_latents, repaint, not self.is_inpainting_model, cond, uncond,
                                    guidance, run, full_strength=strength == 1.0)
        with_known = mask_decoder and self.has_mask_decoder
        result = self._finish(out, decode, pixels_b if with_known else None, masks_b if with_known else None)
        if keep_unmasked and result.images is not None:
            result.images = self._keep_unmasked(result.images, masks_b, pixels_b)
        return result


__all__ = ["LatentDiffusionOutput", "LatentDiffusionPipeline", "is_native_diffusion_config", "warn_unknown_words",
           "word_tokenizer"]
