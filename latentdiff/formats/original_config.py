"""The original YAML config of a single-file checkpoint (CompVis / Stability's ``v1-inference.yaml``, ...): what the
tensor shapes cannot tell.

A single file carries only weights; ``formats.architecture`` reads every width and depth from their shapes, but the
UNet's attention heads, the text encoder's activation and output layer, the prediction type and the VAE's training
resolution are not in them. The YAML that was published with the checkpoint says them, under CompVis' keys::

    model.params.parameterization            "v" for v-prediction (SD 2.x-768-v), else eps
    model.params.scale_factor                the latent scale (0.18215 for SD)
    model.params.unet_config.params          num_heads / num_head_channels, context_dim, use_linear_in_transformer,
                                             transformer_depth, use_scale_shift_norm, legacy, ...
    model.params.first_stage_config.params   ddconfig.resolution
    model.params.cond_stage_config           target FrozenCLIPEmbedder (OpenAI CLIP: quick-GELU) or
                                             FrozenOpenCLIPEmbedder (OpenCLIP: GELU; params.layer "last" /
                                             "penultimate")

It is given with ``--config FILE`` or found beside the checkpoint with the same stem (``model.yaml`` for
``model.safetensors``), as AUTOMATIC1111 finds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentdiff.config import read_yaml
from latentdiff.diffusion.unet import UNetConfig
from latentdiff.io.errors import CheckpointError

# The UNet fields a CompVis config states that the shapes cannot (or that must agree with them).
_UNET_KEYS = ("num_heads", "num_head_channels", "context_dim", "use_linear_in_transformer", "transformer_depth",
              "use_spatial_transformer", "use_scale_shift_norm", "resblock_updown", "legacy")
# cond_stage_config targets: the activation their text transformer was trained with.
_TEXT_ENCODERS = {"FrozenCLIPEmbedder": "quick_gelu", "FrozenOpenCLIPEmbedder": "gelu"}
_LAYERS = {"last": "last", "penultimate": "penultimate"}


@dataclass(frozen=True)
class OriginalConfig:
    """What an original YAML says beyond the shapes; None (or empty) where it does not say."""

    path: Path
    unet: dict[str, Any] = field(default_factory=dict)  # UNetConfig overrides
    vae_resolution: int | None = None
    text_activation: str | None = None  # Hugging Face hidden_act
    text_output_layer: str | None = None  # "last" or "penultimate"
    prediction_type: str | None = None  # diffusers' name
    scale_factor: float | None = None


def _section(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else {}


def read_original_config(path: str | Path) -> OriginalConfig:
    """The parts of a CompVis YAML that a single file needs; a ``CheckpointError`` when it is no such config."""
    path = Path(path)
    data = read_yaml(path)
    params = _section(data, "model", "params")
    if not params:
        raise CheckpointError(f"{path} is not an original Stable Diffusion config: it has no model.params")
    unet_params = _section(params, "unet_config", "params")
    unet_fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unet = {k: unet_params[k] for k in _UNET_KEYS if k in unet_params and k in unet_fields}
    text = _section(params, "cond_stage_config")
    target = str(text.get("target", "")).rsplit(".", 1)[-1]
    layer = _section(text, "params").get("layer")
    if layer is not None and layer not in _LAYERS:
        raise CheckpointError(f"{path}: cond_stage_config layer {layer!r} is not one of {', '.join(_LAYERS)}")
    parameterization = params.get("parameterization", "eps")
    if parameterization not in ("eps", "v"):
        raise CheckpointError(f"{path}: parameterization {parameterization!r} is not eps or v")
    resolution = _section(params, "first_stage_config", "params", "ddconfig").get("resolution")
    return OriginalConfig(
        path=path, unet=unet, vae_resolution=None if resolution is None else int(resolution),
        text_activation=_TEXT_ENCODERS.get(target), text_output_layer=_LAYERS.get(layer) if layer else None,
        prediction_type="v_prediction" if parameterization == "v" else "epsilon",
        scale_factor=float(params["scale_factor"]) if "scale_factor" in params else None)


def find_original_config(checkpoint: Path, given: str | Path | None = None) -> OriginalConfig | None:
    """The config ``given`` (``--config``), else the ``.yaml`` beside ``checkpoint`` with its stem, else None."""
    if given is not None:
        return read_original_config(given)
    beside = checkpoint.with_suffix(".yaml")
    return read_original_config(beside) if beside.is_file() else None


__all__ = ["OriginalConfig", "find_original_config", "read_original_config"]
