"""Fine-tuning an existing diffusion model: where the start weights come from (``init_from``), how the YAML's model
section relates to them, which text-encoder weights train, and the LoRA adapters of a LoRA run.

``init_from`` is a native run, checkpoint or export folder (``models/scenes-txt2img``), a Stable Diffusion single
file or a diffusers folder (read through ``latentdiff.formats``). The architecture is the base's: the YAML's
``model`` section may be left out; every field it does set must equal the base's (a mismatch is one line naming
the field). The data must have the base's image size and channels, except for a Stable Diffusion base, whose
convolutional UNet trains at the data's size (the size is recorded in the run's config).

``text_encoder`` (the experiment's key): ``frozen`` or ``trained``; empty keeps the model's own habit (a jointly
trained text transformer trains on, a pretrained CLIP or MiniLM stays frozen). A trained CLIP keeps its gradients
(its embedder encodes under ``no_grad`` only while frozen).

``lora`` (``LoRAConfig``; ``rank: 0`` means no LoRA): the base stays frozen, adapters on the UNet's ``targets``
(and with ``text_encoder: true`` on the text encoder's attention and feed-forward layers) train. See
``train/diffusion.py`` for what a LoRA run saves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from latentdiff.config import ConfigError, from_dict, to_dict
from latentdiff.data import DataConfig
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.formats.native import load_latent_diffusion, native_diffusion_state
from latentdiff.formats.registry import detect_format, read_components
from latentdiff.io.checkpoint import read_native_config
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict
from latentdiff.nn.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, LoRALayer, inject_lora

logger = logging.getLogger(__name__)

TEXT_ENCODER_MODES = ("", "frozen", "trained")


@dataclass
class LoRAConfig:
    """LoRA adapters (Hu et al. 2021): ``rank`` (0: no LoRA, full fine-tuning), ``alpha`` (the update is scaled by
    alpha / rank; 0 means alpha = rank), ``dropout`` on the adapters' input, ``targets`` (``attention``: to_q,
    to_k, to_v, to_out.0 of every transformer block; ``attention+ff``: and the feed-forward linears;
    ``attention+ff+conv``: and the ResBlocks' convolutions), ``text_encoder``: adapters on the text encoder too."""

    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    targets: str = "attention"
    text_encoder: bool = False

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.rank and lora.alpha must be >= 0 and lora.dropout in [0, 1), got rank "
                             f"{self.rank}, alpha {self.alpha}, dropout {self.dropout}")
        if self.targets not in UNET_TARGETS:
            raise ValueError(f"lora.targets must be one of {', '.join(UNET_TARGETS)}, got {self.targets!r}")
        if self.alpha == 0:
            self.alpha = float(self.rank)


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"a.b.c": value}."""
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for key, value in data.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def _check_model_section(given: LatentDiffusionConfig, base: LatentDiffusionConfig, source: str) -> None:
    """Every field of the YAML's model section that is not the default must equal the base model's."""
    defaults = _leaves(to_dict(LatentDiffusionConfig()))
    theirs = _leaves(to_dict(base))
    for key, value in _leaves(to_dict(given)).items():
        if key in ("image_size", "channels") or value == defaults.get(key, object()):
            continue  # filled in from the data, checked against the base below; or left at the default
        if key not in theirs or theirs[key] != value:
            raise ConfigError(f"init_from {source}: model.{key} is {value!r} in this config but "
                              f"{theirs.get(key, 'absent')!r} in the base model; leave the model section out (the "
                              "architecture comes from the base) or make it agree")


def load_base_model(init_from: str, image_size: int) -> tuple[LatentDiffusion, bool]:
    """The model at ``init_from`` on the CPU, and whether it is a Stable Diffusion model (any format; it is built
    for ``image_size`` pixels)."""
    file_format = detect_format(init_from)
    if file_format == "native" and "stable_diffusion" not in (read_native_config(init_from) or {}):
        return load_latent_diffusion(init_from, "cpu"), False
    comps = read_components(init_from, file_format)
    if comps.unet is None or comps.vae is None:
        raise CheckpointError(f"init_from {init_from} holds no UNet with its VAE to fine-tune")
    weights, model_config = native_diffusion_state(comps)
    try:
        config = from_dict(LatentDiffusionConfig, dict(model_config, image_size=image_size), "model")
    except ConfigError as e:
        raise CheckpointError(f"init_from {init_from}: its model is not one this trainer builds ({e})") from e
    model = LatentDiffusion(config)
    load_state_strict(model, weights, "latent diffusion model")
    return model, True


def adopt_base(model_section: LatentDiffusionConfig, data: DataConfig, init_from: str) -> LatentDiffusion:
    """The base model of a fine-tuning run, after checking the YAML's model section and the data against it."""
    model, _ = load_base_model(init_from, data.image_size)  # a Stable Diffusion UNet trains at the data's size
    base = model.config
    _check_model_section(model_section, base, init_from)
    for name in ("image_size", "channels"):
        if getattr(base, name) != getattr(data, name):
            raise ConfigError(f"init_from {init_from}: the base model has {name} {getattr(base, name)}, the data "
                              f"(data.{name}) {getattr(data, name)}")
    logger.info("fine-tuning %s", init_from)
    return model


def text_encoder_module(model: LatentDiffusion) -> nn.Module | None:
    """The text encoder inside the model's conditioner (CLIP or the jointly trained transformer), if any."""
    return getattr(model.cond_stage_model, "transformer", None) if model.cond_stage_model is not None else None


def set_text_encoder_training(model: LatentDiffusion, mode: str) -> None:
    """Freeze (``frozen``) or unfreeze (``trained``) the conditioner's weights; empty leaves them as built."""
    if not mode:
        return
    if model.cond_stage_model is None:
        raise ConfigError(f"text_encoder: {mode} needs a model with a text encoder, and this one has none")
    model.cond_stage_model.requires_grad_(mode == "trained")


def add_lora(model: LatentDiffusion, lora: LoRAConfig) -> tuple[dict[str, LoRALayer], dict[str, LoRALayer]]:
    """Freeze the whole model and wrap its UNet's (and text encoder's) target layers in LoRA adapters, the only
    trainable weights; returns the wrappers by their paths in the UNet and in the text encoder."""
    model.requires_grad_(False)
    unet = inject_lora(model.model.diffusion_model, UNET_TARGETS[lora.targets], lora.rank, lora.alpha, lora.dropout)
    text: dict[str, LoRALayer] = {}
    if lora.text_encoder:
        encoder = text_encoder_module(model)
        if encoder is None:
            raise ConfigError("lora.text_encoder: true needs a model with a text encoder, and this one has none")
        text = inject_lora(encoder, TEXT_ENCODER_TARGETS[lora.targets], lora.rank, lora.alpha, lora.dropout)
    return unet, text


__all__ = ["TEXT_ENCODER_MODES", "LoRAConfig", "add_lora", "adopt_base", "load_base_model",
           "set_text_encoder_training", "text_encoder_module"]
