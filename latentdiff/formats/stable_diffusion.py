"""Stable Diffusion checkpoint formats: read an original single file, a diffusers folder or a native checkpoint
into one set of components in our names, and write any of the three.

What can be read (``load_stable_diffusion_weights``):

- an original single file, ``.safetensors`` or ``.ckpt``: the UNet under ``model.diffusion_model.``, the VAE under
  ``first_stage_model.``, the text encoder under ``cond_stage_model.transformer.`` (SD v1: Hugging Face CLIP
  names) or ``cond_stage_model.model.`` (SD v2: OpenCLIP's layout, converted to Hugging Face names); a bare UNet
  or a bare VAE file in the same names; the EMA copy of the UNet when the file holds one;
- a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``), or one
  component's folder (``config.json`` + weights);
- a native checkpoint (``model.safetensors`` with its config; a checkpoint folder or a run folder).

A ``.ckpt`` is read only with ``torch.load(weights_only=True)``: a pickle that would need to run code is refused.
Without a config the architecture is read from the tensor shapes (``infer_unet_config``,
``infer_autoencoder_config``); the one thing shapes cannot tell, the attention head count, follows the Stable
Diffusion convention (see ``infer_unet_config``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from latentdiff.autoencoder.model import AutoencoderConfig
from latentdiff.conditioning.clip import CLIPTextConfig, hf_to_openclip, openclip_to_hf
from latentdiff.conditioning.conditioner import CLIPEncoderConfig, ConditionerConfig
from latentdiff.conditioning.tokenizer import CLIPTokenizer
from latentdiff.config import ConfigError, from_dict, to_dict
from latentdiff.diffusion.objectives import DiffusionLossConfig
from latentdiff.diffusion.schedule import ScheduleConfig
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.formats.diffusers_names import (
    SD_SCALE_FACTOR,
    UnsupportedArchitecture,
    model_state_shapes,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from latentdiff.io.checkpoint import CONFIG_NAME, read_checkpoint, save_checkpoint
from latentdiff.io.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMATS = ("native", "original", "diffusers")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD v1: a Hugging Face CLIPTextModel, its own names
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD v2: OpenCLIP's text tower
EMA_PREFIX = "model_ema."
METADATA_KEY = "latentdiff_components"  # our configs, stored in the metadata of the single files we write
TEXT_LAYOUTS = ("hf", "openclip")
# Buffers CompVis' LatentDiffusion recomputes from its schedule, EMA bookkeeping, and CLIP's position ids (a
# non-persistent buffer in current transformers; merged checkpoints sometimes carry a corrupted float copy).
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor", "model_ema.decay", "model_ema.num_updates",
})
POSITION_IDS = "text_model.embeddings.position_ids"
# Old PyTorch Lightning checkpoints (SD v1.x .ckpt files) use this class as a dictionary key; it is mapped to an
# inert stand-in so that torch.load(weights_only=True) can read them without importing Lightning.
_LIGHTNING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
DIFFUSERS_BIN_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
# Parts of a CLIP checkpoint that the text encoder does not use (a CLIPTextModelWithProjection's projection...).
CLIP_UNUSED_PREFIXES = ("text_projection", "logit_scale", "visual_projection", "vision_model")
CLIP_PAD_TOKENS = {"hf": 49407, "openclip": 0}  # SD v1 pads with the end token, SD v2 (OpenCLIP) with "!"
PARAMETERIZATIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers' names -> ours


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


# ------------------------------------------------------------------------------------------ reading files


class _InertLightningClass:
    """Stands in for a PyTorch Lightning class named in an old checkpoint; it does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``, with a clear refusal when the pickle wants to run code."""
    allowed = [(_InertLightningClass, name) for name in _LIGHTNING_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if found is None:
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
            reason = detail.group(1).strip() if detail else str(e).strip().splitlines()[-1]
            raise CheckpointError(f"{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read "
                                  f"({reason})") from e
        raise CheckpointError(
            f"{path} is a pickle that would need to run code to load (it refers to `{found.group(1)}`). Pickled "
            "checkpoints can run arbitrary code, so they are only read with torch.load(weights_only=True), and this "
            "one is refused; use a .safetensors copy of it, or re-save its state dict as plain tensors with a tool "
            "you trust") from e
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a loaded .ckpt (Lightning nests it under ``state_dict``)."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    return tensors


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of one weights file: ``.safetensors``, or a pickled ``.ckpt``/``.pt``/``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
    return _unwrap(safe_torch_load(path), path), {}


def _strip(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix`` without it, or the whole dict when no key has the prefix."""
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def _show(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else f" ({len(keys)})")


def check_state_dict(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise a ``CheckpointError`` naming missing, unexpected and mis-shaped keys (a few of each, and counts)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {expected[k]}"
              for k in sorted(set(expected) & set(weights)) if tuple(weights[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = [f"{label}: {_show(keys, 4 if label == 'shape mismatches' else 6)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"the weights do not fit the {what}; " + "; ".join(parts))


# ------------------------------------------------------------------------------------------ architecture


def _block_ids(state_dict: dict[str, torch.Tensor], prefix: str, position: int) -> list[int]:
    """The distinct integers at dotted ``position`` of the keys that start with ``prefix``."""
    ids = set()
    for key in state_dict:
        if key.startswith(prefix):
            part = key.split(".")[position]
            if part.isdigit():
                ids.add(int(part))
    return sorted(ids)


def _sd_heads(context_dim: int | None, linear: bool, widths: list[int], spatial: bool) -> dict[str, int]:
    """The attention heads the Stable Diffusion family uses, as the shapes cannot tell them.

    SD v1 (CLIP ViT-L context, 768) has 8 heads at every width; SD v2 (OpenCLIP ViT-H context, 1024) has 64-wide
    heads. Other models follow their projection type (linear: 64-wide, as SD v2 and SDXL; conv: 8 heads), and
    LDM's single-layer AttentionBlock models use 32-wide heads. A width that a head width does not divide falls
    back to a head count.
    """
    if not spatial:
        width = 32
    elif context_dim == 768:
        width = -1
    elif context_dim == 1024 or linear:
        width = 64
    else:
        width = -1
    if width != -1 and all(w % width == 0 for w in widths):
        return {"num_heads": -1, "num_head_channels": width}
    heads = 8 if all(w % 8 == 0 for w in widths) else 1
    return {"num_heads": heads, "num_head_channels": -1}


def _with_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    overrides = dict(overrides)
    if "num_heads" in overrides and "num_head_channels" not in overrides:
        overrides["num_head_channels"] = -1
    if "num_head_channels" in overrides and "num_heads" not in overrides:
        overrides["num_heads"] = -1
    return dataclasses.replace(config, **overrides)


def infer_unet_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> UNetConfig:
    """The ``UNetConfig`` of an original-layout UNet state dict (with or without ``model.diffusion_model.``).

    Read from the shapes: in/out channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
    transformer_depth, context_dim, conv vs linear transformer projections, scale-shift norm, class labels. The
    head count is not in the shapes; it follows the SD convention (context 768: 8 heads as SD v1; context 1024:
    64-wide heads as SD v2). Any field can be given in ``overrides`` instead (``num_heads=…`` alone implies
    ``num_head_channels=-1`` and vice versa). A cross-attention context as wide as every transformer it feeds is
    indistinguishable from self-attention only when all transformers have one width; it is then taken as a context.
    """
    sd = _strip(state_dict, UNET_PREFIX)
    try:
        first = sd["input_blocks.0.0.weight"]
        model_channels, in_channels = int(first.shape[0]), int(first.shape[1])
        out_channels = int(sd["out.2.weight"].shape[0])
        n_in = _block_ids(sd, "input_blocks.", 1)[-1] + 1
        downs = [i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in sd]
        levels = len(downs) + 1
        res_blocks, rem = divmod(n_in - levels, levels)
        if rem or res_blocks < 1 or downs != [(level + 1) * (res_blocks + 1) for level in range(levels - 1)]:
            raise CheckpointError("the input blocks do not form levels closed by a strided conv ('op'); only "
                                  "conv-resampling UNets can be read without a config")
        channel_mult, attention_resolutions, widths = [], [], []
        for level in range(levels):
            block = 1 + level * (res_blocks + 1)
            width = int(sd[f"input_blocks.{block}.0.out_layers.3.weight"].shape[0])
            if width % model_channels:
                raise CheckpointError(f"level {level} is {width} wide, not a multiple of {model_channels}")
            channel_mult.append(width // model_channels)
            if any(k.startswith(f"input_blocks.{block}.1.") for k in sd):
                attention_resolutions.append(2 ** level)
                widths.append(width)
        widths.append(model_channels * channel_mult[-1])
        mid = "middle_block.1."
        spatial = f"{mid}proj_in.weight" in sd
        if not spatial and f"{mid}qkv.weight" not in sd:
            raise CheckpointError("the middle block has neither a transformer (proj_in) nor an attention block (qkv)")
        context_dim, linear, depth = None, False, 1
        if spatial:
            linear = sd[f"{mid}proj_in.weight"].ndim == 2
            depth = _block_ids(sd, f"{mid}transformer_blocks.", 3)[-1] + 1
            pairs = {(int(v.shape[1]), int(sd[k.replace("to_k", "to_q")].shape[0]))
                     for k, v in sd.items() if k.endswith("transformer_blocks.0.attn2.to_k.weight")}
            key_dims = {k for k, _ in pairs}
            self_only = all(k == q for k, q in pairs) and len({q for _, q in pairs}) > 1
            if not self_only:
                if len(key_dims) != 1:
                    raise CheckpointError(f"the cross-attention layers read contexts of different widths {key_dims}")
                context_dim = key_dims.pop()
        emb = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
        scale_shift = emb == 2 * sd["input_blocks.1.0.out_layers.3.weight"].shape[0]
        if any(k.startswith("label_emb.0.") for k in sd):
            raise CheckpointError("this UNet has an SDXL-style vector embedding (label_emb.0.*), which our UNet lacks")
        num_classes = int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None
    except KeyError as e:
        raise CheckpointError(f"cannot read the UNet architecture from the weights: no key {e}") from None
    config = UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res_blocks,
        attention_resolutions=tuple(sorted(attention_resolutions, reverse=True)),  # CompVis writes (4, 2, 1)
        transformer_depth=depth,
        context_dim=context_dim,
        use_spatial_transformer=spatial,
        use_linear_in_transformer=linear,
        use_scale_shift_norm=bool(scale_shift),
        num_classes=num_classes,
        legacy=False,
        **_sd_heads(context_dim, linear, widths, spatial),
    )
    return _with_overrides(config, overrides)


def infer_autoencoder_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> AutoencoderConfig:
    """The ``AutoencoderConfig`` of an original-layout KL VAE state dict (with or without ``first_stage_model.``).

    Read from the shapes: ch, ch_mult, num_res_blocks, z_channels, double_z, embed_dim, in/out channels, attention
    levels. ``resolution`` only places ``attn_resolutions`` and is taken as 256 (SD's training size); the group
    count of the norms is not in the shapes and is taken as 32.
    """
    sd = _strip(state_dict, VAE_PREFIX)
    if "quantize.embedding.weight" in sd:
        raise CheckpointError("this is a vector-quantised (VQ) first stage; the Stable Diffusion formats hold the "
                              "KL autoencoder (native VQ checkpoints load with load_autoencoder)")
    try:
        conv_in = sd["encoder.conv_in.weight"]
        ch, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        levels = _block_ids(sd, "encoder.down.", 2)[-1] + 1
        res_blocks = _block_ids(sd, "encoder.down.0.block.", 4)[-1] + 1
        channel_mult = []
        for level in range(levels):
            width = int(sd[f"encoder.down.{level}.block.{res_blocks - 1}.conv2.weight"].shape[0])
            if width % ch:
                raise CheckpointError(f"encoder level {level} is {width} wide, not a multiple of {ch}")
            channel_mult.append(width // ch)
        resolution = int(overrides.get("resolution", 256))
        attn = tuple(resolution // 2 ** level for level in range(levels)
                     if any(k.startswith(f"encoder.down.{level}.attn.") for k in sd))
        z_channels = int(sd["decoder.conv_in.weight"].shape[1])
        double_z = int(sd["encoder.conv_out.weight"].shape[0]) == 2 * z_channels
        embed_dim = int(sd["post_quant_conv.weight"].shape[1])
        out_ch = int(sd["decoder.conv_out.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"cannot read the VAE architecture from the weights: no key {e}") from None
    config = AutoencoderConfig(regularizer="kl", in_channels=in_channels, out_ch=out_ch, resolution=resolution,
                               ch=ch, ch_mult=tuple(channel_mult), num_res_blocks=res_blocks, attn_resolutions=attn,
                               resamp_with_conv=levels == 1 or "encoder.down.0.downsample.conv.weight" in sd,
                               z_channels=z_channels, double_z=double_z, embed_dim=embed_dim)
    return dataclasses.replace(config, **overrides)


def infer_clip_text_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A Hugging Face ``CLIPTextConfig`` dict for a ``CLIPTextModel`` state dict.

    Shapes give the widths and depth; heads (64 wide) and the activation (quick_gelu for OpenAI's 768-wide
    ViT-L of SD v1, gelu for OpenCLIP's 1024-wide ViT-H of SD v2) follow the SD text encoders.
    """
    try:
        vocab, hidden = (int(n) for n in state_dict["text_model.embeddings.token_embedding.weight"].shape)
        positions = int(state_dict["text_model.embeddings.position_embedding.weight"].shape[0])
        intermediate = int(state_dict["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"cannot read the text encoder's architecture: no key {e}") from None
    layers = _block_ids(state_dict, "text_model.encoder.layers.", 3)[-1] + 1
    projection = state_dict.get("text_projection.weight")
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64), "max_position_embeddings": positions,
        "hidden_act": "quick_gelu" if hidden == 768 else "gelu", "layer_norm_eps": 1e-5,
        "projection_dim": int(projection.shape[0]) if projection is not None else hidden,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,  # CLIP's tokenizer ids
    }


# ------------------------------------------------------------------------------------------ loading


def _default_openclip_to_hf() -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return openclip_to_hf


def _default_hf_to_openclip() -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return hf_to_openclip


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
        parts = [f"{label}: {_show(keys)}" for label, keys in
                 (("UNet weights without an EMA copy", missing), ("EMA entries of no UNet weight", unexpected))
                 if keys]
        raise CheckpointError("the checkpoint's EMA weights do not match its UNet; " + "; ".join(parts) +
                              "; pass ema=False (--no-ema) to take the raw weights")
    return {k: sd[e] for k, e in wanted.items()}


def _metadata_components(metadata: dict[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in metadata:
        return {}
    try:
        return json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        logger.warning("ignoring unreadable %s metadata", METADATA_KEY)
        return {}


def _config_from(data: dict[str, Any] | None, cls: type, what: str) -> Any:
    if not data:
        return None
    try:
        return from_dict(cls, data, what)
    except ConfigError as e:
        raise CheckpointError(f"the stored {what} config is invalid ({e})") from e


_CLIP_TEXT_MODULES = ("embeddings.", "encoder.", "final_layer_norm.")


def _hf_text_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def split_original(state_dict: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None, ema: bool = True,
                   text_encoder: bool = True, text_encoder_converter: Callable | None = None,
                   strict: bool = True) -> StableDiffusionComponents:
    """Components from a state dict in the original single-file layout (full model, bare UNet or bare VAE).

    ``text_encoder_converter`` turns an OpenCLIP text tower (keys without ``cond_stage_model.model.``) into
    ``CLIPTextModel`` names; the default is ``latentdiff.conditioning.clip.openclip_to_hf``. With ``strict`` any
    key that belongs to no component (other than schedule buffers and EMA bookkeeping) is an error.
    """
    stored = _metadata_components(metadata or {})
    comps = StableDiffusionComponents(source="original")
    used: set[str] = set()
    full = any(k.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")) for k in state_dict)
    if full:
        unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
        vae_keys = [k for k in state_dict if k.startswith(VAE_PREFIX)]
    else:  # a bare UNet or VAE: add the prefix its keys would have in a full file
        if "input_blocks.0.0.weight" in state_dict:
            state_dict = {UNET_PREFIX + k: v for k, v in state_dict.items()}
            unet_keys, vae_keys = list(state_dict), []
        elif "encoder.conv_in.weight" in state_dict and "decoder.conv_in.weight" in state_dict:
            # VAE files from training runs may carry their loss (LPIPS, discriminator): not part of the model.
            extras = [k for k in state_dict if k.startswith(("loss.", EMA_PREFIX))]
            if extras:
                logger.info("ignoring %d loss / EMA entries of the VAE file (%s ...)", len(extras), extras[0])
            used.update(VAE_PREFIX + k for k in extras)
            state_dict = {VAE_PREFIX + k: v for k, v in state_dict.items()}
            unet_keys, vae_keys = [], [k for k in state_dict if k not in used]
        else:
            raise CheckpointError("not a Stable Diffusion checkpoint in the original layout: no "
                                  "model.diffusion_model.*, first_stage_model.*, input_blocks.* or encoder.* keys "
                                  f"(first keys: {', '.join(list(state_dict)[:5])})")
    if unet_keys:
        ema_weights = _ema_weights(state_dict, unet_keys) if ema else None
        source = ema_weights if ema_weights is not None else {k: state_dict[k] for k in unet_keys}
        comps.unet = {k[len(UNET_PREFIX):]: v for k, v in source.items()}
        comps.ema = ema_weights is not None
        comps.unet_config = _config_from(stored.get("unet"), UNetConfig, "unet") or infer_unet_config(comps.unet)
        check_state_dict(comps.unet, model_state_shapes(comps.unet_config), "UNet")
        used.update(unet_keys)
        used.update(k for k in state_dict if k.startswith(EMA_PREFIX))  # used, or deliberately left out
    if vae_keys:
        comps.vae = {k[len(VAE_PREFIX):]: state_dict[k] for k in vae_keys}
        comps.vae_config = (_config_from(stored.get("vae"), AutoencoderConfig, "vae")
                            or infer_autoencoder_config(comps.vae))
        check_state_dict(comps.vae, model_state_shapes(comps.vae_config), "VAE")
        used.update(vae_keys)
    clip_keys = [k for k in state_dict if k.startswith(CLIP_PREFIX)]
    openclip_keys = [k for k in state_dict if k.startswith(OPENCLIP_PREFIX)]
    if clip_keys and openclip_keys:
        raise CheckpointError("the checkpoint holds text encoders in both the CLIP and the OpenCLIP layout")
    if text_encoder and clip_keys:
        comps.text_encoder = _hf_text_names({k[len(CLIP_PREFIX):]: state_dict[k] for k in clip_keys})
        comps.text_encoder_layout = "hf"
    elif text_encoder and openclip_keys:
        converter = text_encoder_converter or _default_openclip_to_hf()
        comps.text_encoder = _hf_text_names(converter({k[len(OPENCLIP_PREFIX):]: state_dict[k]
                                                       for k in openclip_keys}))
        comps.text_encoder_layout = "openclip"
        # SD v2 conditions on 23 layers of OpenCLIP ViT-H's 24: the whole tower is the penultimate-layer model, a
        # file holding 23 (as diffusers' converter writes them) is already cut to the last layer that runs.
        layers = len(_block_ids(comps.text_encoder, "text_model.encoder.layers.", 3))
        comps.text_encoder_output_layer = "penultimate" if layers == 24 else "last"
    used.update(clip_keys + openclip_keys)
    if comps.text_encoder is not None:
        comps.text_encoder_config = stored.get("text_encoder_config")
        comps.text_encoder_output_layer = stored.get("text_encoder_output_layer", comps.text_encoder_output_layer)
    leftover = sorted(set(state_dict) - used - IGNORED_KEYS)
    if leftover:
        message = f"keys that belong to no Stable Diffusion component: {_show(leftover)}"
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
    return comps


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON file ({e})") from e


def _read_component_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of one diffusers / transformers component folder (single, sharded, .bin, or fp16 variant)."""
    for name in DIFFUSERS_WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)[0]
    for index in sorted(folder.glob("*.safetensors.index.json")):
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
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
    try:
        ours = convert(weights, config)
    except KeyError as e:
        raise CheckpointError(f"{folder}: the {what} weights do not fit its config.json: {e.args[0]}") from None
    check_state_dict(ours, model_state_shapes(config), f"{what} described by {folder / CONFIG_NAME}")
    return ours


def _load_diffusers_component(folder: Path, comps: StableDiffusionComponents, text_encoder: bool) -> str | None:
    """Fill ``comps`` from one component folder; returns which component it was (None: not a known one)."""
    config = _read_json(folder / CONFIG_NAME)
    kind = config.get("_class_name") or (config.get("architectures") or [None])[0]
    try:
        if kind == "UNet2DConditionModel":
            comps.unet_config = unet_config_from_diffusers(config)
            comps.unet = _rename_checked(unet_from_diffusers, _read_component_weights(folder), comps.unet_config,
                                         "UNet", folder)
            if config.get("sample_size"):  # latent pixels; _load_diffusers corrects the factor 8 from the VAE
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
            comps.text_encoder = _hf_text_names(_read_component_weights(folder))
            comps.text_encoder_config = {k: v for k, v in config.items() if not k.startswith("_")}
            # SD v2's text encoder is OpenCLIP ViT-H (1024 wide); an original file stores it in OpenCLIP's layout.
            comps.text_encoder_layout = "openclip" if config.get("hidden_size") == 1024 else "hf"
        return "text_encoder"
    return None


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def _load_diffusers(folder: Path, text_encoder: bool) -> StableDiffusionComponents:
    comps = StableDiffusionComponents(source="diffusers")
    if (folder / CONFIG_NAME).is_file():  # a single component's folder
        if _load_diffusers_component(folder, comps, text_encoder) is None:
            raise CheckpointError(f"{folder / CONFIG_NAME} describes no UNet2DConditionModel, AutoencoderKL or "
                                  "CLIPTextModel")
        return comps
    for name in ("unet", "vae", "text_encoder"):
        if (folder / name / CONFIG_NAME).is_file():
            _load_diffusers_component(folder / name, comps, text_encoder)
    if (folder / "tokenizer").is_dir():
        comps.tokenizer_dir = folder / "tokenizer"
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        comps.prediction_type = _read_json(scheduler).get("prediction_type", comps.prediction_type)
    if comps.unet is not None and comps.vae_config is not None and comps.image_size:
        comps.image_size = comps.image_size // 8 * comps.vae_config.downsample_factor
    if comps.unet is None and comps.vae is None and comps.text_encoder is None:
        raise CheckpointError(f"{folder} holds no unet/, vae/ or text_encoder/ with a config.json")
    return comps


def _load_native(path: Path, text_encoder: bool) -> StableDiffusionComponents:
    weights, config = read_checkpoint(path)
    extra = config.get("stable_diffusion", {})
    comps = StableDiffusionComponents(source="native", ema=bool(extra.get("ema", False)))
    task, model = config.get("task", "autoencoder"), config.get("model") or {}
    if task == "autoencoder":
        comps.vae, comps.vae_config = weights, _config_from(model, AutoencoderConfig, "model")
        check_state_dict(comps.vae, model_state_shapes(comps.vae_config), "VAE")
        comps.scale_factor = float(extra.get("scale_factor", comps.scale_factor))
        return comps
    if task != "diffusion":
        raise CheckpointError(f"{path} is a {task!r} checkpoint, not a diffusion model or an autoencoder")
    comps.unet = {k[len(UNET_PREFIX):]: v for k, v in weights.items() if k.startswith(UNET_PREFIX)}
    comps.unet_config = _config_from(model.get("unet"), UNetConfig, "model.unet")
    check_state_dict(comps.unet, model_state_shapes(comps.unet_config), "UNet")
    vae = {k[len(VAE_PREFIX):]: v for k, v in weights.items() if k.startswith(VAE_PREFIX)}
    if vae:
        comps.vae, comps.vae_config = vae, _config_from(model.get("first_stage_config"), AutoencoderConfig,
                                                        "model.first_stage_config")
        check_state_dict(comps.vae, model_state_shapes(comps.vae_config), "VAE")
    comps.schedule = _config_from(model.get("schedule"), ScheduleConfig, "model.schedule")
    comps.conditioner = _config_from(model.get("conditioner"), ConditionerConfig, "model.conditioner")
    clip = comps.conditioner.clip if comps.conditioner and comps.conditioner.text_encoder == "clip" else None
    # cond_stage_model.transformer.* is a CLIP only with a clip conditioner (or in the first native files, which
    # had no conditioner); a jointly trained text transformer keeps its own weights under the same name.
    text = {k[len(CLIP_PREFIX):]: v for k, v in weights.items() if k.startswith(CLIP_PREFIX)}
    if text and text_encoder and (clip is not None or comps.conditioner is None):
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
    loss = _config_from(model.get("loss"), DiffusionLossConfig, "model.loss")
    diffusers_names = {ours: theirs for theirs, ours in PARAMETERIZATIONS.items()}
    comps.prediction_type = extra.get("prediction_type") or (
        diffusers_names[loss.parameterization] if loss is not None else comps.prediction_type)
    return comps


def _hf_clip_config(config: Any) -> dict[str, Any]:
    """A Hugging Face ``CLIPTextConfig`` dict for our ``CLIPTextConfig`` (all its layers, as the weights hold)."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **config.to_hf(),
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}


def _is_diffusers_folder(path: Path) -> bool:
    """A diffusers pipeline folder, or one diffusers / transformers component (its config names its class)."""
    if (path / "model_index.json").is_file() or any((path / n / CONFIG_NAME).is_file() for n in ("unet", "vae")):
        return True
    if (path / CONFIG_NAME).is_file():
        config = _read_json(path / CONFIG_NAME)
        return "_class_name" in config or "model_type" in config
    return False


def _is_diffusers_named(sd: dict[str, torch.Tensor]) -> bool:
    return "time_embedding.linear_1.weight" in sd or "encoder.down_blocks.0.resnets.0.conv1.weight" in sd


def load_stable_diffusion_weights(path: str | Path, *, ema: bool = True, text_encoder: bool = True,
                                  text_encoder_converter: Callable | None = None,
                                  strict: bool = True) -> StableDiffusionComponents:
    """Read Stable Diffusion weights in any supported format into components in our names.

    ``path``: an original single file (``.safetensors`` / ``.ckpt``; full model, bare UNet or bare VAE), a diffusers
    pipeline or component folder, a diffusers-named weights file with its ``config.json`` beside it, or a native
    checkpoint (file, checkpoint folder, run folder). ``ema``: take the UNet's EMA copy when the file has one.
    ``text_encoder=False`` leaves the text encoder out. ``text_encoder_converter`` maps an SD v2 OpenCLIP text
    tower to ``CLIPTextModel`` names (default: ``latentdiff.conditioning.clip.openclip_to_hf``). Weights keep their
    stored dtype. Raises ``CheckpointError`` naming what does not fit.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        if _is_diffusers_folder(path):
            return _load_diffusers(path, text_encoder)
        return _load_native(path, text_encoder)
    sd, metadata = read_state_dict(path)
    if "latentdiff_config" in metadata:
        return _load_native(path, text_encoder)
    if _is_diffusers_named(sd):
        if (path.parent / CONFIG_NAME).is_file():
            comps = StableDiffusionComponents(source="diffusers")
            _load_diffusers_component(path.parent, comps, text_encoder)
            return comps
        raise CheckpointError(f"{path} is in diffusers' names but has no {CONFIG_NAME} beside it to describe "
                              "the architecture")
    return split_original(sd, metadata=metadata, ema=ema, text_encoder=text_encoder,
                          text_encoder_converter=text_encoder_converter, strict=strict)


# ------------------------------------------------------------------------------------------ saving


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()  # slices of one tensor (q, k, v of a fused qkv) share it
            if storage in seen:
                tensor = tensor.clone()
            else:
                seen.add(storage)
        out[key] = tensor
    return out


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
            converter = text_encoder_converter or _default_hf_to_openclip()
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
    tensors = _plain(to_original_state_dict(comps, text_encoder_converter))
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(_stored_configs(comps))})
    return path


def _write_component(folder: Path, config: dict[str, Any], weights: dict[str, torch.Tensor], weights_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(_plain(weights), str(folder / weights_name), metadata={"format": "pt"})


def _scheduler_config(comps: StableDiffusionComponents) -> dict[str, Any]:
    # Stable Diffusion's training schedule (CompVis' "linear" = diffusers' "scaled_linear") and its PNDM defaults.
    return {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
            "prediction_type": comps.prediction_type, "timestep_spacing": "leading"}


def save_diffusers(comps: StableDiffusionComponents, folder: str | Path) -> Path:
    """Write a diffusers folder that ``from_pretrained`` loads.

    A UNet (with VAE / text encoder) becomes a pipeline folder: ``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder/``, ``scheduler/`` and, when the source had one, ``tokenizer/``. A VAE alone becomes a component
    folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), as diffusers publishes its VAEs.
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
        _write_component(folder, vae_config, vae_to_diffusers(comps.vae, comps.vae_config),
                         DIFFUSERS_WEIGHT_FILES[0])
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    version = (unet_config or vae_config or {}).get("_diffusers_version", "0.30.0")
    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": version}
    if comps.unet is not None:
        _write_component(folder / "unet", unet_config, unet_to_diffusers(comps.unet, comps.unet_config),
                         DIFFUSERS_WEIGHT_FILES[0])
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
        scheduler = folder / "scheduler"
        scheduler.mkdir(exist_ok=True)
        (scheduler / "scheduler_config.json").write_text(json.dumps(_scheduler_config(comps), indent=2) + "\n")
        index["scheduler"] = ["diffusers", "PNDMScheduler"]
    if comps.vae is not None:
        _write_component(folder / "vae", vae_config, vae_to_diffusers(comps.vae, comps.vae_config),
                         DIFFUSERS_WEIGHT_FILES[0])
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if comps.text_encoder is not None:
        text, config = _diffusers_text_encoder(comps)
        _write_component(folder / "text_encoder", config, text, DIFFUSERS_WEIGHT_FILES[1])
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    if comps.tokenizer_dir is not None and Path(comps.tokenizer_dir).is_dir():
        if Path(comps.tokenizer_dir).resolve() != (folder / "tokenizer").resolve():
            shutil.copytree(comps.tokenizer_dir, folder / "tokenizer", dirs_exist_ok=True)
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def _diffusers_text_encoder(comps: StableDiffusionComponents) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The text encoder as diffusers stores it: a "penultimate" model loses its last layer (never run), as SD v2's
    23-layer text_encoder/ does, so that ``CLIPTextModel``'s last hidden state is the conditioning."""
    text = comps.text_encoder
    config = dict(comps.text_encoder_config or infer_clip_text_config(text))
    config.setdefault("architectures", ["CLIPTextModel"])
    config.setdefault("model_type", "clip_text_model")
    if comps.text_encoder_output_layer == "penultimate":
        last = len(_block_ids(text, "text_model.encoder.layers.", 3)) - 1
        text = {k: v for k, v in text.items() if not k.startswith(f"text_model.encoder.layers.{last}.")}
        config["num_hidden_layers"] = last
    return text, config


def _unet_sample_size(comps: StableDiffusionComponents) -> int:
    factor = comps.vae_config.downsample_factor if comps.vae_config else 8
    return (comps.image_size or 512) // factor  # SD v1's 512 px when the source does not say


def _pad_token_id(comps: StableDiffusionComponents) -> int:
    """What the model's prompts are padded with: as the source says, its tokenizer folder's, else by layout."""
    if comps.pad_token_id is not None:
        return comps.pad_token_id
    if comps.tokenizer_dir is not None and Path(comps.tokenizer_dir).is_dir():
        return CLIPTokenizer(comps.tokenizer_dir).pad_token_id
    return CLIP_PAD_TOKENS.get(comps.text_encoder_layout or "hf", CLIP_PAD_TOKENS["hf"])


_CONDITIONING_MODES = {(True, False): "crossattn", (False, True): "concat", (True, True): "hybrid"}


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
        return save_checkpoint(run_dir, step, _plain(comps.vae), config, keep=0)
    if comps.vae is None:
        raise CheckpointError("a native diffusion checkpoint holds the UNet with its first stage, and this source "
                              "has no VAE; convert to 'original' or 'diffusers' instead")
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
    config = {"task": "diffusion", "model": model, "stable_diffusion": extra}
    return save_checkpoint(run_dir, step, _plain(weights), config, keep=0)


def convert(src: str | Path, dst: str | Path, to: str, *, ema: bool = True, dtype: torch.dtype | None = None,
            text_encoder: bool = True) -> Path:
    """Convert the checkpoint at ``src`` to format ``to`` ("native", "original" or "diffusers") at ``dst``.

    ``dst`` is a ``.safetensors`` file (original), a folder (diffusers) or a run folder (native). Returns what was
    written. ``dtype`` casts the floating-point weights (default: as stored).
    """
    if to not in FORMATS:
        raise ValueError(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    comps = load_stable_diffusion_weights(src, ema=ema, text_encoder=text_encoder)
    if dtype is not None:
        comps = comps.to(dtype)
    logger.info("read %s: %s", src, comps.describe())
    if to == "original":
        return save_original(comps, dst)
    if to == "diffusers":
        return save_diffusers(comps, dst)
    return save_native(comps, dst)


__all__ = [
    "FORMATS", "StableDiffusionComponents", "check_state_dict", "convert", "ema_key",
    "infer_autoencoder_config", "infer_clip_text_config", "infer_unet_config", "load_stable_diffusion_weights",
    "native_conditioning", "read_state_dict", "safe_torch_load", "save_diffusers", "save_native",
    "save_original", "split_original", "to_original_state_dict",
]
