"""Native checkpoints (format "native": a latentdiff run folder, checkpoint folder or exported model): the models
built from them, and the in-memory form read from and written to them.

This sits above the models (it imports them); the file handling itself is ``latentdiff.io.checkpoint``'s, which
imports no model. Constructors never read files: a diffusion model's first stage is loaded here
(:func:`build_latent_diffusion`) and handed to ``LatentDiffusion``. A Stable Diffusion model written here
(:func:`save_native`) is an ordinary diffusion checkpoint whose conditioner is a frozen CLIP text encoder, and
keeps what the other formats need under its config's ``stable_diffusion`` entry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.conditioning.clip import CLIPTextConfig
from latentdiff.conditioning.conditioner import CLIPEncoderConfig, ConditionerConfig
from latentdiff.conditioning.tokenizer import CLIPTokenizer
from latentdiff.config import ConfigError, from_dict, to_dict
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.diffusion.objectives import DiffusionLossConfig
from latentdiff.diffusion.schedule import ScheduleConfig
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.formats.architecture import infer_clip_text_config
from latentdiff.formats.components import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointFormat,
    ReadOptions,
    StableDiffusionComponents,
    stored_config,
)
from latentdiff.formats.diffusers_names import PARAMETERIZATIONS, model_state_shapes
from latentdiff.formats.weights import check_state_dict, plain_tensors
from latentdiff.io.checkpoint import (
    load_train_state,
    read_checkpoint,
    read_native_config,
    resolve_checkpoint,
    save_checkpoint,
)
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import load_state_strict

logger = logging.getLogger(__name__)

# Parts of a CLIP checkpoint that the text encoder does not use (a CLIPTextModelWithProjection's projection...).
CLIP_UNUSED_PREFIXES = ("text_projection", "logit_scale", "visual_projection", "vision_model")
CLIP_PAD_TOKENS = {"hf": 49407, "openclip": 0}  # SD v1 pads with the end token, SD v2 (OpenCLIP) with "!"
_CONDITIONING_MODES = {(True, False): "crossattn", (False, True): "concat", (True, True): "hybrid"}


def _read_native_model(path: str | Path, task: str, config_class: type,
                       what: str) -> tuple[dict[str, torch.Tensor], Any]:
    """The weights of a native ``task`` checkpoint and its model config (a ``config_class``); ``what`` names the
    model in the errors."""
    weights, config = read_checkpoint(path)
    found = config.get("task", "autoencoder")  # the first native files, all autoencoders, recorded no task
    if found != task:
        raise CheckpointError(f"{path} is a {found!r} checkpoint, not {what}")
    if "model" not in config:
        raise CheckpointError(f"{path}: its config holds no model description")
    try:
        return weights, from_dict(config_class, config["model"], "model")
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config does not describe {what} ({e})") from e


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu") -> Autoencoder:
    """Load a first-stage model from a native checkpoint (file, checkpoint folder or run folder)."""
    weights, model_config = _read_native_model(path, "autoencoder", AutoencoderConfig, "an autoencoder")
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
    weights, model_config = _read_native_model(path, "diffusion", LatentDiffusionConfig, "a diffusion model")
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


def read(path: Path, options: ReadOptions) -> StableDiffusionComponents:
    """The components of a native diffusion model or autoencoder, the UNet's weights as saved (EMA by default);
    the text encoder only when a CLIP is the model's conditioner."""
    weights, config = read_checkpoint(path)
    extra = config.get("stable_diffusion", {})
    comps = StableDiffusionComponents(source="native", ema=bool(extra.get("ema", False)))
    task, model = config.get("task", "autoencoder"), config.get("model") or {}
    if task == "autoencoder":
        comps.vae, comps.vae_config = weights, stored_config(model, AutoencoderConfig, "model")
        check_state_dict(comps.vae, model_state_shapes(comps.vae_config), "VAE")
        comps.scale_factor = float(extra.get("scale_factor", comps.scale_factor))
        return comps
    if task != "diffusion":
        raise CheckpointError(f"{path} is a {task!r} checkpoint, not a diffusion model or an autoencoder")
    comps.unet = {k[len(UNET_PREFIX):]: v for k, v in weights.items() if k.startswith(UNET_PREFIX)}
    comps.unet_config = stored_config(model.get("unet"), UNetConfig, "model.unet")
    check_state_dict(comps.unet, model_state_shapes(comps.unet_config), "UNet")
    vae = {k[len(VAE_PREFIX):]: v for k, v in weights.items() if k.startswith(VAE_PREFIX)}
    if vae:
        comps.vae, comps.vae_config = vae, stored_config(model.get("first_stage_config"), AutoencoderConfig,
                                                        "model.first_stage_config")
        check_state_dict(comps.vae, model_state_shapes(comps.vae_config), "VAE")
    comps.schedule = stored_config(model.get("schedule"), ScheduleConfig, "model.schedule")
    comps.conditioner = stored_config(model.get("conditioner"), ConditionerConfig, "model.conditioner")
    clip = comps.conditioner.clip if comps.conditioner and comps.conditioner.text_encoder == "clip" else None
    # cond_stage_model.transformer.* is a CLIP only with a clip conditioner (or in the first native files, which
    # had no conditioner); a jointly trained text transformer keeps its own weights under the same name.
    text = {k[len(CLIP_PREFIX):]: v for k, v in weights.items() if k.startswith(CLIP_PREFIX)}
    if text and options.text_encoder and (clip is not None or comps.conditioner is None):
        comps.text_encoder = text
        comps.text_encoder_layout = extra.get("text_encoder_layout", "hf")
        comps.text_encoder_config = extra.get("text_encoder_config")
        comps.text_encoder_output_layer = extra.get("text_encoder_output_layer", "last")
        if clip is not None:
            comps.text_encoder_config = comps.text_encoder_config or _hf_clip_config(clip.model)
            comps.text_encoder_output_layer = clip.model.output_layer
            comps.pad_token_id = clip.pad_token_id
    if model.get("scale_factor"):
        comps.scale_factor = float(model["scale_factor"])
    comps.image_size = model.get("image_size") or extra.get("image_size")
    loss = stored_config(model.get("loss"), DiffusionLossConfig, "model.loss")
    diffusers_names = {ours: theirs for theirs, ours in PARAMETERIZATIONS.items()}
    comps.prediction_type = extra.get("prediction_type") or (
        diffusers_names[loss.parameterization] if loss is not None else comps.prediction_type)
    return comps


def _hf_clip_config(config: Any) -> dict[str, Any]:
    """A Hugging Face ``CLIPTextConfig`` dict for our ``CLIPTextConfig`` (all its layers, as the weights hold)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **config.to_hf(),
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}


def _pad_token_id(comps: StableDiffusionComponents) -> int:
    """What the model's prompts are padded with: as the source says, its tokenizer folder's, else by layout."""
    if comps.pad_token_id is not None:
        return comps.pad_token_id
    if comps.tokenizer_dir is not None and Path(comps.tokenizer_dir).is_dir():
        return CLIPTokenizer(comps.tokenizer_dir).pad_token_id
    return CLIP_PAD_TOKENS.get(comps.text_encoder_layout or "hf", CLIP_PAD_TOKENS["hf"])


def native_conditioning(comps: StableDiffusionComponents) -> tuple[str, ConditionerConfig | None]:
    """The ``LatentDiffusionConfig.conditioning`` mode and conditioner of a Stable Diffusion model.

    A UNet with cross-attention reads a frozen CLIP text encoder (``text_encoder: clip``, with the text encoder's
    architecture, output layer and padding; SD's 10% caption dropout); a UNet that takes ``2 * latent + 1``
    channels is an inpainting model (``image: inpaint``: the mask and the masked image's latent are concatenated,
    as SD's 9-channel UNet). A native source keeps its own conditioner. Raises ``CheckpointError`` for a UNet with
    cross-attention but no text encoder, and for a conditioner with trained weights the components do not carry.
    """
    unet, latent = comps.unet_config, comps.vae_config.embed_dim
    no_text = CheckpointError("the UNet cross-attends to text but there is no text encoder to save with it; a native "
                              "diffusion checkpoint holds the whole model (convert to 'original' or 'diffusers' to "
                              "keep the UNet alone)")
    if comps.conditioner is not None:  # a native model's own
        c = comps.conditioner
        if c.text_encoder == "transformer" or c.class_map == "crossattn":
            raise CheckpointError("this model's conditioner has trained weights of its own (a text transformer or "
                                  "class-map embeddings) that only its native checkpoint holds; copy that instead")
        if c.text_encoder == "clip" and comps.text_encoder is None:
            raise no_text
        return _CONDITIONING_MODES[c.has_context, c.has_concat], c
    inpaint = unet.in_channels == 2 * latent + 1 and unet.out_channels == latent
    clip = None
    if unet.context_dim:
        if comps.text_encoder is None:
            raise no_text
        text = {k: v for k, v in comps.text_encoder.items() if not k.startswith(CLIP_UNUSED_PREFIXES)}
        try:
            model = CLIPTextConfig.from_hf(comps.text_encoder_config or infer_clip_text_config(text),
                                           output_layer=comps.text_encoder_output_layer)
        except ValueError as e:
            raise CheckpointError(f"the text encoder's config does not describe a CLIP text encoder ({e})") from e
        if model.width != unet.context_dim:
            raise CheckpointError(f"the text encoder is {model.width} wide but the UNet's cross-attention reads "
                                  f"{unet.context_dim}")
        clip = CLIPEncoderConfig(model=model, pad_token_id=_pad_token_id(comps))
    if clip is None and not inpaint:
        return "none", None
    conditioner = ConditionerConfig(text_encoder="clip" if clip else "none", image="inpaint" if inpaint else "none",
                                    **({"clip": clip} if clip else {}))
    return _CONDITIONING_MODES[clip is not None, inpaint], conditioner


def native_diffusion_state(comps: StableDiffusionComponents) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (in the native names) and the ``LatentDiffusionConfig`` dict of a UNet with its VAE (see
    ``save_native``), for writing them or building the model from them."""
    parameterization = PARAMETERIZATIONS.get(comps.prediction_type, "eps")
    conditioning, conditioner = native_conditioning(comps)
    image_size = comps.image_size or 0
    if conditioner is not None and not image_size:
        image_size = 768 if comps.prediction_type == "v_prediction" else 512
    model = {"first_stage": "", "first_stage_config": to_dict(comps.vae_config), "sample_posterior": True,
             "scale_factor": comps.scale_factor, "image_size": image_size,
             "channels": comps.vae_config.in_channels, "unet": to_dict(comps.unet_config),
             "schedule": to_dict(comps.schedule or ScheduleConfig()),
             "loss": to_dict(DiffusionLossConfig(parameterization)), "conditioning": conditioning,
             "conditioner": to_dict(conditioner) if conditioner is not None else None}
    weights = {UNET_PREFIX + k: v for k, v in comps.unet.items()}
    weights.update({VAE_PREFIX + k: v for k, v in comps.vae.items()})
    if conditioner is not None and conditioner.text_encoder == "clip":
        unused = sorted(k for k in comps.text_encoder if k.startswith(CLIP_UNUSED_PREFIXES))
        if unused:
            logger.info("leaving out %d text-encoder weights the conditioning does not use (%s)", len(unused),
                        ", ".join(unused[:4]))
        weights.update({CLIP_PREFIX + k: v for k, v in comps.text_encoder.items() if k not in unused})
    return weights, model


def save_native(comps: StableDiffusionComponents, run_dir: str | Path, step: int = 0) -> Path:
    """Write a native checkpoint (``run_dir/checkpoints/step_N/``) through ``save_checkpoint``.

    A VAE alone is an autoencoder checkpoint (``load_autoencoder`` reads it). A UNet needs its VAE: the two (and
    the text encoder, under ``cond_stage_model.transformer.`` in ``CLIPTextModel`` names, the place of an original
    SD v1 file) form a diffusion checkpoint that ``load_latent_diffusion`` loads: its ``model`` config is a
    ``LatentDiffusionConfig`` whose conditioner (``native_conditioning``) is the frozen CLIP text encoder for a UNet
    with cross-attention ("crossattn"), plus the inpainting inputs for a 9-channel UNet ("hybrid"). A model with a
    conditioner needs an image size: the source's, else SD's 512 (768 for v-prediction).
    """
    extra = {"source": comps.source, "ema": comps.ema, "prediction_type": comps.prediction_type,
             "scale_factor": comps.scale_factor, "image_size": comps.image_size,
             "text_encoder_layout": comps.text_encoder_layout, "text_encoder_config": comps.text_encoder_config,
             "text_encoder_output_layer": comps.text_encoder_output_layer}
    if comps.unet is None:
        if comps.vae is None:
            raise CheckpointError("a native checkpoint needs a UNet with its VAE, or a VAE")
        config = {"task": "autoencoder", "model": to_dict(comps.vae_config), "stable_diffusion": extra}
        return save_checkpoint(run_dir, step, plain_tensors(comps.vae), config, keep=0)
    if comps.vae is None:
        raise CheckpointError("a native diffusion checkpoint holds the UNet with its first stage, and this source "
                              "has no VAE; convert to 'original' or 'diffusers' instead")
    weights, model = native_diffusion_state(comps)
    config = {"task": "diffusion", "model": model, "stable_diffusion": extra}
    return save_checkpoint(run_dir, step, plain_tensors(weights), config, keep=0)


def detect(path: Path) -> bool:
    """A ``.safetensors`` file, checkpoint folder or run folder whose config (metadata or config.json) is ours."""
    return read_native_config(path) is not None


FORMAT = CheckpointFormat(
    "native", "a latentdiff checkpoint (model.safetensors with its config; a checkpoint, export or run folder)",
    detect, read, save_native)
