"""Stable Diffusion text-to-image, image-to-image (SDEdit) and inpainting over our UNet, VAE and CLIP text encoder.

The pipeline composes what the other packages provide: the CLIP tokenizer and text encoder make the cross-attention
context; the UNet is wrapped once into the denoiser D(x, sigma) (``DiscreteDenoiser``, eps- or v-prediction); the
shared pipeline base (``latentdiff.pipelines.base``) runs the sampling core with classifier-free guidance over it
(one batched call, unconditional half first), over the sigmas the sampler's diffusers counterpart visits
(``latentdiff.diffusion.noise_levels.sampler_sigmas``) under the model's scheduler config (``LevelOptions``: a
diffusers folder's ``scheduler_config.json``, else the hub SD 1.5 config, which leaves each scheduler its default
spacing); the VAE decodes ``latents / scale_factor``.

Given the same weights, sampler, prompt, seed and initial noise, the images equal those of diffusers'
``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline`` and ``StableDiffusionInpaintPipeline`` with SD's
scheduler config (``tests/test_sd_pipeline.py`` measures it). The generator is used in diffusers' order: the
posterior samples of the encoded images, the initial noise, then the samplers' per-step noise.

Our samplers work in the variance-exploding space x = x_t / sqrt(alphas_cumprod) (see ``diffusion/denoiser.py``);
diffusers' DDIM/PLMS/DDPM/DPM-Solver step the variance-preserving x_t. The two meet at the ends: the initial noise
is scaled by sqrt(1 + sigma_max^2) (the VE image of diffusers' x_T; its Euler-type schedulers' ``init_noise_sigma``
with "leading" spacing) or by sigma_max (theirs with "linspace" / "trailing", as A1111's), and the final x is
divided by sqrt(1 + sigma_end^2), which is 1 except for DDIM and PLMS, which stop at alphas_cumprod[0]
(``latentdiff.diffusion.sampling``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.autoencoder.distributions import DiagonalGaussian
from latentdiff.autoencoder.model import Autoencoder
from latentdiff.conditioning.clip import CLIPTextConfig, CLIPTextModel
from latentdiff.conditioning.prompt_syntax import PromptChunk, apply_emphasis, prompt_chunks, stack_chunks
from latentdiff.conditioning.tokenizer import CLIPTokenizer
from latentdiff.device import memory_available
from latentdiff.diffusion.denoiser import DiscreteDenoiser
from latentdiff.diffusion.noise_levels import LevelOptions, diffusers_stepping, sampler_sigmas, starts_at_sigma_max
from latentdiff.diffusion.process import draw_noise
from latentdiff.diffusion.samplers import resolve_sampler
from latentdiff.diffusion.schedule import NoiseSchedule, ScheduleConfig
from latentdiff.diffusion.unet import UNetModel
from latentdiff.formats import (
    PARAMETERIZATIONS,
    SD_SCALE_FACTOR,
    StableDiffusionComponents,
    check_state_dict,
    infer_clip_text_config,
    load_stable_diffusion_weights,
)
from latentdiff.formats.embeddings import read_embedding
from latentdiff.formats.lora import apply_lora_to_components
from latentdiff.io.errors import CheckpointError
from latentdiff.nn.attention import attention_slicing
from latentdiff.pipelines.base import (
    Generator,
    PipelineBase,
    PipelineOutput,
    SamplingOptions,
    as_generator,
    per_image,
    prompt_list,
)
from latentdiff.pipelines.images import ImageInput, check_size, to_image_tensor, to_mask_tensor
from latentdiff.pipelines.tiling import automatic_tile, decode_bytes, decode_tiled
from latentdiff.pipelines.variation import Variation

logger = logging.getLogger(__name__)


class StableDiffusionOutput(PipelineOutput):
    """Images (N, 3, H, W) in [0, 1] on the CPU (None when not decoded) and the final latents (N, 4, h, w) as
    diffusers' ``output_type="latent"`` gives them (scaled by ``scale_factor``)."""


def _load_assigned(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Load ``weights`` into a module built on the meta device, sharing the tensors instead of copying them."""
    check_state_dict(weights, {k: tuple(v.shape) for k, v in module.state_dict().items()}, what)
    module.load_state_dict(weights, strict=True, assign=True)


class _UNetNetwork(nn.Module):
    """The UNet as ``DiscreteDenoiser`` calls it: float32 in and out, the UNet's own dtype inside."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                concat: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.unet.time_embed[0].weight.dtype
        out = self.unet(x.to(dtype), t, context=None if context is None else context.to(dtype),
                        concat=None if concat is None else concat.to(dtype))
        return out.to(x.dtype)


class StableDiffusionPipeline(PipelineBase):
    """Stable Diffusion v1.x / v2.x (eps or v-prediction) and the 9-channel inpainting model, on our modules.

    Build it with ``from_pretrained(path)`` (an original single file, a diffusers folder or a native checkpoint)
    or ``from_components``. ``dtype`` is the weights' dtype (bfloat16 runs on the CPU; float16 keeps the VAE in
    float32, as diffusers' ``force_upcast``); the sampler state stays float32. ``attention_slice`` attends that
    many queries at a time (``latentdiff.nn.attention.attention_slicing``); ``vae_tile`` decodes latents larger
    than that many latent pixels in tiles (``latentdiff.pipelines.tiling``) that overlap by ``vae_tile_overlap``
    (default a quarter tile) and see as much context around them. ``levels``: the scheduler config's spacing,
    steps offset and sigma ramp (default: the hub SD 1.5 config's; each task call can override spacing and ramp).
    """

    default_guidance = 7.5  # the guidance scale the command line uses when none is given (diffusers' default)

    def __init__(self, unet: UNetModel, vae: Autoencoder, text_encoder: CLIPTextModel | None = None,
                 tokenizer: CLIPTokenizer | None = None, *, scale_factor: float = SD_SCALE_FACTOR,
                 prediction_type: str = "epsilon", schedule: NoiseSchedule | None = None,
                 image_size: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32, attention_slice: int | None = None, vae_tile: int | None = None,
                 vae_tile_overlap: int | None = None, levels: LevelOptions | None = None) -> None:
        if prediction_type not in PARAMETERIZATIONS:
            raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of "
                             f"{', '.join(PARAMETERIZATIONS)}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        self.unet = unet.to(self.device, dtype).eval().requires_grad_(False)
        self.vae = vae.to(self.device, vae_dtype).eval().requires_grad_(False)
        self.text_encoder = (None if text_encoder is None
                             else text_encoder.to(self.device, dtype).eval().requires_grad_(False))
        self.tokenizer = tokenizer
        self._clip_skip = 1
        self.scale_factor = scale_factor
        self.prediction_type = prediction_type
        self.schedule = schedule or NoiseSchedule(ScheduleConfig())
        self.denoiser = DiscreteDenoiser(_UNetNetwork(self.unet), self.schedule, PARAMETERIZATIONS[prediction_type],
                                         discrete_t=True)
        # diffusers' sigma schedulers (Euler, Heun) feed the UNet fractional timesteps ("linspace", Karras ramps).
        self.fractional_denoiser = DiscreteDenoiser(self.denoiser.network, self.schedule,
                                                    PARAMETERIZATIONS[prediction_type])
        self.levels = levels or LevelOptions()
        self.image_size = image_size or (768 if prediction_type == "v_prediction" else 512)
        self.attention_slice = attention_slice
        self.vae_tile = vae_tile
        self.vae_tile_overlap = vae_tile_overlap
        self._check_parts()

    # ---- construction ---------------------------------------------------------------------------------------

    def _check_parts(self) -> None:
        latent = self.latent_channels
        c = self.unet.config
        if c.out_channels != latent:
            raise ValueError(f"the UNet predicts {c.out_channels} channels but the VAE's latent has {latent}")
        if c.in_channels not in (latent, 2 * latent + 1):
            raise ValueError(f"the UNet takes {c.in_channels} input channels; Stable Diffusion's take {latent} "
                             f"(text-to-image) or {2 * latent + 1} (inpainting: latent, mask, masked-image latent)")
        if c.num_classes:
            raise ValueError("the UNet is class-conditional; the Stable Diffusion pipeline conditions on text only")
        if c.context_dim and self.text_encoder is None:
            raise ValueError("the UNet cross-attends to a text context, but there is no text encoder")
        if self.text_encoder is not None:
            if not c.context_dim:
                raise ValueError("a text encoder was given, but the UNet has no cross-attention")
            if self.text_encoder.config.width != c.context_dim:
                raise ValueError(f"the text encoder is {self.text_encoder.config.width} wide but the UNet's "
                                 f"cross-attention reads {c.context_dim}")
            if self.tokenizer is None:
                raise ValueError("a text encoder needs its tokenizer")

    @classmethod
    def from_components(cls, comps: StableDiffusionComponents, *, tokenizer: CLIPTokenizer | None = None,
                        pad_token_id: int | None = None, prediction_type: str | None = None,
                        loras: Sequence[tuple[str | Path, float]] = (), embeddings: Sequence[str | Path] = (),
                        **options: Any) -> StableDiffusionPipeline:
        """Build the pipeline from loaded weights (``latentdiff.formats.load_stable_diffusion_weights``).

        The tokenizer is the checkpoint's ``tokenizer/`` folder when it has one, else CLIP's vocabulary from
        ``open_clip_torch``, padding with the end token (SD v1) or 0 (SD v2's OpenCLIP text encoder), unless
        ``pad_token_id`` says otherwise. ``prediction_type`` overrides the checkpoint's (an original SD 2.x-768-v
        file cannot tell it is v-prediction). ``loras``: (LoRA file, scale) pairs fused into the weights, in order
        (``latentdiff.formats.lora``); ``embeddings``: textual-inversion files whose words the prompts may use
        (``load_embedding``). ``options`` go to the constructor.
        """
        for lora_path, lora_scale in loras:
            comps = apply_lora_to_components(comps, lora_path, lora_scale)
        if comps.unet is None or comps.vae is None:
            missing = " and ".join(n for n, part in (("UNet", comps.unet), ("VAE", comps.vae)) if part is None)
            raise CheckpointError(f"a Stable Diffusion pipeline needs a UNet and a VAE; the checkpoint has no "
                                  f"{missing}")
        with torch.device("meta"):
            unet, vae = UNetModel(comps.unet_config), Autoencoder(comps.vae_config)
        _load_assigned(unet, comps.unet, "UNet")
        _load_assigned(vae, comps.vae, "VAE")
        text_encoder = None
        if comps.text_encoder is not None:
            weights = {k: v for k, v in comps.text_encoder.items()
                       if not k.startswith(("text_projection", "logit_scale", "visual_projection", "vision_model"))}
            hf_config = comps.text_encoder_config or infer_clip_text_config(weights)
            config = CLIPTextConfig.from_hf(hf_config, output_layer=comps.text_encoder_output_layer)
            with torch.device("meta"):
                text_encoder = CLIPTextModel(config)
            _load_assigned(text_encoder, weights, "CLIP text encoder")
            if tokenizer is None:
                if pad_token_id is None and comps.tokenizer_dir is None and comps.text_encoder_layout == "openclip":
                    pad_token_id = 0  # OpenCLIP pads with 0; SD v2 was trained so
                tokenizer = CLIPTokenizer(comps.tokenizer_dir, pad_token_id=pad_token_id,
                                          max_length=min(77, config.context_length))
        if comps.scheduler_config is not None:
            options.setdefault("levels", LevelOptions.from_scheduler_config(comps.scheduler_config))
        pipe = cls(unet, vae, text_encoder, tokenizer, scale_factor=comps.scale_factor,
                   prediction_type=prediction_type or comps.prediction_type, image_size=comps.image_size, **options)
        for embedding_path in embeddings:
            pipe.load_embedding(embedding_path)
        return pipe

    @classmethod
    def from_pretrained(cls, path: str | Path, *, ema: bool = True, **options: Any) -> StableDiffusionPipeline:
        """Load an original single file (.safetensors / .ckpt), a diffusers folder or a native checkpoint."""
        return cls.from_components(load_stable_diffusion_weights(path, ema=ema), **options)

    def load_embedding(self, path: str | Path) -> str:
        """Teach the tokenizer and text encoder the word of the textual-inversion file at ``path``
        (``latentdiff.formats.embeddings``) and return the word, as diffusers' ``load_textual_inversion`` does."""
        word, vectors = read_embedding(path)
        if self.text_encoder is None:
            raise ValueError(f"{path}: this model has no text encoder to load an embedding into")
        if vectors.shape[1] != self.text_encoder.config.width:
            raise CheckpointError(f"{path} holds {vectors.shape[1]}-wide vectors; this model's text encoder is "
                                  f"{self.text_encoder.config.width} wide (an embedding for another model?)")
        if self.tokenizer.vocab_size != self.text_encoder.config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens and the text encoder "
                             f"{self.text_encoder.config.vocab_size}; their new tokens would not line up")
        try:
            ids = self.tokenizer.add_word(word, len(vectors))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
        self.text_encoder.add_token_embeddings(vectors)  # the same ids: the vocabulary sizes agreed above
        logger.info("loaded the embedding %r (%d vectors) from %s", word, len(ids), path)
        return word

    # ---- properties -----------------------------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.vae.config.embed_dim

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downsampling times the UNet's."""
        return self.vae_factor * self.unet.config.downsample_factor

    @property
    def is_inpainting_model(self) -> bool:
        """A UNet that takes the mask and the masked image's latent as extra input channels (9 for SD)."""
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def has_text_conditioning(self) -> bool:
        return bool(self.unet.config.context_dim)

    # ---- building blocks ------------------------------------------------------------------------------------

    @property
    def clip_skip(self) -> int:
        """A1111's "Clip skip": the text encoder's output is taken ``clip_skip - 1`` layers before its usual one."""
        return self._clip_skip

    @clip_skip.setter
    def clip_skip(self, value: int) -> None:
        layers = self.text_encoder.config.layers_run if self.text_encoder is not None else 1
        if not 1 <= value <= layers:
            raise ValueError(f"clip skip must be between 1 and {layers} (the layers this model's text encoder runs), "
                             f"got {value}")
        self._clip_skip = value

    def _prompt_chunks(self, prompts: str | Sequence[str]) -> list[list[PromptChunk]]:
        if self.text_encoder is None:
            raise ValueError("this model has no text conditioning (its UNet has no cross-attention); give no prompt")
        return [prompt_chunks(p, self.tokenizer) for p in prompt_list(prompts)]

    @torch.no_grad()
    def _encode_chunks(self, prompts: list[list[PromptChunk]], num_chunks: int) -> torch.Tensor:
        """Each prompt's chunks encoded on their own, weighted, and concatenated: (N, num_chunks * L, width)."""
        ids, weights = stack_chunks(prompts, num_chunks, self.tokenizer)
        flat_ids, flat_weights = ids.flatten(0, 1).to(self.device), weights.flatten(0, 1).to(self.device)
        context = self.text_encoder.encode(flat_ids, clip_skip=self.clip_skip).float()
        context = apply_emphasis(context, flat_weights)
        return context.reshape(ids.shape[0], -1, context.shape[-1])

    def encode_prompt(self, prompts: str | Sequence[str], num_chunks: int | None = None) -> torch.Tensor:
        """The cross-attention context (N, 77 * chunks, width) of prompts in A1111's syntax, in float32.

        A prompt past 75 tokens (or with ``BREAK``) takes several 77-token chunks
        (``latentdiff.conditioning.prompt_syntax``); all prompts are padded with empty-prompt chunks to the longest
        one's count, or to ``num_chunks``. A plain prompt of at most 75 tokens is one chunk, encoded as it always was.
        """
        chunks = self._prompt_chunks(prompts)
        return self._encode_chunks(chunks, num_chunks or max(len(c) for c in chunks))

    def _conditioning(self, prompt: str | Sequence[str] | None, negative_prompt: str | Sequence[str] | None,
                      num_images: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int]:
        """(cond, uncond, batch): one context per image, prompts in order, each repeated ``num_images`` times;
        uncond is None for a UNet without text conditioning (both halves of a guided batch would be the same)."""
        if num_images < 1:
            raise ValueError(f"the number of images must be at least 1, got {num_images}")
        if not self.has_text_conditioning:
            given = [p for p in (prompt_list(prompt) if prompt is not None else []) + (
                prompt_list(negative_prompt) if negative_prompt is not None else []) if p]
            if given:
                raise ValueError("this model has no text conditioning (its UNet has no cross-attention); "
                                 "give no prompt or negative prompt")
            count = 1 if prompt is None else len(prompt_list(prompt))
            return {}, None, count * num_images
        prompts = prompt_list("" if prompt is None else prompt)
        negatives = [""] * len(prompts) if negative_prompt is None else prompt_list(negative_prompt)
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one each")
        # The prompts and the negatives are padded to one number of chunks, so both halves of a CFG batch match.
        cond_chunks, uncond_chunks = self._prompt_chunks(prompts), self._prompt_chunks(negatives)
        num_chunks = max(len(c) for c in cond_chunks + uncond_chunks)
        cond = self._encode_chunks(cond_chunks, num_chunks).repeat_interleave(num_images, 0)
        uncond = self._encode_chunks(uncond_chunks, num_chunks).repeat_interleave(num_images, 0)
        return {"context": cond}, {"context": uncond}, cond.shape[0]

    def _posterior(self, pixels: torch.Tensor) -> DiagonalGaussian:
        vae_dtype = self.vae.post_quant_conv.weight.dtype
        with attention_slicing(self.attention_slice), torch.no_grad():  # one image at a time: one image's memory
            moments = torch.cat([self.vae.encode_pre_quant(one.to(self.device, vae_dtype)).float()
                                 for one in pixels.split(1)])
        return DiagonalGaussian(moments)

    def _encode(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Latents (times ``scale_factor``) of pixels in [-1, 1]: a posterior sample drawn from ``generator`` (in
        float32, as diffusers' ``latent_dist.sample(generator)``), or the posterior mean when it is None."""
        posterior = self._posterior(pixels)
        if generator is None:
            z = posterior.mean
        else:
            noise = draw_noise(posterior.mean.shape, generator, device=self.device)
            z = posterior.mean + posterior.std * noise
        return z * self.scale_factor

    def encode_images(self, images: ImageInput, generator: Generator = None, sample: bool = True) -> torch.Tensor:
        """Latents of images in [0, 1] (times ``scale_factor``): a posterior sample, or the mean (``sample=False``)."""
        pixels = to_image_tensor(images) * 2 - 1
        return self._encode(pixels, as_generator(generator) if sample else None)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] on the CPU from latents (times ``scale_factor``), one image at a time (a
        batch costs the memory of one decode), tiled when enabled or when a whole decode would not fit in the memory
        available (``automatic_tile``; a warning says so)."""
        vae_dtype = self.vae.post_quant_conv.weight.dtype
        z = (latents / self.scale_factor).to(self.device, vae_dtype)
        tile = self.vae_tile or self._automatic_tile(z)
        overlap = self.vae_tile_overlap if self.vae_tile_overlap is not None else (tile or 0) // 4
        images = []
        with attention_slicing(self.attention_slice):
            for one in z.split(1):
                if tile and max(one.shape[-2:]) > tile:
                    one = decode_tiled(self.vae.decode, one, tile, overlap, self.vae_factor, context=overlap)
                else:
                    one = self.vae.decode(one)
                images.append((one.float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(images)

    def _automatic_tile(self, z: torch.Tensor) -> int | None:
        """The tile size where decoding one whole image of ``z`` would not fit in the memory available on the
        pipeline's device (``latentdiff.device.memory_available``), else None."""
        available = memory_available(self.device)
        channels = self.vae.config.ch * self.vae.config.ch_mult[0]  # the decoder's full-resolution level
        tile = automatic_tile(z.shape[-2], z.shape[-1], self.vae_factor, channels, z.element_size(), available)
        if tile is not None:
            height, width = z.shape[-2] * self.vae_factor, z.shape[-1] * self.vae_factor
            logger.warning("decoding in tiles of %d latent pixels: a whole %dx%d decode needs about %d MB, %d MB are "
                           "available (--vae-tile chooses the tile size)", tile, width, height,
                           decode_bytes(height, width, channels, z.element_size()) >> 20, available >> 20)
        return tile

    def sigmas(self, sampler: str, steps: int, strength: float = 1.0, spacing: str | None = None,
               sigma_ramp: str | None = None) -> torch.Tensor:
        """The noise levels ``steps`` steps of ``sampler`` visit (diffusers' conventions under ``levels``), the
        first skipped at ``strength`` < 1; ``spacing`` and ``sigma_ramp`` ("karras", "exponential") override the
        model's scheduler config."""
        return self._levels(sampler, steps, strength, spacing, sigma_ramp)[0]

    def _levels(self, sampler: str, steps: int, strength: float, spacing: str | None, sigma_ramp: str | None
                ) -> tuple[torch.Tensor, str, bool]:
        """(sigmas, spacing, whether the sampler steps between the schedule's own timesteps) for one call.

        An A1111 name brings its ramp ("DPM++ 2M Karras"); the config's ramp applies to the samplers that take any
        sigmas (diffusers' DDIM / PNDM / DDPM ignore ``use_karras_sigmas``), an explicit one fails on the others.
        """
        spec, named_ramp = resolve_sampler(sampler)
        ramp = sigma_ramp or named_ramp or (self.levels.ramp if spec.levels == "sigmas" else None)
        spacing = spacing or self.levels.spacing_for(spec)
        sigmas = sampler_sigmas(self.schedule, spec, steps, self.levels.steps_offset, spacing, strength, ramp)
        return sigmas, spacing, spec.fractional_timesteps

    def _planned(self, run: SamplingOptions, steps: int, strength: float, spacing: str | None,
                 sigma_ramp: str | None) -> tuple[torch.Tensor, SamplingOptions]:
        """The call's sigmas, and its options with the starting noise and the denoiser its scheduler implies."""
        sigmas, spacing, fractional = self._levels(run.sampler, steps, strength, spacing, sigma_ramp)
        prior = "ve" if starts_at_sigma_max(run.sampler, spacing) else "vp"
        denoiser = self.fractional_denoiser if fractional else self.denoiser
        spec = resolve_sampler(run.sampler)[0]
        stepping = diffusers_stepping(self.schedule, spec, steps, self.levels.steps_offset, spacing, strength)
        options = {**stepping, **(run.sampler_options or {})} if stepping else run.sampler_options
        return sigmas, dataclasses.replace(run, sampler=spec.name, prior=prior, denoiser=denoiser,
                                           sampler_options=options)

    def sampling_denoiser(self) -> DiscreteDenoiser:
        return self.denoiser

    def _finish(self, latents: torch.Tensor, decode: bool) -> StableDiffusionOutput:
        return StableDiffusionOutput(self.decode_latents(latents) if decode else None, latents.float().cpu())

    def _size(self, height: int | None, width: int | None) -> tuple[int, int]:
        height, width = height or self.image_size, width or self.image_size
        check_size(height, width, self.size_multiple)
        return height, width

    # ---- tasks ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def text_to_image(self, prompt: str | Sequence[str] | None = "", negative_prompt: str | Sequence[str] | None = None,
                      *, num_images: int = 1, height: int | None = None, width: int | None = None, steps: int = 25,
                      sampler: str = "dpmpp_2m", guidance_scale: float = 7.5, generator: Generator = None,
                      latents: torch.Tensor | None = None, sampler_options: dict[str, Any] | None = None,
                      decode: bool = True, callback: Callable | None = None, progress: bool | None = None,
                      spacing: str | None = None, sigma_ramp: str | None = None,
                      variation: Variation | None = None) -> StableDiffusionOutput:
        """Generate ``num_images`` images per prompt.

        ``generator``: a CPU ``torch.Generator`` or a seed. ``latents``: the initial noise (N, 4, h, w), unit
        normal, as diffusers' ``latents=`` argument (it is scaled for the first noise level here); drawn from the
        generator when None. ``guidance_scale`` 1 skips the unconditional half. ``sampler_options`` go to the
        sampler (e.g. ``{"eta": 1.0}`` for DDIM). ``spacing`` ("leading", "linspace", "trailing") and
        ``sigma_ramp`` ("karras", "exponential") override the model's scheduler config (``sigmas``). ``variation``:
        A1111's variation seed and strength, mixed into the initial noise (``latentdiff.pipelines.variation``).
        """
        run = self._sampling(sampler, steps, generator, sampler_options, callback, progress, variation)
        sigmas, run = self._planned(run, steps, 1.0, spacing, sigma_ramp)
        height, width = self._size(height, width)
        cond, uncond, batch = self._conditioning(prompt, negative_prompt, num_images)
        shape = (batch, self.latent_channels, height // self.vae_factor, width // self.vae_factor)
        noise = self._noise(latents, shape, run)
        out = self._denoise(sigmas, noise, cond, uncond, guidance_scale, run)
        return self._finish(out, decode)

    @torch.no_grad()
    def image_to_image(self, image: ImageInput, prompt: str | Sequence[str] | None = "",
                       negative_prompt: str | Sequence[str] | None = None, *, strength: float = 0.6,
                       num_images: int = 1, steps: int = 25, sampler: str = "dpmpp_2m", guidance_scale: float = 7.5,
                       generator: Generator = None, noise: torch.Tensor | None = None, sample_posterior: bool = True,
                       sampler_options: dict[str, Any] | None = None, decode: bool = True,
                       callback: Callable | None = None, progress: bool | None = None, spacing: str | None = None,
                       sigma_ramp: str | None = None, variation: Variation | None = None) -> StableDiffusionOutput:
        """SDEdit (Meng et al. 2022): encode the image, noise it to the level ``strength`` of the way up, denoise.

        As diffusers' img2img: ``int(steps * strength)`` of the ``steps`` levels are run; the image's latent is a
        posterior sample drawn from the generator first (``sample_posterior=False``: the posterior mean), then the
        noise (``noise`` overrides it). ``image``: one image for all prompts or one per prompt, sides multiples of
        ``size_multiple``. ``spacing``, ``sigma_ramp``, ``variation``: as ``text_to_image``.
        """
        run = self._sampling(sampler, steps, generator, sampler_options, callback, progress, variation)
        pixels = to_image_tensor(image)
        check_size(pixels.shape[-2], pixels.shape[-1], self.size_multiple, "init image")
        sigmas, run = self._planned(run, steps, strength, spacing, sigma_ramp)
        cond, uncond, batch = self._conditioning(prompt, negative_prompt, num_images)
        init = self._encode(pixels * 2 - 1, run.generator if sample_posterior else None)
        init = per_image(init, batch, num_images, "init image")
        noise = self._noise(noise, tuple(init.shape), run)
        return self._finish(self._denoise(sigmas, noise, cond, uncond, guidance_scale, run, init=init), decode)

    @torch.no_grad()
    def inpaint(self, image: ImageInput, mask: ImageInput, prompt: str | Sequence[str] | None = "",
                negative_prompt: str | Sequence[str] | None = None, *, strength: float = 1.0, num_images: int = 1,
                steps: int = 25, sampler: str = "dpmpp_2m", guidance_scale: float = 7.5, generator: Generator = None,
                latents: torch.Tensor | None = None, sample_posterior: bool = True, keep_unmasked: bool = False,
                sampler_options: dict[str, Any] | None = None, decode: bool = True, callback: Callable | None = None,
                progress: bool | None = None, spacing: str | None = None,
                sigma_ramp: str | None = None, variation: Variation | None = None) -> StableDiffusionOutput:
        """Repaint where ``mask`` is white (>= 0.5), keep the rest; as diffusers' ``StableDiffusionInpaintPipeline``.

        With an inpainting UNet (9 channels) the mask and the latent of the masked image (pixels to repaint set to
        grey) are extra inputs at every step. With a text-to-image UNet the region to keep is re-imposed from the
        original's latent, noised to each step's level, and pasted clean at the end
        (``latentdiff.diffusion.sampling.KnownRegion``). ``latents``: the initial unit-normal noise, also the noise
        of the re-imposed region. ``strength`` < 1 starts from the image noised with it (diffusers starts from the
        noise alone when given ``latents``, whatever the strength). ``keep_unmasked`` pastes the original pixels
        back outside the mask (the autoencoder alters them slightly otherwise). ``spacing``, ``sigma_ramp``,
        ``variation``: as ``text_to_image``.
        """
        run = self._sampling(sampler, steps, generator, sampler_options, callback, progress, variation)
        pixels = to_image_tensor(image)
        masks = to_mask_tensor(mask)
        if masks.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"the mask is {masks.shape[-1]}x{masks.shape[-2]} but the image is "
                             f"{pixels.shape[-1]}x{pixels.shape[-2]}; they must be the same size")
        check_size(pixels.shape[-2], pixels.shape[-1], self.size_multiple, "image")
        sigmas, run = self._planned(run, steps, strength, spacing, sigma_ramp)
        full_strength = strength == 1.0
        post_gen = run.generator if sample_posterior else None
        cond, uncond, batch = self._conditioning(prompt, negative_prompt, num_images)
        h, w = pixels.shape[-2] // self.vae_factor, pixels.shape[-1] // self.vae_factor
        # The generator in diffusers' order: image latent (text-to-image UNet, or strength < 1), noise, masked image.
        image_latents = None
        if not self.is_inpainting_model or not full_strength:
            image_latents = per_image(self._encode(pixels * 2 - 1, post_gen), batch, num_images, "image")
        noise = self._noise(latents, (batch, self.latent_channels, h, w), run)
        latent_mask = per_image(F.interpolate(masks, size=(h, w)), batch, num_images, "mask").to(self.device)
        if self.is_inpainting_model:
            masked_latents = self._encode((pixels * 2 - 1) * (masks < 0.5), post_gen)
            extra = torch.cat([latent_mask, per_image(masked_latents, batch, num_images, "image")], dim=1)
            cond = dict(cond, concat=extra)
            uncond = None if uncond is None else dict(uncond, concat=extra)
        elif sample_posterior:
            # diffusers encodes the masked image even for a 4-channel UNet, which does not use it; draw the same
            # numbers so that later draws (ancestral samplers) match.
            draw_noise((pixels.shape[0], self.latent_channels, h, w), run.generator)
        out = self._inpaint_latents(sigmas, noise, image_latents, latent_mask, not self.is_inpainting_model, cond,
                                    uncond, guidance_scale, run, full_strength)
        result = self._finish(out, decode)
        if keep_unmasked and result.images is not None:
            result.images = self._keep_unmasked(result.images, per_image(masks, batch, num_images, "mask"),
                                                 per_image(pixels, batch, num_images, "image"))
        return result


__all__ = ["PARAMETERIZATIONS", "StableDiffusionOutput", "StableDiffusionPipeline"]
