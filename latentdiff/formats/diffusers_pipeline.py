"""A diffusers pipeline folder (format "diffusers"): ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, as ``StableDiffusionPipeline.from_pretrained`` loads it; read and written.

Each model folder inside is a component (``latentdiff.formats.diffusers_component``); this module adds what the
pipeline knows beyond them: the scheduler's prediction type, the tokenizer, the image size from the UNet's
sample size and the VAE's downsampling.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from latentdiff.conditioning.tokenizer import CLIPTokenizer
from latentdiff.formats.architecture import block_ids, infer_clip_text_config
from latentdiff.formats.components import CheckpointFormat, ReadOptions, StableDiffusionComponents
from latentdiff.formats.diffusers_component import (
    DIFFUSERS_WEIGHT_FILES,
    read_component_folder,
    read_json,
    write_component_folder,
)
from latentdiff.formats.diffusers_names import (
    UnsupportedArchitecture,
    unet_config_to_diffusers,
    unet_to_diffusers,
    vae_config_to_diffusers,
    vae_to_diffusers,
)
from latentdiff.io.atomic import write_text
from latentdiff.io.checkpoint import CONFIG_NAME
from latentdiff.io.errors import CheckpointError


def _scheduler_config(comps: StableDiffusionComponents) -> dict[str, Any]:
    """The ``scheduler/scheduler_config.json`` of a written pipeline: the source's, else the hub SD 1.5 one.

    The hub's config (Stable Diffusion's training schedule, CompVis' "linear" = diffusers' "scaled_linear", and its
    PNDM defaults) has no ``timestep_spacing``, which leaves each scheduler class its own default, as the single
    files it was converted from do here (``latentdiff.diffusion.noise_levels.LevelOptions``).
    """
    if comps.scheduler_config is not None:
        return dict(comps.scheduler_config, prediction_type=comps.prediction_type)
    return {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
            "prediction_type": comps.prediction_type}


def save_diffusers(comps: StableDiffusionComponents, folder: str | Path) -> Path:
    """Write a diffusers folder that ``from_pretrained`` loads.

    A UNet (with VAE / text encoder) becomes a pipeline folder: ``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder/``, ``scheduler/`` and ``tokenizer/`` (the source's, else CLIP's from open_clip's vocabulary). A VAE
    alone becomes a component folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), as diffusers
    publishes its VAEs.
    """
    folder = Path(folder)
    try:
        unet_config = unet_config_to_diffusers(comps.unet_config, _unet_sample_size(comps)) if comps.unet else None
        vae_config = vae_config_to_diffusers(comps.vae_config, comps.scale_factor) if comps.vae else None
    except UnsupportedArchitecture as e:
        raise CheckpointError(f"cannot write a diffusers folder: {e}") from e
    if comps.unet is None and comps.text_encoder is None:
        if comps.vae is None:
            raise CheckpointError("nothing to write: no UNet, VAE or text encoder")
        write_component_folder(folder, vae_config, vae_to_diffusers(comps.vae, comps.vae_config),
                         DIFFUSERS_WEIGHT_FILES[0])
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    version = (unet_config or vae_config or {}).get("_diffusers_version", "0.30.0")
    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": version}
    if comps.unet is not None:
        write_component_folder(folder / "unet", unet_config, unet_to_diffusers(comps.unet, comps.unet_config),
                         DIFFUSERS_WEIGHT_FILES[0])
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        scheduler = folder / "scheduler"
        scheduler.mkdir(exist_ok=True)
        scheduler_config = _scheduler_config(comps)
        write_text(scheduler / "scheduler_config.json", json.dumps(scheduler_config, indent=2) + "\n")
        index["scheduler"] = ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")]
    if comps.vae is not None:
        write_component_folder(folder / "vae", vae_config, vae_to_diffusers(comps.vae, comps.vae_config),
                         DIFFUSERS_WEIGHT_FILES[0])
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if comps.text_encoder is not None:
        text, config = _diffusers_text_encoder(comps)
        write_component_folder(folder / "text_encoder", config, text, DIFFUSERS_WEIGHT_FILES[1])
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    if comps.tokenizer_dir is not None and Path(comps.tokenizer_dir).is_dir():
        if Path(comps.tokenizer_dir).resolve() != (folder / "tokenizer").resolve():
            shutil.copytree(comps.tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    elif comps.text_encoder is not None:
        _clip_tokenizer(comps).save_folder(folder / "tokenizer")
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False})
    write_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")
    return folder


def _clip_tokenizer(comps: StableDiffusionComponents) -> CLIPTokenizer:
    """CLIP's tokenizer (open_clip's BPE vocabulary) with the source's padding: its own when it says, else 0 for
    SD v2's OpenCLIP text encoder and the end token for SD v1's, as the pipeline pads them."""
    pad = comps.pad_token_id
    if pad is None and comps.text_encoder_layout == "openclip":
        pad = 0
    return CLIPTokenizer(pad_token_id=pad)


def _diffusers_text_encoder(comps: StableDiffusionComponents) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The text encoder as diffusers stores it: a "penultimate" model loses its last layer (never run), as SD v2's
    23-layer text_encoder/ does, so that ``CLIPTextModel``'s last hidden state is the conditioning."""
    text = comps.text_encoder
    config = dict(comps.text_encoder_config or infer_clip_text_config(text))
    config.setdefault("architectures", ["CLIPTextModel"])
    config.setdefault("model_type", "clip_text_model")
    if comps.text_encoder_output_layer == "penultimate":
        last = len(block_ids(text, "text_model.encoder.layers.", 3)) - 1
        text = {k: v for k, v in text.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
        config["num_hidden_layers"] = last
    return text, config


def _unet_sample_size(comps: StableDiffusionComponents) -> int:
    """The UNet's sample size in latent pixels, for its config."""
    factor = comps.vae_config.downsample_factor if comps.vae_config else 8
    return (comps.image_size or 512) // factor  # SD v1's 512 px when the source does not say


def detect(path: Path) -> bool:
    """A folder with ``model_index.json``, or with ``unet/`` or ``vae/`` holding a ``config.json``."""
    return path.is_dir() and ((path / "model_index.json").is_file()
                              or any((path / n / CONFIG_NAME).is_file() for n in ("unet", "vae")))


def read(path: Path, options: ReadOptions) -> StableDiffusionComponents:
    """The components of a pipeline folder: its unet/, vae/ and text_encoder/, tokenizer and scheduler."""
    comps = StableDiffusionComponents(source="diffusers")
    for name in ("unet", "vae", "text_encoder"):
        if (path / name / CONFIG_NAME).is_file():
            read_component_folder(path / name, comps, options.text_encoder)
    if (path / "tokenizer").is_dir():
        comps.tokenizer_dir = path / "tokenizer"
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        comps.scheduler_config = read_json(scheduler)
        comps.prediction_type = comps.scheduler_config.get("prediction_type", comps.prediction_type)
    if comps.unet is not None and comps.vae_config is not None and comps.image_size:
        comps.image_size = comps.image_size // 8 * comps.vae_config.downsample_factor
    if comps.unet is None and comps.vae is None and comps.text_encoder is None:
        raise CheckpointError(f"{path} holds no unet/, vae/ or text_encoder/ with a config.json")
    return comps


FORMAT = CheckpointFormat(
    "diffusers", "a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...)",
    detect, read, save_diffusers)
