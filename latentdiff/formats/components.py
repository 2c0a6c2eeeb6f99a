"""The one in-memory form every checkpoint format reads into and writes from, and the contract a format meets.

A format is a :class:`CheckpointFormat`: a cheap ``detect(path)``, a ``read(path, options)`` into
:class:`StableDiffusionComponents` and, where the format can be written, a ``write(comps, path)``. The registry
(``latentdiff.formats.registry``) lists them in detection order.

The components keep each part in the names our models use. On disk, the original single file and our native
files share one layout: the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, a CLIP text
encoder under ``cond_stage_model.transformer.`` (or OpenCLIP's tower under ``cond_stage_model.model.``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiff.autoencoder.model import AutoencoderConfig
from latentdiff.conditioning.conditioner import ConditionerConfig
from latentdiff.config import ConfigError, from_dict
from latentdiff.diffusion.schedule import ScheduleConfig
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.formats.diffusers_names import SD_SCALE_FACTOR
from latentdiff.io.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD v1: a Hugging Face CLIPTextModel, its own names
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD v2: OpenCLIP's text tower
POSITION_IDS = "text_model.embeddings.position_ids"
_CLIP_TEXT_MODULES = ("embeddings.", "encoder.", "final_layer_norm.")


@dataclass
class StableDiffusionComponents:
    """The parts of a Stable Diffusion checkpoint, each a state dict in the names our code uses.

    ``unet`` and ``vae`` are in our (CompVis) names without prefixes and load into ``UNetModel(unet_config)`` and
    ``Autoencoder(vae_config)``. ``text_encoder`` is in Hugging Face ``CLIPTextModel`` names as published files spell
    them (``text_model.encoder.…``); ``text_encoder_layout`` says how an original single file stores it ("hf" for
    SD v1's CLIP ViT-L, "openclip" for SD v2's ViT-H). ``text_encoder_output_layer`` is "penultimate" when the
    conditioning is the output of the second-to-last layer (SD v2's whole 24-layer tower, as original files store
    it; diffusers stores the same model as 23 layers, "last").
    """

    unet: dict[str, torch.Tensor] | None = None
    unet_config: UNetConfig | None = None
    vae: dict[str, torch.Tensor] | None = None
    vae_config: AutoencoderConfig | None = None
    text_encoder: dict[str, torch.Tensor] | None = None
    text_encoder_layout: str | None = None
    text_encoder_config: dict[str, Any] | None = None  # the Hugging Face CLIPTextConfig, when known
    text_encoder_output_layer: str = "last"  # "last" or "penultimate", as latentdiff.conditioning.clip names them
    scale_factor: float = SD_SCALE_FACTOR
    prediction_type: str = "epsilon"  # diffusers' name; weights cannot tell eps (SD 1.x, 2-base) from v (2-768-v)
    image_size: int | None = None  # pixels; unknown for original files
    tokenizer_dir: Path | None = None  # a diffusers tokenizer/ folder to carry along
    scheduler_config: dict[str, Any] | None = None  # a diffusers folder's scheduler_config.json (None: SD 1.5's)
    pad_token_id: int | None = None  # the tokenizer's padding id when the source says (a native model's config)
    source: str = ""  # "original", "diffusers" or "native"
    ema: bool = False  # the UNet weights are the checkpoint's EMA copy
    # Native models only: their noise schedule and conditioner (None for the other formats, which are SD's).
    schedule: ScheduleConfig | None = None
    conditioner: ConditionerConfig | None = None

    def to(self, dtype: torch.dtype) -> StableDiffusionComponents:
        """A copy with every floating-point tensor cast to ``dtype``."""
        def cast(sd: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            if sd is None:
                return None
            return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        return dataclasses.replace(self, unet=cast(self.unet), vae=cast(self.vae), text_encoder=cast(self.text_encoder))

    def describe(self) -> str:
        """One line saying what is inside, for the command line."""
        def count(sd: dict[str, torch.Tensor]) -> str:
            return f"{sum(v.numel() for v in sd.values()) / 1e6:.1f}M parameters"
        parts = []
        if self.unet is not None:
            c = self.unet_config
            heads = f"{c.num_heads} heads" if c.num_head_channels == -1 else f"{c.num_head_channels}-wide heads"
            parts.append(f"UNet ({count(self.unet)}, in {c.in_channels}, context {c.context_dim}, {heads}"
                         f"{', EMA' if self.ema else ''})")
        if self.vae is not None:
            parts.append(f"VAE ({count(self.vae)}, f{self.vae_config.downsample_factor}, "
                         f"scale {self.scale_factor:g})")
        if self.text_encoder is not None:
            parts.append(f"text encoder ({count(self.text_encoder)}, {self.text_encoder_layout} layout)")
        return ", ".join(parts) or "nothing"


@dataclass(frozen=True)
class ReadOptions:
    """What a reader is asked for. ``ema``: the UNet's EMA copy when the file holds one. ``text_encoder=False``
    leaves the text encoder out. ``text_encoder_converter`` maps an SD v2 OpenCLIP text tower to ``CLIPTextModel``
    names (default: ``latentdiff.conditioning.clip.openclip_to_hf``). ``strict``: keys of no component are an
    error (else a warning). ``config``: the original YAML of a single file (``formats.original_config``). A format
    reads the options that apply to it."""

    ema: bool = True
    text_encoder: bool = True
    text_encoder_converter: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    strict: bool = True
    config: Path | str | None = None  # a single file's original YAML (default: the .yaml beside it, if any)


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format: its name, what ``detect`` recognises (one line, for the error that lists them all),
    a cheap ``detect(path)`` (names and headers, never the whole weights), ``read`` and, if it can be written,
    ``write`` (returns the path written)."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, ReadOptions], StableDiffusionComponents]
    write: Callable[[StableDiffusionComponents, Path], Path] | None = None


def stored_config(data: dict[str, Any] | None, cls: type, what: str) -> Any:
    """The config dataclass ``cls`` from a stored dict (None when there is none), a ``CheckpointError`` if invalid."""
    if not data:
        return None
    try:
        return from_dict(cls, data, what)
    except ConfigError as e:
        raise CheckpointError(f"the stored {what} config is invalid ({e})") from e


def hf_text_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``CLIPTextModel`` names of published files (``text_model.encoder.…``), without the position-id buffer.

    SD v1 files and diffusers folders use these names, and transformers 4 and 5 both load them; transformers 5
    itself saves without the ``text_model.`` level, as did some very old SD files, so that level is restored.
    """
    out = {}
    for key, tensor in sd.items():
        if key.startswith(_CLIP_TEXT_MODULES):
            key = "text_model." + key
        if key != POSITION_IDS:
            out[key] = tensor
    return out
