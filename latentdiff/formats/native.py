"""Native models from their files: build the model from the config stored with the weights, then load the weights.

This sits above the models (it imports them); the file handling itself is ``latentdiff.io.checkpoint``'s, which
imports no model. Constructors never read files: a diffusion model's first stage is loaded here
(:func:`build_latent_diffusion`) and handed to ``LatentDiffusion``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.config import ConfigError, from_dict
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.io.checkpoint import load_train_state, read_checkpoint, resolve_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> Autoencoder:
    """Load a first-stage model from a native checkpoint (file, checkpoint folder or run folder)."""
    weights, config = read_checkpoint(path)
    if config.get("task", "autoencoder") != "autoencoder" or "model" not in config:
        raise CheckpointError(f"{path} is a {config.get('task', 'unknown')!r} checkpoint, not an autoencoder")
    try:
        model_config = from_dict(AutoencoderConfig, config["model"], "model")
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not describe an autoencoder ({e})") from e
    model = Autoencoder(model_config)
    load_state_strict(model, weights, "autoencoder")
    return model.to(device).eval()


def build_latent_diffusion(config: LatentDiffusionConfig) -> LatentDiffusion:
    """A new diffusion model for ``config``, its first stage loaded from ``config.first_stage`` when that names a
    checkpoint and the config does not already describe it (a saved model's weights bring their own)."""
    first_stage = None
    if config.first_stage and config.first_stage_config is None:
        first_stage = load_autoencoder(config.first_stage, "cpu")
    return LatentDiffusion(config, first_stage)


def load_latent_diffusion(path: str | Path, device: torch.device | str = "cpu", ema: bool = True) -> LatentDiffusion:
    """Load a latent (or pixel-space) diffusion model, first stage included, from a native checkpoint.

    ``model.safetensors`` holds the weights the trainer saved for sampling (the EMA weights by default). With
    ``ema=False`` the UNet's (and a trained conditioner's) raw training weights are taken from ``train_state.pt``
    beside it instead. A frozen pretrained text encoder (MiniLM) is not in the file: it is loaded from its package.
    """
    weights, config = read_checkpoint(path)
    if config.get("task") != "diffusion" or "model" not in config:
        raise CheckpointError(f"{path} is a {config.get('task', 'autoencoder')!r} checkpoint, not a diffusion model")
    try:
        model_config = from_dict(LatentDiffusionConfig, config["model"], "model")
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not describe a diffusion model ({e})") from e
    model = LatentDiffusion(model_config)
    load_state_strict(model, weights, "latent diffusion model")
    if not ema:
        state = load_train_state(resolve_checkpoint(path).parent)
        if state.get("model") is None:
            raise CheckpointError(f"{path}: train_state.pt holds no raw UNet weights")
        load_state_strict(model.model, state["model"], "UNet (raw weights)")
        if getattr(model, "cond_stage_model", None) is not None and state.get("cond_stage_model") is not None:
            load_state_strict(model.cond_stage_model, state["cond_stage_model"], "conditioner (raw weights)")
    return model.to(device).eval()
