"""The latent diffusion model: a frozen first stage, the denoising UNet and its noise schedule in one module.

Training works on scaled latents z0 = scale_factor * E(x) (a sample of the KL posterior, the quantised latent of
a VQ model, or the image itself in pixel space); sampling runs a sampler over the UNet's denoiser and decodes
z0 / scale_factor back to an image. The module's state dict uses CompVis' names: the UNet under
``model.diffusion_model.*`` and the first stage under ``first_stage_model.*``.

The conditioning is a dict with the optional keys of ``UNetModel.forward``: ``context`` (cross-attention tokens),
``context_mask``, ``y`` (class labels) and ``concat`` (extra input channels). Modes:

- "none": unconditional;
- "class": labels through the UNet's label embedding, with one extra "null" class for classifier-free guidance
  (dropped with ``class_dropout``);
- "crossattn", "concat", "hybrid" (both): a ``Conditioner`` (``config.conditioner``, see
  ``latentdiff.conditioning.conditioner``) turns captions, class maps, images and labels into the dict, with
  per-input dropout for guidance. It is the module's ``cond_stage_model`` (CompVis' name): its trainable weights
  (a jointly trained text encoder, class-map token embeddings) train with the UNet and are saved under
  ``cond_stage_model.*``; a frozen pretrained text encoder (MiniLM) is not saved but reloaded from its package,
  while a frozen CLIP (Stable Diffusion's) is saved, under ``cond_stage_model.transformer.*`` as SD v1 files do.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from latentdiff.autoencoder.distributions import DiagonalGaussian
from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.conditioning.conditioner import Conditioner, ConditionerConfig
from latentdiff.conditioning.embedders.registry import registered_input_keys
from latentdiff.config import check_ranges
from latentdiff.diffusion.conditioning import COND_KEYS, check_unet_fits, encode_conditioning, guidance_pair
from latentdiff.diffusion.denoiser import DiscreteDenoiser
from latentdiff.diffusion.noise_levels import apply_strength, get_sigmas_discrete, get_sigmas_karras
from latentdiff.diffusion.objectives import DiffusionLossConfig, diffusion_loss, sample_noise, sample_timesteps
from latentdiff.diffusion.process import q_sample
from latentdiff.diffusion.samplers import get_sampler
from latentdiff.diffusion.sampling import sample as run_sampler
from latentdiff.diffusion.schedule import NoiseSchedule, ScheduleConfig
from latentdiff.diffusion.unet import UNetConfig, UNetModel

logger = logging.getLogger(__name__)

CONDITIONING_MODES = ("none", "class", "crossattn", "concat", "hybrid")
CONDITIONER_MODES = ("crossattn", "concat", "hybrid")  # the modes a Conditioner drives


def _small_unet() -> UNetConfig:
    # A UNet for small latents (8x8 to 32x32) without cross-attention; SD's 860M UNet is UNetConfig.sd_v1().
    return UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=2,
                      attention_resolutions=(2,), num_heads=-1, num_head_channels=32, context_dim=None,
                      use_spatial_transformer=False)


@dataclass
class LatentDiffusionConfig:
    """What a latent (or pixel-space) diffusion model is made of; saved with its weights.

    ``first_stage`` is the path of a native autoencoder checkpoint (file, checkpoint folder or run folder); ""
    means pixel space (an identity first stage, f = 1, scale factor 1). ``first_stage_config`` is filled in from
    that checkpoint when the model is built, so a saved model rebuilds without the original file.
    ``scale_factor`` 0 means: 1 / std of the first training batch's latents, computed once and then stored
    (Rombach et al. 2022, sec. 4.3.2 and app. G; SD's KL-f8 uses 0.18215). ``image_size`` and ``channels``
    describe the images (0: taken from the data config by the trainer). With ``conditioning: class`` the UNet
    gets ``num_classes + 1`` label embeddings: index ``num_classes`` is the null class that replaces a label
    with probability ``class_dropout`` in training, which is the unconditional model for classifier-free
    guidance.

    With ``conditioning`` "crossattn", "concat" or "hybrid", ``conditioner`` says which inputs condition the model
    (``ConditionerConfig``); the mode must match what it produces (context tokens, concat channels, or both).
    ``unet.context_dim`` (and ``unet.num_classes`` for conditioner labels) are filled in from it when unset;
    ``unet.in_channels`` counts the concatenated channels (the latent's + the conditioner's) and
    ``unet.out_channels`` the latent's.
    """

    first_stage: str = ""
    first_stage_config: AutoencoderConfig | None = None
    sample_posterior: bool = True  # KL first stage: train on z ~ q(z|x) (True) or on its mean
    scale_factor: float = 0.0
    image_size: int = 0
    channels: int = 0
    unet: UNetConfig = field(default_factory=_small_unet)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    conditioning: str = "none"  # "none" | "class" | "crossattn" | "concat" | "hybrid"
    num_classes: int = 0
    class_dropout: float = 0.1
    conditioner: ConditionerConfig | None = None

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONING_MODES:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; choose one of "
                             f"{', '.join(CONDITIONING_MODES)}")
        check_ranges(self, non_negative=("image_size", "channels", "num_classes"), fractions=("class_dropout",))
        if self.scale_factor < 0:
            raise ValueError(f"scale_factor must be positive, or 0 to compute it, got {self.scale_factor}")
        if self.conditioning in CONDITIONER_MODES:
            self._check_conditioner()
            return
        if self.conditioner is not None:
            raise ValueError(f"model.conditioner is set but conditioning is {self.conditioning!r}; use one of "
                             f"{', '.join(CONDITIONER_MODES)}")
        if self.conditioning == "class":
            if self.num_classes < 1:
                raise ValueError("conditioning 'class' needs model.num_classes >= 1")
            if not self.unet.num_classes:
                self.unet.num_classes = self.num_classes + 1  # the extra index is the null class
            elif self.unet.num_classes != self.num_classes + 1:
                raise ValueError(f"model.unet.num_classes must be num_classes + 1 = {self.num_classes + 1} (the last "
                                 f"embedding is the null class for guidance), got {self.unet.num_classes}")
        elif self.unet.num_classes:
            raise ValueError("model.unet.num_classes is set but conditioning is 'none'; set conditioning: class")
        if self.conditioning in ("none", "class") and self.unet.context_dim:
            raise ValueError(f"model.unet.context_dim is {self.unet.context_dim} but conditioning "
                             f"{self.conditioning!r} gives no context; set model.unet.context_dim to null")
        if self.unet.out_channels != self.unet.in_channels:
            raise ValueError(f"model.unet.out_channels ({self.unet.out_channels}) must equal in_channels "
                             f"({self.unet.in_channels}): the UNet predicts a latent-shaped target")

    def _check_conditioner(self) -> None:
        if self.conditioner is None:
            raise ValueError(f"conditioning {self.conditioning!r} needs model.conditioner (which inputs, which text "
                             "encoder)")
        check_unet_fits(self.conditioner, self.conditioning, self.unet, self.num_classes)

    @property
    def pixel_space(self) -> bool:
        return not self.first_stage and self.first_stage_config is None


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (CompVis' name) and passes it the conditioning dict's entries."""

    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor | None) -> torch.Tensor:
        unknown = sorted(set(cond) - set(COND_KEYS))
        if unknown:
            raise ValueError(f"unknown conditioning keys {unknown}; the UNet takes {', '.join(COND_KEYS)}")
        return self.diffusion_model(x, t, **cond)


class LatentDiffusion(nn.Module):
    """A frozen first stage, the UNet (``model.diffusion_model``) and the noise schedule.

    The first stage comes from, in order: the ``first_stage`` module argument; an empty autoencoder built from
    ``config.first_stage_config`` (whose weights the caller loads from an LDM checkpoint); else pixel space. The
    constructor reads no file: ``latentdiff.formats.native.build_latent_diffusion`` loads ``config.first_stage``.
    It is frozen: eval mode, no gradients, and never returned by ``trainable_parameters``.
    """

    def __init__(self, config: LatentDiffusionConfig, first_stage: Autoencoder | None = None) -> None:
        super().__init__()
        # The model owns a copy: what building it fills in (the first stage's config, a pixel model's scale
        # factor, the text encoder's identity) is recorded in ``self.config``, never in the caller's object.
        config = copy.deepcopy(config)
        self.config = config
        if first_stage is None and config.first_stage_config is None and config.first_stage:
            raise ValueError(f"model.first_stage names the checkpoint {config.first_stage!r}: load it first "
                             "(latentdiff.formats.native.build_latent_diffusion) and pass it as first_stage")
        if first_stage is not None:
            config.first_stage_config = first_stage.config
        elif config.first_stage_config is not None:
            first_stage = Autoencoder(config.first_stage_config)
        self.first_stage_model: nn.Module = first_stage if first_stage is not None else nn.Identity()
        self.first_stage_model.eval().requires_grad_(False)
        self._check_channels()
        if self.pixel_space:
            if config.scale_factor not in (0.0, 1.0):
                raise ValueError(f"a pixel-space model keeps the images' [-1, 1] range: scale_factor must be 1 "
                                 f"(or 0), got {config.scale_factor}")
            config.scale_factor = 1.0
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.schedule = NoiseSchedule(config.schedule)
        self.cond_stage_model: Conditioner | None = None
        if config.conditioner is not None:
            self.cond_stage_model = Conditioner(config.conditioner, config.image_size, self.image_channels,
                                                self.latent_channels, config.image_size // self.downsample_factor)

    # ------------------------------------------------------------------------------------------ structure

    def _check_channels(self) -> None:
        c = self.config
        latent = self.latent_channels
        where = (f"the first stage's embed_dim ({latent})" if not self.pixel_space
                 else f"the image channels ({latent}) in pixel space")
        if c.conditioner is not None and c.conditioner.has_concat:
            if not c.image_size:
                raise ValueError("concat conditioning needs model.image_size (or data.image_size) to size its inputs")
            side = c.image_size // self.downsample_factor
            extra = c.conditioner.concat_channels(self.image_channels, latent, c.image_size, side)
            if c.unet.out_channels != latent:
                raise ValueError(f"model.unet.out_channels ({c.unet.out_channels}) must equal {where}")
            if c.unet.in_channels != latent + extra:
                raise ValueError(f"model.unet.in_channels ({c.unet.in_channels}) must be {latent + extra}: {latent} "
                                 f"latent channels ({where}) + {extra} concatenated by the conditioner")
        elif c.unet.in_channels != latent:
            raise ValueError(f"model.unet.in_channels ({c.unet.in_channels}) and out_channels must equal {where}")
        if c.conditioner is not None and not c.image_size:
            raise ValueError("a conditioner needs model.image_size (or data.image_size)")
        if not self.pixel_space:
            fs = self.first_stage_model.config
            if c.channels and fs.in_channels != c.channels:
                raise ValueError(f"the first stage takes {fs.in_channels}-channel images but the data has "
                                 f"{c.channels} channels")
        f = self.downsample_factor * c.unet.downsample_factor
        if c.image_size and c.image_size % f:
            raise ValueError(f"image_size {c.image_size} must be divisible by {f} (first-stage factor "
                             f"{self.downsample_factor} x UNet factor {c.unet.downsample_factor})")

    @property
    def pixel_space(self) -> bool:
        return isinstance(self.first_stage_model, nn.Identity)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def downsample_factor(self) -> int:
        return 1 if self.pixel_space else self.first_stage_model.downsample_factor

    @property
    def latent_channels(self) -> int:
        if self.pixel_space:
            if not self.config.channels:
                return self.config.unet.out_channels  # unknown image channels: trust the UNet
            return self.config.channels
        return self.first_stage_model.config.embed_dim

    @property
    def image_channels(self) -> int:
        if self.config.channels:
            return self.config.channels
        return self.latent_channels if self.pixel_space else self.first_stage_model.config.in_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the latents the UNet works on."""
        if not self.config.image_size:
            raise ValueError("model.image_size is not set, so the latent size is unknown")
        side = self.config.image_size // self.downsample_factor
        return self.latent_channels, side, side

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet's parameters, then the conditioner's trainable ones (a jointly trained text encoder...)."""
        return [p for p in self.model.parameters() if p.requires_grad] + self.conditioner_parameters()

    def conditioner_parameters(self) -> list[nn.Parameter]:
        if self.cond_stage_model is None:
            return []
        return [p for p in self.cond_stage_model.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.first_stage_model.eval()  # frozen: never in training mode (VQ statistics, dropout)
        return self

    # ------------------------------------------------------------------------------------------ first stage

    @torch.no_grad()
    def first_stage_parameters(self, x: torch.Tensor) -> torch.Tensor:
        """What the trainer caches per image: the posterior's (mean, logvar) channels (KL), the quantised
        latent (VQ), or the image itself (pixel space). Not scaled."""
        if self.pixel_space:
            return x
        if self.first_stage_model.config.regularizer == "kl":
            return self.first_stage_model.encode_pre_quant(x)
        return self.first_stage_model.encode(x)

    @property
    def samples_posterior(self) -> bool:
        """Whether ``latents_from_parameters`` draws z ~ q(z|x) (a KL first stage with ``sample_posterior``)."""
        return (not self.pixel_space and self.first_stage_model.config.regularizer == "kl"
                and self.config.sample_posterior)

    def latents_from_parameters(self, params: torch.Tensor, generator: torch.Generator | None = None,
                                noise: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled latents from ``first_stage_parameters``: z ~ q(z|x) (or its mean) for KL, else as given.
        The posterior's standard normal ``noise`` may be given instead of drawn from ``generator``."""
        if self.pixel_space or self.first_stage_model.config.regularizer != "kl":
            return params
        posterior = DiagonalGaussian(params)
        if not self.config.sample_posterior:
            return posterior.mode()
        if noise is not None:
            return posterior.mean + posterior.std * noise.to(posterior.mean)
        return posterior.sample(generator)

    def set_scale_factor_from(self, latents: torch.Tensor) -> float:
        """Set the scale factor to 1 / std of (unscaled) ``latents`` when it is not yet set; returns it."""
        if self.config.scale_factor == 0:
            std = float(latents.detach().float().flatten().std())
            if not math.isfinite(std) or std == 0:
                raise ValueError(f"cannot compute the latent scale factor: the latents' std is {std}")
            self.config.scale_factor = 1.0 / std
            logger.info("latent scale factor set to %.6f (1 / std of %d latent values)", 1.0 / std, latents.numel())
        return self.config.scale_factor

    def _require_scale(self) -> float:
        if self.config.scale_factor == 0:
            raise ValueError("the latent scale factor is not set yet (0): call set_scale_factor_from(latents) "
                             "or give model.scale_factor")
        return self.config.scale_factor

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> scaled latents z0 = scale_factor * E(x)."""
        z = self.latents_from_parameters(self.first_stage_parameters(x), generator)
        return z * self._require_scale()

    @property
    def has_mask_decoder(self) -> bool:
        """Whether the first stage has a mask-conditioned inpainting decoder (``mask_decoder: true``)."""
        return not self.pixel_space and bool(getattr(self.first_stage_model.config, "mask_decoder", False))

    @torch.no_grad()
    def decode(self, z: torch.Tensor, image: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents -> images (unclamped). A VQ first stage snaps the latents to its codebook first, as
        CompVis does for VQ-based LDMs. With ``image`` (in [-1, 1]) and ``mask`` (1 = repainted), a first stage
        with a mask decoder decodes with the known pixels (``Autoencoder.decode_masked``)."""
        z = z / self._require_scale()
        if self.pixel_space:
            return z
        fs = self.first_stage_model
        if fs.config.regularizer == "vq":
            z = fs.quantize(z).quantized
        if image is not None and mask is not None:
            return fs.decode_masked(z, image.to(z.dtype), mask.to(z.dtype))
        return fs.decode(z)

    # ------------------------------------------------------------------------------------------ diffusion

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The UNet's output (eps, x0 or v) for noisy latents ``x_t`` at timesteps ``t``."""
        return self.model(x_t, t, **(cond or {}))

    def drop_class_labels(self, y: torch.Tensor, generator: torch.Generator | None = None,
                          uniform: torch.Tensor | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``class_dropout``: where ``uniform`` (U(0, 1)
        values, one per label, drawn from ``generator`` when not given) is below it."""
        p = self.config.class_dropout
        if p <= 0:
            return y
        if uniform is None:
            gen_device = generator.device if generator is not None else y.device
            uniform = torch.rand(y.shape, generator=generator, device=gen_device)
        drop = uniform.to(y.device) < p
        return torch.where(drop, torch.full_like(y, self.null_class), y)

    def prepare_cond(self, cond: dict[str, torch.Tensor] | None, n: int) -> dict[str, torch.Tensor]:
        """Check the conditioning dict against the model's mode; a class model without ``y`` gets the null class."""
        cond = dict(cond or {})
        unknown = sorted(set(cond) - set(COND_KEYS))
        if unknown:
            raw = sorted(set(unknown) & set(registered_input_keys()))
            if raw and self.cond_stage_model is None:
                raise ValueError(f"this model (conditioning: {self.config.conditioning}) has no conditioner for the "
                                 f"inputs {raw}")
            raise ValueError(f"unknown conditioning keys {unknown}; expected some of {', '.join(COND_KEYS)}")
        if self.config.conditioning == "class":
            y = cond.get("y")
            if y is None:
                cond["y"] = torch.full((n,), self.null_class, dtype=torch.long)
            else:
                y = torch.as_tensor(y, dtype=torch.long)
                if y.ndim == 0:
                    y = y.expand(n)
                if y.shape != (n,):
                    raise ValueError(f"class labels must have shape ({n},), got {tuple(y.shape)}")
                if bool((y < 0).any()) or bool((y > self.null_class).any()):
                    raise ValueError(f"class labels must be in [0, {self.config.num_classes - 1}] (or "
                                     f"{self.null_class}, the null class), got {sorted(set(y.tolist()))}")
                cond["y"] = y
        elif cond.get("y") is not None and self.config.conditioning == "none":
            raise ValueError("this model is unconditional (conditioning: none) but class labels were given")
        return cond

    def loss(self, z0: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
             generator: torch.Generator | None = None,
             network: nn.Module | None = None,
             draws: dict[str, torch.Tensor] | None = None,
             inputs: dict[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss on scaled latents ``z0``: timesteps and noise (and class dropout) from ``generator``,
        or given in ``draws`` (``draw_training_noise``'s "t", "noise", "dropout", and the conditioner's
        "cond_dropout" / "inpaint_box"; e.g. a rank's rows of the global batch's draws under DDP).

        A model with a conditioner takes its inputs in ``inputs`` (a batch's captions, class maps, images, labels,
        or ``Conditioner.prepare``'s tensors, e.g. from the latent cache); they are encoded here, with the
        per-input dropout while training, so that a jointly trained text encoder gets its gradients. An inpainting
        batch without masks gets the random boxes of ``draws["inpaint_box"]``. ``cond`` may instead hold a ready
        UNet conditioning dict.

        ``network`` replaces ``self.model`` in the forward pass (the trainer passes its DDP wrapper of it).
        """
        n, device = z0.shape[0], z0.device
        if draws is None:
            draws = self.draw_training_noise(n, generator, with_posterior=False, latent_shape=tuple(z0.shape[1:]))
        if self.cond_stage_model is not None and (inputs is not None or cond is None):
            drop = self.cond_stage_model.dropout_mask(draws["cond_dropout"]) if self.training else None
            cond = self.encode_conditioning(inputs or {}, n, drop=drop, mask_uniform=draws.get("inpaint_box"))
        else:
            if inputs is not None:
                raise ValueError(f"this model (conditioning: {self.config.conditioning}) has no conditioner for "
                                 "the inputs given")
            cond = self.prepare_cond(cond, n)
            if self.config.conditioning == "class" and self.training:
                cond["y"] = self.drop_class_labels(cond["y"], uniform=draws["dropout"])
        cond = {k: v.to(device) for k, v in cond.items()}
        t, noise = draws["t"].to(device), draws["noise"].to(device, torch.float32)
        z0 = z0.float()
        x_t = q_sample(self.schedule, z0, t, noise)
        output = (network or self.model)(x_t, t, **cond)
        return diffusion_loss(self.config.loss, self.schedule, output.float(), z0, noise, t)

    def draw_training_noise(self, n: int, generator: torch.Generator | None = None, with_posterior: bool = True,
                            latent_shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
        """Every random number one training step needs for ``n`` samples, on the generator's device, in a fixed
        order: "posterior" (the KL posterior's N(0, I) noise, when it is sampled), "dropout" (U(0, 1) per label),
        "t" (uniform timesteps), "noise" (the diffusion noise, with offset noise if configured) and, with a
        conditioner, its "cond_dropout" (U(0, 1) per sample and input) and "inpaint_box" (inpainting masks).

        Drawing for the *global* batch and keeping a rank's rows (``[rank::world]``, as the batch sampler
        shards) gives every sample the same randomness whatever the number of processes, so W processes with
        batch B train exactly like one with W * B. The conditioner's numbers come last, so the draws of models
        without one are what they always were.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        shape = (n, *(latent_shape or self.latent_shape))
        draws: dict[str, torch.Tensor] = {}
        if with_posterior and self.samples_posterior:
            draws["posterior"] = torch.randn(shape, generator=generator, device=gen_device)
        draws["dropout"] = torch.rand((n,), generator=generator, device=gen_device)
        draws["t"] = sample_timesteps(n, self.schedule, generator, gen_device)
        draws["noise"] = sample_noise(shape, generator, self.config.loss.offset_noise, gen_device, torch.float32)
        if self.cond_stage_model is not None:
            draws.update(self.cond_stage_model.draw(n, generator, gen_device))
        return draws

    # ------------------------------------------------------------------------------------------ conditioner

    @torch.no_grad()
    def encode_condition_image(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> scaled latents for conditioning (masked images, low-res images): the posterior's mode, so
        that the same image always gives the same conditioning."""
        params = self.first_stage_parameters(x.to(next(self.model.parameters()).device))
        if not self.pixel_space and self.first_stage_model.config.regularizer == "kl":
            params = params.chunk(2, dim=1)[0]  # the mean of (mean, logvar)
        return params * self._require_scale()

    def encode_conditioning(self, inputs: dict[str, Any], n: int, drop: torch.Tensor | None = None,
                            mask_uniform: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning dict from raw or prepared inputs (captions, class maps, images, labels; a
        missing input counts as dropped). ``drop`` (n, columns) bool drops embedders (see ``Conditioner.forward``);
        ``mask_uniform`` (n, 5) draws inpainting boxes for an inpainting batch that brings no mask."""
        draws = {} if mask_uniform is None else {"inpaint_box": mask_uniform}
        return encode_conditioning(self._conditioner(), inputs, n, self.encode_condition_image, drop, draws)

    def _conditioner(self) -> Conditioner:
        if self.cond_stage_model is None:
            raise ValueError(f"this model (conditioning: {self.config.conditioning}) has no conditioner")
        return self.cond_stage_model

    def _guidance_pair(self, cond: dict[str, Any] | None, uncond: dict[str, Any] | None, n: int,
                       need_uncond: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """(cond, uncond) UNet dicts for a conditioner model: see ``latentdiff.diffusion.conditioning``."""
        return guidance_pair(self._conditioner(), cond, uncond, n, self.encode_condition_image, need_uncond)

    def denoiser(self) -> DiscreteDenoiser:
        """D(x, sigma, **cond) -> x0 over this model's UNet, for the samplers."""
        return DiscreteDenoiser(self.model, self.schedule, self.config.loss.parameterization)

    def sigmas(self, steps: int, karras: bool = False, spacing: str = "trailing", strength: float = 1.0
               ) -> torch.Tensor:
        """The sampler's noise levels: ``steps`` of the schedule's own (``spacing``) or a Karras ramp, then 0;
        ``strength`` < 1 skips the first levels as img2img does (``noise_levels.apply_strength``).

        "trailing" (Lin et al. 2023) starts at the last timestep, so sampling starts from pure noise as in
        training; CompVis' "leading" starts slightly below it.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if karras:
            sigmas = get_sigmas_karras(steps, self.schedule.sigma_min, self.schedule.sigma_max)
        else:
            sigmas = get_sigmas_discrete(self.schedule, min(steps, self.schedule.num_timesteps), spacing=spacing)
        return apply_strength(sigmas, strength)

    @torch.no_grad()
    def sample(self, n: int, sampler: str = "ddim", steps: int = 50, generator: torch.Generator | None = None,
               cond: dict[str, Any] | None = None, guidance_scale: float = 1.0, karras: bool = False,
               spacing: str = "trailing", decode: bool = True, disable_progress: bool | None = True,
               uncond: dict[str, Any] | None = None, sigmas: torch.Tensor | None = None,
               **sampler_options: float) -> torch.Tensor:
        """``n`` images in [-1, 1] (or latents with ``decode=False``) from ``steps`` steps of ``sampler``.

        ``sigmas`` gives the noise levels explicitly (decreasing), instead of ``steps``/``karras``/``spacing``:
        e.g. Stable Diffusion's, ``latentdiff.diffusion.noise_levels.sampler_sigmas``. When they end above 0 (DDIM and
        PLMS stop at alphas_cumprod[0], as CompVis' do) the result is that level's variance-preserving latent
        x / sqrt(1 + sigma^2), as CompVis returns it.

        The initial and sampler noise come from ``generator`` (create it on the CPU: the same seed then gives the
        same images on every device). ``cond["y"]`` holds class labels for a class model (default: the null
        class, i.e. unconditional samples); ``guidance_scale`` != 1 applies classifier-free guidance with the null
        class as the unconditional branch.

        A model with a conditioner takes its inputs in ``cond``: ``{"caption": [...]}`` (one string is used for
        all ``n``), ``class_map`` (N, H, W), ``lowres`` (N, C, s, s), ``image`` + ``mask`` (inpainting; mask 1
        where to fill in), ``label``; or a ready UNet dict. Missing inputs are unconditional. The guidance branch
        is ``uncond``: by default the inputs trained with dropout replaced by their unconditional versions (the
        empty caption); ``uncond={"caption": "a negative prompt"}`` replaces the caption instead.
        """
        sampler_spec = get_sampler(sampler)
        device = next(self.model.parameters()).device
        was_training = self.training
        self.eval()
        try:
            denoiser = self.denoiser()
            if self.cond_stage_model is not None:
                cond, guide = self._guidance_pair(cond, uncond, n, need_uncond=guidance_scale != 1.0)
                if guidance_scale != 1.0 and guide is None:
                    raise ValueError("classifier-free guidance needs an unconditional branch, but this model was "
                                     "trained without conditioning dropout; give uncond (e.g. a negative prompt)")
            else:
                cond = self.prepare_cond(cond, n)
                guide = None
                if guidance_scale != 1.0:
                    if self.config.conditioning != "class":
                        raise ValueError("classifier-free guidance needs a conditional model; this one is "
                                         "unconditional")
                    guide = (self.prepare_cond(uncond, n) if uncond is not None
                             else dict(cond, y=torch.full((n,), self.null_class, dtype=torch.long)))
            cond = {k: v.to(device) for k, v in cond.items()}
            guide = {k: v.to(device) for k, v in guide.items()} if guidance_scale != 1.0 else None
            if sigmas is None:
                sigmas = self.sigmas(steps, karras, spacing)
            sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
            z = run_sampler(denoiser, (n, *self.latent_shape), sigmas, sampler_spec, generator=generator,
                            extra_args=cond, uncond=guide, guidance_scale=guidance_scale, device=device,
                            disable=disable_progress, **sampler_options)
            return self.decode(z).clamp(-1, 1) if decode else z
        finally:
            self.train(was_training)

