"""A bare diffusers / transformers component (format "component"): one UNet, VAE or CLIP text encoder folder
(``config.json`` + weights: single, sharded, ``.bin`` or an fp16 variant), or a diffusers-named weights file with
its ``config.json`` beside it. The config names the class; the weights are renamed to ours through
``latentdiff.formats.diffusers_names``.

A diffusers pipeline folder (``latentdiff.formats.diffusers_pipeline``) is made of these, and writes its
components through :func:`write_component_folder`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from latentdiff.formats.components import CheckpointFormat, ReadOptions, StableDiffusionComponents, hf_text_names
from latentdiff.formats.diffusers_names import (
    UnsupportedArchitecture,
    model_state_shapes,
    unet_config_from_diffusers,
    unet_from_diffusers,
    vae_config_from_diffusers,
    vae_from_diffusers,
)
from latentdiff.formats.weights import check_state_dict, plain_tensors, read_state_dict
from latentdiff.io.atomic import atomic_path, write_text
from latentdiff.io.checkpoint import CONFIG_NAME
from latentdiff.io.errors import CheckpointError

DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
DIFFUSERS_BIN_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's content, or a ``CheckpointError`` that says it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file ({e})") from e


def is_diffusers_named(keys: Collection[str]) -> bool:
    """Whether a state dict's keys are diffusers' UNet or VAE names rather than the original ones."""
    return "time_embedding.linear_1.weight" in keys or "encoder.down_blocks.0.resnets.0.conv1.weight" in keys


def _read_component_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of one diffusers / transformers component folder (single, sharded, .bin, or fp16 variant)."""
    for name in DIFFUSERS_WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)[0]
    for index in sorted(folder.glob("*.safetensors.index.json")):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(read_state_dict(folder / shard)[0])
        return weights
    for name in DIFFUSERS_BIN_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)[0]
    variants = sorted(folder.glob("*.safetensors"))
    if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors
        return read_state_dict(variants[0])[0]
    raise CheckpointError(f"{folder} holds no weights ({', '.join(DIFFUSERS_WEIGHT_FILES)})")


def _rename_checked(convert: Callable, weights: dict[str, torch.Tensor], config: Any, what: str,
                    folder: Path) -> dict[str, torch.Tensor]:
    """``convert``'s renaming of the weights to ours, checked against the shapes of the model ``config`` builds."""
    try:
        ours = convert(weights, config)
    except KeyError as e:
        raise CheckpointError(f"{folder}: the {what} weights do not fit its config.json: {e.args[0]}") from None
    check_state_dict(ours, model_state_shapes(config), f"{what} described by {folder / CONFIG_NAME}")
    return ours


def read_component_folder(folder: Path, comps: StableDiffusionComponents, text_encoder: bool) -> str | None:
    """Fill ``comps`` from one component folder; returns which component it was (None: not a known one)."""
    config = read_json(folder / CONFIG_NAME)
    kind = config.get("_class_name") or (config.get("architectures") or [None])[0]
    try:
        if kind == "UNet2DConditionModel":
            comps.unet_config = unet_config_from_diffusers(config)
            comps.unet = _rename_checked(unet_from_diffusers, _read_component_weights(folder), comps.unet_config,
                                         "UNet", folder)
            if config.get("sample_size"):  # latent pixels; a pipeline corrects the factor 8 from its VAE
                comps.image_size = int(_first(config["sample_size"])) * 8
            return "unet"
        if kind == "AutoencoderKL":
            comps.vae_config, comps.scale_factor = vae_config_from_diffusers(config)
            comps.vae = _rename_checked(vae_from_diffusers, _read_component_weights(folder), comps.vae_config,
                                        "VAE", folder)
            return "vae"
    except UnsupportedArchitecture as e:
        raise CheckpointError(f"{folder}: {e}") from e
    if kind in ("CLIPTextModel", "CLIPTextModelWithProjection") or config.get("model_type") == "clip_text_model":
        if text_encoder:
            comps.text_encoder = hf_text_names(_read_component_weights(folder))
            comps.text_encoder_config = {k: v for k, v in config.items() if not k.startswith("_")}
            # SD v2's text encoder is OpenCLIP ViT-H (1024 wide); an original file stores it in OpenCLIP's layout.
            comps.text_encoder_layout = "openclip" if config.get("hidden_size") == 1024 else "hf"
        return "text_encoder"
    return None


def _first(value: Any) -> Any:
    """The first entry of a per-axis list (diffusers' ``sample_size`` may be one), or the value itself."""
    return value[0] if isinstance(value, (list, tuple)) else value


def write_component_folder(folder: Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                           weights_name: str) -> None:
    """Write one component folder: its ``config.json`` and its weights as ``weights_name``."""
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    with atomic_path(folder / weights_name) as temp:
        save_file(plain_tensors(weights), str(temp), metadata={"format": "pt"})


def _header_keys(path: Path) -> list[str]:
    """The tensor names of a ``.safetensors`` file, read from its header only (none when it is unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return []


def detect(path: Path) -> bool:
    """A folder whose ``config.json`` names a class (diffusers' ``_class_name``, transformers' ``model_type``), or a
    ``.safetensors`` file in diffusers' names."""
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            return False
        config = read_json(path / CONFIG_NAME)
        return "_class_name" in config or "model_type" in config
    return path.suffix == ".safetensors" and is_diffusers_named(_header_keys(path))


def read(path: Path, options: ReadOptions) -> StableDiffusionComponents:
    """The one component of a component folder, or of the folder around a diffusers-named weights file."""
    folder = path if path.is_dir() else path.parent
    if not path.is_dir() and not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is in diffusers' names but has no {CONFIG_NAME} beside it to describe "
                              "the architecture")
    comps = StableDiffusionComponents(source="diffusers")
    if read_component_folder(folder, comps, options.text_encoder) is None:
        raise CheckpointError(f"{folder / CONFIG_NAME} describes no UNet2DConditionModel, AutoencoderKL or "
                              "CLIPTextModel")
    return comps


FORMAT = CheckpointFormat(
    "component", "one diffusers / transformers component: a folder with config.json naming its class, or a "
    "diffusers-named .safetensors file with its config.json beside it", detect, read)
