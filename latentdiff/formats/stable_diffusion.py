"""The original Stable Diffusion single file (format "original"): CompVis / Stability's layout in one
``.safetensors`` file, read and written.

The UNet is under ``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text encoder under
``cond_stage_model.transformer.`` (SD v1: Hugging Face CLIP names) or ``cond_stage_model.model.`` (SD v2:
OpenCLIP's layout, converted to Hugging Face names); a bare UNet or a bare VAE file uses the same names without
the prefix; the EMA copy of the UNet is taken when the file holds one. A pickled ``.ckpt`` in this layout is
``latentdiff.formats.ckpt``'s, which hands its tensors to :func:`split_original`. Without our configs in the
metadata the architecture is read from the shapes (``latentdiff.formats.architecture``), and what they cannot tell
from the original YAML (``latentdiff.formats.original_config``) or, without one, by SD's conventions (with a
warning).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from latentdiff.autoencoder.model import AutoencoderConfig
from latentdiff.conditioning.clip import hf_to_openclip, openclip_to_hf
from latentdiff.config import to_dict
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.formats.architecture import (
    block_ids,
    infer_autoencoder_config,
    infer_clip_text_config,
    infer_unet_config,
)
from latentdiff.formats.components import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    CheckpointFormat,
    ReadOptions,
    StableDiffusionComponents,
    hf_text_names,
    stored_config,
)
from latentdiff.formats.diffusers_names import model_state_shapes
from latentdiff.formats.original_config import OriginalConfig, find_original_config
from latentdiff.formats.weights import check_state_dict, plain_tensors, read_state_dict, show_keys
from latentdiff.io.atomic import atomic_path
from latentdiff.io.errors import CheckpointError

logger = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
METADATA_KEY = "latentdiff_components"  # our configs, stored in the metadata of the single files we write
# Buffers CompVis' LatentDiffusion recomputes from its schedule, EMA bookkeeping, and CLIP's position ids (a
# non-persistent buffer in current transformers; merged checkpoints sometimes carry a corrupted float copy).
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor", "model_ema.decay", "model_ema.num_updates",
})


def ema_key(unet_key: str) -> str:
    """Where CompVis' EMA keeps the copy of a UNet weight: its name under ``model.`` with the dots removed.

    ``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``.
    """
    return EMA_PREFIX + unet_key[len("model."):].replace(".", "")


def _ema_weights(sd: dict[str, torch.Tensor], unet_keys: list[str]) -> dict[str, torch.Tensor] | None:
    """The EMA copy of the UNet, by its original names, or None when the file has none."""
    stored = {k for k in sd if k.startswith(EMA_PREFIX)} - IGNORED_KEYS
    if not stored:
        return None
    wanted = {k: ema_key(k) for k in unet_keys}
    if len(set(wanted.values())) != len(wanted):
        raise CheckpointError("two UNet weights flatten to the same EMA name; pass ema=False")
    missing = sorted(k for k, e in wanted.items() if e not in stored)
    unexpected = sorted(stored - set(wanted.values()))
    if missing or unexpected:
        parts = [f"{label}: {show_keys(keys)}" for label, keys in
                 (("UNet weights without an EMA copy", missing), ("EMA entries of no UNet weight", unexpected))
                 if keys]
        raise CheckpointError("the checkpoint's EMA weights do not match its UNet; " + "; ".join(parts) +
                              "; pass ema=False (--no-ema) to take the raw weights")
    return {k: sd[e] for k, e in wanted.items()}


def _metadata_components(metadata: dict[str, str]) -> dict[str, Any]:
    """The configs a file we wrote keeps in its metadata (empty for anyone else's file)."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        return json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s metadata", METADATA_KEY)
        return {}


def _full_layout(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], list[str],
                                                                   list[str]]:
    """The state dict in a full file's names, its UNet keys, its VAE keys, and keys deliberately left out.

    A bare UNet or VAE file gets the prefix its keys would have in a full file.
    """
    if any(k.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")) for k in state_dict):
        return (state_dict, [k for k in state_dict if k.startswith(UNET_PREFIX)],
                [k for k in state_dict if k.startswith(VAE_PREFIX)], [])
    if "input_blocks.0.0.weight" in state_dict:
        state_dict = {UNET_PREFIX + k: v for k, v in state_dict.items()}
        return state_dict, list(state_dict), [], []
    if "encoder.conv_in.weight" in state_dict and "decoder.conv_in.weight" in state_dict:
        # VAE files from training runs may carry their loss (LPIPS, discriminator): not part of the model.
        extras = [k for k in state_dict if k.startswith(("loss.", EMA_PREFIX))]
        if extras:
            logger.info("ignoring %d loss / EMA entries of the VAE file (%s ...)", len(extras), extras[0])
        ignored = {VAE_PREFIX + k for k in extras}
        state_dict = {VAE_PREFIX + k: v for k, v in state_dict.items()}
        return state_dict, [], [k for k in state_dict if k not in ignored], sorted(ignored)
    raise CheckpointError("not a Stable Diffusion checkpoint in the original layout: no "
                          "model.diffusion_model.*, first_stage_model.*, input_blocks.* or encoder.* keys "
                          f"(first keys: {', '.join(list(state_dict)[:5])})")


def _split_text_encoder(state_dict: dict[str, torch.Tensor], comps: StableDiffusionComponents, take: bool,
                        converter: Callable) -> list[str]:
    """Put the text encoder (CLIP or OpenCLIP layout, the latter renamed by ``converter``) into ``comps`` if
    ``take``; returns its keys, taken or not."""
    clip_keys = [k for k in state_dict if k.startswith(CLIP_PREFIX)]
    openclip_keys = [k for k in state_dict if k.startswith(OPENCLIP_PREFIX)]
    if clip_keys and openclip_keys:
        raise CheckpointError("the checkpoint holds text encoders in both the CLIP and the OpenCLIP layout")
    if take and clip_keys:
        comps.text_encoder = hf_text_names({k[len(CLIP_PREFIX):]: state_dict[k] for k in clip_keys})
        comps.text_encoder_layout = "hf"
    elif take and openclip_keys:
        comps.text_encoder = hf_text_names(converter({k[len(OPENCLIP_PREFIX):]: state_dict[k]
                                                      for k in openclip_keys}))
        comps.text_encoder_layout = "openclip"
        # SD v2 conditions on 23 layers of OpenCLIP ViT-H's 24: the whole tower is the penultimate-layer model, a
        # file holding 23 (as diffusers' converter writes them) is already cut to the last layer that runs.
        layers = len(block_ids(comps.text_encoder, "text_model.encoder.layers.", 3))
        comps.text_encoder_output_layer = "penultimate" if layers == 24 else "last"
    return clip_keys + openclip_keys


def _apply_original_config(comps: StableDiffusionComponents, original: OriginalConfig | None,
                           stored: dict[str, Any]) -> None:
    """Fill in what the shapes cannot tell from the original YAML; without one (and without our stored configs),
    say in one warning line what SD's conventions guessed."""
    if original is None:
        guessed = [what for what, known in (("the UNet's attention heads", comps.unet is None or "unet" in stored),
                                            ("the text encoder's activation", comps.text_encoder is None
                                             or comps.text_encoder_config is not None),
                                            ("the prediction type (eps)", "prediction_type" in stored)) if not known]
        if comps.unet is not None and guessed:
            logger.warning("no original config (--config FILE, or a .yaml beside the checkpoint): guessed %s by "
                           "Stable Diffusion's conventions", ", ".join(guessed))
        return
    if original.prediction_type is not None:
        comps.prediction_type = original.prediction_type
    if original.scale_factor is not None:
        comps.scale_factor = original.scale_factor
    if comps.text_encoder is not None and original.text_output_layer is not None:
        comps.text_encoder_output_layer = original.text_output_layer
    if comps.text_encoder is not None and original.text_activation is not None:
        comps.text_encoder_config = dict(comps.text_encoder_config or infer_clip_text_config(comps.text_encoder),
                                         hidden_act=original.text_activation)


def _unet_config(unet: dict[str, torch.Tensor], stored: dict[str, Any], original: OriginalConfig | None
                 ) -> UNetConfig:
    return stored_config(stored.get("unet"), UNetConfig, "unet") or infer_unet_config(
        unet, **(original.unet if original is not None else {}))


def split_original(state_dict: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None, ema: bool = True,
                   text_encoder: bool = True, text_encoder_converter: Callable | None = None,
                   strict: bool = True, original: OriginalConfig | None = None) -> StableDiffusionComponents:
    """Components from a state dict in the original single-file layout (full model, bare UNet or bare VAE).

    ``text_encoder_converter`` turns an OpenCLIP text tower (keys without ``cond_stage_model.model.``) into
    ``CLIPTextModel`` names; the default is ``latentdiff.conditioning.clip.openclip_to_hf``. With ``strict`` any
    key that belongs to no component (other than schedule buffers and EMA bookkeeping) is an error. ``original``:
    the checkpoint's original YAML (``formats.original_config``), for what the shapes cannot tell.
    """
    stored = _metadata_components(metadata or {})
    comps = StableDiffusionComponents(source="original")
    state_dict, unet_keys, vae_keys, used_keys = _full_layout(state_dict)
    used = set(used_keys)
    if unet_keys:
        ema_weights = _ema_weights(state_dict, unet_keys) if ema else None
        source = ema_weights if ema_weights is not None else {k: state_dict[k] for k in unet_keys}
        comps.unet = {k[len(UNET_PREFIX):]: v for k, v in source.items()}
        comps.ema = ema_weights is not None
        comps.unet_config = _unet_config(comps.unet, stored, original)
        check_state_dict(comps.unet, model_state_shapes(comps.unet_config), "UNet")
        used.update(unet_keys)
        used.update(k for k in state_dict if k.startswith(EMA_PREFIX))  # used, or deliberately left out
    if vae_keys:
        comps.vae = {k[len(VAE_PREFIX):]: state_dict[k] for k in vae_keys}
        resolution = {} if original is None or original.vae_resolution is None else {
            "resolution": original.vae_resolution}
        comps.vae_config = (stored_config(stored.get("vae"), AutoencoderConfig, "vae")
                            or infer_autoencoder_config(comps.vae, **resolution))
        check_state_dict(comps.vae, model_state_shapes(comps.vae_config), "VAE")
        used.update(vae_keys)
    used.update(_split_text_encoder(state_dict, comps, text_encoder, text_encoder_converter or openclip_to_hf))
    if comps.text_encoder is not None:
        comps.text_encoder_config = stored.get("text_encoder_config")
        comps.text_encoder_output_layer = stored.get("text_encoder_output_layer", comps.text_encoder_output_layer)
    leftover = sorted(set(state_dict) - used - IGNORED_KEYS)
    if leftover:
        message = f"keys that belong to no Stable Diffusion component: {show_keys(leftover)}"
        if strict:
            raise CheckpointError(f"unexpected {message}; pass strict=False to ignore them")
        logger.warning("ignoring %s", message)
    if "scale_factor" in state_dict:
        comps.scale_factor = float(state_dict["scale_factor"])
    comps.scale_factor = float(stored.get("scale_factor", comps.scale_factor))
    comps.prediction_type = stored.get("prediction_type", comps.prediction_type)
    comps.image_size = stored.get("image_size", comps.image_size)
    if comps.unet is None and comps.vae is None and comps.text_encoder is None:
        raise CheckpointError("the checkpoint holds no UNet, VAE or text encoder")
    _apply_original_config(comps, original, stored)
    return comps


def _stored_configs(comps: StableDiffusionComponents) -> dict[str, Any]:
    return {"unet": to_dict(comps.unet_config) if comps.unet_config else None,
            "vae": to_dict(comps.vae_config) if comps.vae_config else None,
            "text_encoder_config": comps.text_encoder_config,
            "text_encoder_output_layer": comps.text_encoder_output_layer, "scale_factor": comps.scale_factor,
            "prediction_type": comps.prediction_type, "image_size": comps.image_size}


def to_original_state_dict(comps: StableDiffusionComponents,
                           text_encoder_converter: Callable | None = None) -> dict[str, torch.Tensor]:
    """The single-file state dict: UNet, VAE and text encoder under their CompVis prefixes.

    An "openclip" text encoder is written in OpenCLIP's layout through ``text_encoder_converter`` (default:
    ``latentdiff.conditioning.clip.hf_to_openclip``).
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, sd in ((UNET_PREFIX, comps.unet), (VAE_PREFIX, comps.vae)):
        out.update({prefix + k: v for k, v in (sd or {}).items()})
    if comps.text_encoder is not None:
        if comps.text_encoder_layout == "openclip":
            converter = text_encoder_converter or hf_to_openclip
            out.update({OPENCLIP_PREFIX + k: v for k, v in converter(comps.text_encoder).items()})
        else:
            out.update({CLIP_PREFIX + k: v for k, v in comps.text_encoder.items()})
    return out


def save_original(comps: StableDiffusionComponents, path: str | Path,
                  text_encoder_converter: Callable | None = None) -> Path:
    """Write one ``.safetensors`` file in the original SD layout (our configs go into its metadata)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"original single files are written as .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = plain_tensors(to_original_state_dict(comps, text_encoder_converter))
    # One metadata key: safetensors writes several in a per-process hash order, so the same weights would give files
    # of different bytes, and a different sha256 (A1111's model hash, recorded in every PNG) from run to run.
    with atomic_path(path) as temp:
        save_file(tensors, str(temp), metadata={METADATA_KEY: json.dumps(_stored_configs(comps))})
    return path


def detect(path: Path) -> bool:
    """A ``.safetensors`` file (the formats before this one in the registry took ours and diffusers')."""
    return path.is_file() and path.suffix == ".safetensors"


def read(path: Path, options: ReadOptions) -> StableDiffusionComponents:
    """The components of an original single file (full model, bare UNet or bare VAE)."""
    state_dict, metadata = read_state_dict(path)
    return split_original(state_dict, metadata=metadata, ema=options.ema, text_encoder=options.text_encoder,
                          text_encoder_converter=options.text_encoder_converter, strict=options.strict,
                          original=find_original_config(path, options.config))


FORMAT = CheckpointFormat(
    "original", "an original Stable Diffusion single file (.safetensors: full model, bare UNet or bare VAE)",
    detect, read, save_original)
