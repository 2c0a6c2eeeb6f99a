"""Name and config maps between our (CompVis / original Stable Diffusion) models and diffusers' — the one place.

Our UNet and autoencoder use the parameter names of the original checkpoints (``input_blocks.4.1.proj_in``,
``encoder.down.0.block.1.conv1``); diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` hold the same
numbers under other names (``down_blocks.1.attentions.0.proj_in``, ``encoder.down_blocks.0.resnets.1.conv1``).
The map is not a literal table: it is derived from the architecture (number of levels, ResBlocks per level,
where attention is), by enumerating our model's own state-dict keys and renaming each one, so it is complete by
construction and the same function serves both directions.

Facts the maps encode (from diffusers' single-file loader, ``loaders/single_file_utils.py``):

- UNet: ``input_blocks.0.0`` is ``conv_in``; the other input blocks are, level by level, ``num_res_blocks``
  (ResBlock [+ transformer]) entries followed by one downsampler (``…0.op`` -> ``downsamplers.0.conv``); the
  middle block is (resnet 0, attention 0, resnet 1); output blocks run coarse to fine with one extra ResBlock per
  level, the upsampler (``conv``) after the attention when there is one. Inside a ResBlock ``in_layers.0/2``,
  ``emb_layers.1``, ``out_layers.0/3`` and ``skip_connection`` are ``norm1``/``conv1``, ``time_emb_proj``,
  ``norm2``/``conv2`` and ``conv_shortcut``. Transformer internals have the same names on both sides.
- VAE: ``encoder.down.i.block.j`` -> ``encoder.down_blocks.i.resnets.j`` (``nin_shortcut`` -> ``conv_shortcut``);
  ``mid.block_1/2`` -> ``mid_block.resnets.0/1``; ``mid.attn_1.{norm,q,k,v,proj_out}`` ->
  ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``, whose weights are 1x1 convolutions
  ``[C, C, 1, 1]`` here and Linear ``[C, C]`` there; ``norm_out`` -> ``conv_norm_out``. The decoder's levels are
  stored in opposite orders: our ``decoder.up.0`` is the full-resolution level (CompVis), diffusers'
  ``decoder.up_blocks.0`` is the coarsest.

diffusers calls the head count of SD v1 ``attention_head_dim`` (it is ``num_heads = 8``); for SD v2 the same field
lists the head count per level (``[5, 10, 20, 20]`` = channels / 64), which is our ``num_head_channels = 64``.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import torch

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig
from latentdiff.diffusion.unet import UNetConfig, UNetModel

# Inside one ResBlock: our sub-module path -> diffusers'.
UNET_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET_NAMES = {"nin_shortcut": "conv_shortcut"}  # norm1, conv1, norm2, conv2 are shared
VAE_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Older diffusers VAE files name the middle attention's projections differently; read them too.
VAE_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb": "class_embedding",
}
_VAE_TOP = {
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
    **{f"{part}.{name}": f"{part}.{name}" for part in ("encoder", "decoder") for name in ("conv_in", "conv_out")},
    **{f"{part}.norm_out": f"{part}.conv_norm_out" for part in ("encoder", "decoder")},
}


class UnsupportedArchitecture(ValueError):
    """An architecture that one of the two libraries cannot express."""


@dataclass(frozen=True)
class KeyMap:
    """Every parameter of one model under our name and diffusers' name, both directions.

    ``reshaped`` holds our names of the weights that are 1x1 convolutions here and Linear layers in diffusers.
    """

    ours_to_diffusers: dict[str, str]
    reshaped: frozenset[str] = frozenset()

    @property
    def diffusers_to_ours(self) -> dict[str, str]:
        return {v: k for k, v in self.ours_to_diffusers.items()}

    def to_diffusers(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename (and reshape) a state dict in our names; keys must match the map exactly."""
        _check_keys(state_dict, self.ours_to_diffusers, "our")
        out = {}
        for ours, theirs in self.ours_to_diffusers.items():
            tensor = state_dict[ours]
            if ours in self.reshaped and tensor.ndim == 4:
                tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
            out[theirs] = tensor
        return out

    def from_diffusers(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of ``to_diffusers``."""
        back = self.diffusers_to_ours
        _check_keys(state_dict, back, "diffusers")
        out = {}
        for theirs, ours in back.items():
            tensor = state_dict[theirs]
            if ours in self.reshaped and tensor.ndim == 2:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
            out[ours] = tensor
        return out


def _check_keys(state_dict: dict[str, Any], expected: dict[str, str], naming: str) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise KeyError(f"the state dict does not fit the architecture in {naming} names; " + "; ".join(parts))


def _rename(key: str, modules: dict[str, tuple[str, dict[str, str]]]) -> str:
    """Rename ``key`` by the longest module prefix in ``modules`` (prefix -> (new prefix, inner renames))."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            new_prefix, inner = modules[prefix]
            rest = ".".join(parts[cut:])
            for old, new in inner.items():  # inner renames apply to the leading sub-module path only
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{new_prefix}.{rest}"
    raise UnsupportedArchitecture(f"no diffusers name for parameter {key!r}")


_SHAPES_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def model_state_shapes(config: UNetConfig | AutoencoderConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of our UNet or autoencoder for ``config``, without allocating any weights."""
    key = repr(config)  # dataclass reprs list every field
    if key not in _SHAPES_CACHE:
        with torch.device("meta"):
            module = UNetModel(config) if isinstance(config, UNetConfig) else Autoencoder(config)
        if len(_SHAPES_CACHE) > 16:
            _SHAPES_CACHE.clear()
        _SHAPES_CACHE[key] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return _SHAPES_CACHE[key]


# --------------------------------------------------------------------------------------------------- UNet


def attention_levels(config: UNetConfig) -> list[bool]:
    """Whether each level (downsampling factor 1, 2, 4, ...) has a transformer after its ResBlocks."""
    return [2 ** level in config.attention_resolutions for level in range(len(config.channel_mult))]


def check_unet_supported(config: UNetConfig) -> None:
    """Raise ``UnsupportedArchitecture`` unless diffusers' ``UNet2DConditionModel`` can express ``config``."""
    problems = []
    if not config.use_spatial_transformer:
        problems.append("the single-layer AttentionBlock (use_spatial_transformer=False)")
    if not config.context_dim:
        problems.append("no cross-attention context (context_dim unset): diffusers' attn2 always has a context")
    if config.channel_mult[0] != 1:
        problems.append(f"a first channel multiplier of {config.channel_mult[0]} (conv_in's width is the first "
                        "level's)")
    if config.resblock_updown:
        problems.append("resampling inside ResBlocks (resblock_updown=True)")
    if not config.conv_resample:
        problems.append("resampling without convolutions (conv_resample=False)")
    if config.num_head_channels != -1:
        widths = [config.model_channels * m for m, a in zip(config.channel_mult, attention_levels(config), strict=True)
                  if a]
        widths.append(config.model_channels * config.channel_mult[-1])  # the middle block
        bad = [w for w in widths if w % config.num_head_channels]
        if bad:
            problems.append(f"attention widths {bad} not divisible by num_head_channels={config.num_head_channels}")
    if problems:
        raise UnsupportedArchitecture("diffusers' UNet2DConditionModel cannot express " + "; ".join(problems))


def unet_key_map(config: UNetConfig) -> KeyMap:
    """Our UNet's parameter names -> ``UNet2DConditionModel``'s, for the architecture ``config``."""
    check_unet_supported(config)
    resnet = UNET_RESNET_NAMES
    modules: dict[str, tuple[str, dict[str, str]]] = {k: (v, {}) for k, v in _UNET_TOP.items()}
    levels = len(config.channel_mult)
    attn = attention_levels(config)
    index = 1
    for level in range(levels):
        for j in range(config.num_res_blocks):
            modules[f"input_blocks.{index}.0"] = (f"down_blocks.{level}.resnets.{j}", resnet)
            if attn[level]:
                modules[f"input_blocks.{index}.1"] = (f"down_blocks.{level}.attentions.{j}", {})
            index += 1
        if level != levels - 1:
            modules[f"input_blocks.{index}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", {})
            index += 1
    modules["middle_block.0"] = ("mid_block.resnets.0", resnet)
    modules["middle_block.1"] = ("mid_block.attentions.0", {})
    modules["middle_block.2"] = ("mid_block.resnets.1", resnet)
    index = 0
    for up, level in enumerate(reversed(range(levels))):  # diffusers' up_blocks.0 is the coarsest level
        for j in range(config.num_res_blocks + 1):
            modules[f"output_blocks.{index}.0"] = (f"up_blocks.{up}.resnets.{j}", resnet)
            position = 1
            if attn[level]:
                modules[f"output_blocks.{index}.1"] = (f"up_blocks.{up}.attentions.{j}", {})
                position = 2
            if level and j == config.num_res_blocks:
                modules[f"output_blocks.{index}.{position}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", {})
            index += 1
    ours = model_state_shapes(config)
    return KeyMap({key: _rename(key, modules) for key in ours})


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """A state dict of our ``UNetModel`` (no prefix) in ``UNet2DConditionModel`` names."""
    return unet_key_map(config).to_diffusers(state_dict)


def unet_from_diffusers(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict in our ``UNetModel`` names."""
    return unet_key_map(config).from_diffusers(state_dict)


# ---------------------------------------------------------------------------------------------------- VAE


def check_vae_supported(config: AutoencoderConfig) -> None:
    """Raise ``UnsupportedArchitecture`` unless diffusers' ``AutoencoderKL`` can express ``config``."""
    problems = []
    if config.regularizer != "kl":
        problems.append(f"the {config.regularizer!r} regulariser (AutoencoderKL is the KL model)")
    if not config.double_z:
        problems.append("a single-output encoder (double_z=False)")
    if config.embed_dim != config.z_channels:
        problems.append(f"embed_dim {config.embed_dim} != z_channels {config.z_channels} (one latent_channels)")
    if config.attn_resolutions:
        problems.append("attention outside the middle block (attn_resolutions)")
    if not config.resamp_with_conv:
        problems.append("resampling without convolutions (resamp_with_conv=False)")
    if config.ch_mult[0] != 1:
        problems.append(f"a first channel multiplier of {config.ch_mult[0]} (conv_in's width is the first level's)")
    if problems:
        raise UnsupportedArchitecture("diffusers' AutoencoderKL cannot express " + "; ".join(problems))


def vae_key_map(config: AutoencoderConfig) -> KeyMap:
    """Our KL autoencoder's parameter names -> ``AutoencoderKL``'s, for the architecture ``config``."""
    check_vae_supported(config)
    modules: dict[str, tuple[str, dict[str, str]]] = {k: (v, {}) for k, v in _VAE_TOP.items()}
    levels = len(config.ch_mult)
    for part in ("encoder", "decoder"):
        modules[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", VAE_RESNET_NAMES)
        modules[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", VAE_RESNET_NAMES)
        modules[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", VAE_ATTENTION_NAMES)
    for level in range(levels):
        for j in range(config.num_res_blocks):
            modules[f"encoder.down.{level}.block.{j}"] = (f"encoder.down_blocks.{level}.resnets.{j}",
                                                          VAE_RESNET_NAMES)
        modules[f"encoder.down.{level}.downsample.conv"] = (f"encoder.down_blocks.{level}.downsamplers.0.conv", {})
        up = levels - 1 - level  # the decoder's levels are stored in opposite orders
        for j in range(config.num_res_blocks + 1):
            modules[f"decoder.up.{level}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", VAE_RESNET_NAMES)
        modules[f"decoder.up.{level}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", {})
    ours = model_state_shapes(config)
    mapping = {key: _rename(key, modules) for key in ours}
    reshaped = frozenset(k for k in ours if ".mid.attn_1." in k and k.endswith(".weight") and len(ours[k]) == 4)
    return KeyMap(mapping, reshaped)


def normalize_diffusers_vae_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Current diffusers names for a VAE state dict that may use the deprecated attention names."""
    out = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 2 and ".attentions." in key and parts[-2] in VAE_DEPRECATED_ATTENTION_NAMES:
            key = ".".join([*parts[:-2], VAE_DEPRECATED_ATTENTION_NAMES[parts[-2]], parts[-1]])
        out[key] = tensor
    return out


def vae_to_diffusers(state_dict: dict[str, torch.Tensor], config: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """A state dict of our KL ``Autoencoder`` (no prefix) in ``AutoencoderKL`` names."""
    return vae_key_map(config).to_diffusers(state_dict)


def vae_from_diffusers(state_dict: dict[str, torch.Tensor], config: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict (current or deprecated attention names) in our ``Autoencoder`` names."""
    return vae_key_map(config).from_diffusers(normalize_diffusers_vae_keys(state_dict))


# ------------------------------------------------------------------------------------------------ configs

# The UNet2DConditionModel settings our UNet always has; a diffusers config that differs is rejected.
_UNET_FIXED = {
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
}
# Defaults of the fields we read, as in UNet2DConditionModel's signature (old config files may omit them).
_UNET_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 1280, "attention_head_dim": 8, "use_linear_projection": False,
    "transformer_layers_per_block": 1, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "dropout": 0.0,
}
_VAE_FIXED = {
    "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    "shift_factor": None, "latents_mean": None, "latents_std": None,
}
_VAE_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
}
SD_SCALE_FACTOR = 0.18215  # Stable Diffusion v1/v2's latent scale (Rombach et al. 2022, app. G)
PARAMETERIZATIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers' prediction_type -> ours


def _diffusers_version() -> str:
    try:
        return version("diffusers")
    except Exception:  # diffusers is optional: the files only need a plausible version string
        return "0.30.0"


def _check_fixed(config: dict[str, Any], fixed: dict[str, Any], what: str) -> None:
    bad = []
    for key, expected in fixed.items():
        value = config.get(key, expected)
        if isinstance(value, (list, tuple)) and not isinstance(expected, (list, tuple)):
            value = value[0] if len(set(map(str, value))) == 1 else value
        if value != expected and not (expected is None and value in (None, False)):
            bad.append(f"{key}={value!r} (ours: {expected!r})")
    if bad:
        raise UnsupportedArchitecture(f"this {what} config uses features our model does not have: " + ", ".join(bad))


def _uniform(value: Any, name: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedArchitecture(f"{name} differs between blocks ({list(value)}); ours is one value")
        return value[0]
    return value


def unet_config_to_diffusers(config: UNetConfig, sample_size: int | None = None) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config (as in its ``config.json``) of our UNet architecture ``config``.

    Heads: ``num_heads`` becomes diffusers' ``attention_head_dim`` as is (it means the head count there); a head
    width ``num_head_channels`` becomes the per-level head counts ``block_out_channels[i] // width``.
    """
    check_unet_supported(config)
    widths = [config.model_channels * m for m in config.channel_mult]
    attn = attention_levels(config)
    if config.num_head_channels != -1:
        heads: int | list[int] = [max(1, w // config.num_head_channels) for w in widths]
    else:
        heads = config.num_heads
    out = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": _diffusers_version(),
        "sample_size": sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "cross_attention_dim": config.context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": config.use_linear_in_transformer,
        "transformer_layers_per_block": config.transformer_depth,
        "num_class_embeds": config.num_classes or None,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "dropout": config.dropout,
        "upcast_attention": False,
    }
    out.update({k: v for k, v in _UNET_FIXED.items() if k not in out})
    return out


def unet_config_from_diffusers(config: dict[str, Any]) -> UNetConfig:
    """Our ``UNetConfig`` for a ``UNet2DConditionModel`` config dict; unsupported features raise."""
    _check_fixed(config, _UNET_FIXED, "UNet2DConditionModel")

    def get(key: str) -> Any:
        value = config.get(key)
        return _UNET_DEFAULTS[key] if value is None and key != "num_class_embeds" else value

    widths = list(get("block_out_channels"))
    base = widths[0]
    if any(w % base for w in widths):
        raise UnsupportedArchitecture(f"block_out_channels {widths} are not multiples of the first one")
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    known_down, known_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
    if set(down) - known_down or set(up) - known_up or len(down) != len(widths) or len(up) != len(widths):
        raise UnsupportedArchitecture(f"block types {down} / {up} are not the SD UNet's")
    attn = [t.startswith("CrossAttn") for t in down]
    if [t.startswith("CrossAttn") for t in reversed(up)] != attn:
        raise UnsupportedArchitecture(f"attention differs between down {down} and up {up} blocks; ours is symmetric")
    heads = get("attention_head_dim")
    attended = [w for w, a in zip(widths, attn, strict=True) if a] + [widths[-1]]
    if isinstance(heads, int):
        head_fields = {"num_heads": heads, "num_head_channels": -1}
    else:
        heads = list(heads)
        if len(heads) != len(widths):
            raise UnsupportedArchitecture(f"attention_head_dim {heads} does not give one value per block {widths}")
        per_level = [(w, h) for w, h, a in zip(widths, heads, attn, strict=True) if a] + [(widths[-1], heads[-1])]
        head_widths = {w // h for w, h in per_level}
        if len(head_widths) == 1 and all(w % h == 0 for w, h in per_level):
            head_fields = {"num_heads": -1, "num_head_channels": head_widths.pop()}
        elif len({h for _, h in per_level}) == 1:
            head_fields = {"num_heads": per_level[0][1], "num_head_channels": -1}
        else:
            raise UnsupportedArchitecture(f"attention heads {heads} over widths {attended} are neither one head "
                                          "count nor one head width")
    return UNetConfig(
        in_channels=get("in_channels"),
        out_channels=get("out_channels"),
        model_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=_uniform(get("layers_per_block"), "layers_per_block"),
        attention_resolutions=tuple(2 ** i for i in reversed(range(len(attn))) if attn[i]),  # CompVis: (4, 2, 1)
        dropout=float(get("dropout")),
        transformer_depth=_uniform(get("transformer_layers_per_block"), "transformer_layers_per_block"),
        context_dim=_uniform(get("cross_attention_dim"), "cross_attention_dim"),
        use_spatial_transformer=True,
        use_linear_in_transformer=bool(get("use_linear_projection")),
        use_scale_shift_norm=get("resnet_time_scale_shift") == "scale_shift",
        num_classes=config.get("num_class_embeds"),
        legacy=False,
        **head_fields,
    )


def vae_config_to_diffusers(config: AutoencoderConfig, scaling_factor: float = SD_SCALE_FACTOR) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of our KL autoencoder ``config`` (``scaling_factor`` is the latent scale)."""
    check_vae_supported(config)
    levels = len(config.ch_mult)
    out = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _diffusers_version(),
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.resolution,
        "scaling_factor": scaling_factor,
        "force_upcast": True,
    }
    out.update({k: v for k, v in _VAE_FIXED.items() if k not in out})
    return out


def vae_config_from_diffusers(config: dict[str, Any]) -> tuple[AutoencoderConfig, float]:
    """Our ``AutoencoderConfig`` and the latent scale factor for an ``AutoencoderKL`` config dict."""
    _check_fixed(config, _VAE_FIXED, "AutoencoderKL")

    def get(key: str) -> Any:
        value = config.get(key)
        return _VAE_DEFAULTS[key] if value is None else value

    widths = list(get("block_out_channels"))
    levels = len(widths)
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    if down != ["DownEncoderBlock2D"] * levels or up != ["UpDecoderBlock2D"] * levels:
        raise UnsupportedArchitecture(f"block types {down} / {up} are not the SD VAE's")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise UnsupportedArchitecture(f"block_out_channels {widths} are not multiples of the first one")
    size = get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    latent = get("latent_channels")
    ae = AutoencoderConfig(regularizer="kl", in_channels=get("in_channels"), out_ch=get("out_channels"),
                           resolution=int(size), ch=ch, ch_mult=tuple(w // ch for w in widths),
                           num_res_blocks=get("layers_per_block"), attn_resolutions=(), z_channels=latent,
                           double_z=True, embed_dim=latent, norm_groups=get("norm_num_groups"))
    return ae, float(get("scaling_factor"))


__all__ = [
    "KeyMap", "SD_SCALE_FACTOR", "UNET_RESNET_NAMES", "UnsupportedArchitecture", "VAE_ATTENTION_NAMES",
    "VAE_RESNET_NAMES", "attention_levels", "check_unet_supported", "check_vae_supported", "model_state_shapes",
    "normalize_diffusers_vae_keys", "unet_config_from_diffusers", "unet_config_to_diffusers", "unet_from_diffusers",
    "unet_key_map", "unet_to_diffusers", "vae_config_from_diffusers", "vae_config_to_diffusers",
    "vae_from_diffusers", "vae_key_map", "vae_to_diffusers",
]
