"""LoRA files in the two formats the Stable Diffusion ecosystem reads: kohya / A1111 and diffusers / PEFT.

Both name a layer by its module path in diffusers' ``UNet2DConditionModel`` (``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``) or in Hugging Face's ``CLIPTextModel`` (``text_model.encoder.layers.0.
self_attn.q_proj``); our UNet's CompVis paths are mapped through ``diffusers_names.unet_key_map``, our CLIP already
has Hugging Face's names (a jointly trained text transformer keeps its own, which only we read).

- kohya / A1111 / ComfyUI (``lora.safetensors``): ``lora_unet_<path, dots as underscores>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (a scalar; the update is scaled by alpha / rank); the text encoder's layers
  as ``lora_te_<path>``.
- diffusers / PEFT (``pytorch_lora_weights.safetensors``): ``unet.<path>.lora_A.weight`` and ``lora_B.weight``,
  ``text_encoder.<path>...``. The file holds no alpha (diffusers then takes alpha = rank, a scale of 1), so
  ``lora_B`` is written already multiplied by alpha / rank: every loader gets the same update.

In memory a LoRA is ``LoRAWeights``: per part (UNet, text encoder) a dict from our module path (no prefix) to its
``LoRAPair``. Reading the kohya names back needs the paths they could stand for (dots became underscores), so
``read_lora`` takes the UNet's architecture and the text encoder's layer names. ``load_lora`` returns a handle with
which ``unload_lora`` puts the original weights back bit for bit.

This is a small API beside the checkpoint registry, not a registry format: the registry's ``read`` returns a whole
model (``StableDiffusionComponents``) from a file alone, and a LoRA is an update of a model that neither names nor
holds; its kohya names cannot even be read without the model's architecture. ``merge_lora`` applies a file to a
model's state dicts with a scale (the loading behind issue 14's ``--lora FILE[:SCALE]``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentdiff.diffusion.unet import UNetConfig
from latentdiff.formats.components import StableDiffusionComponents
from latentdiff.formats.diffusers_names import unet_key_map
from latentdiff.formats.weights import read_state_dict, save_safetensors_atomic
from latentdiff.io.errors import CheckpointError
from latentdiff.nn.lora import LoRALayer, lora_delta

LORA_FORMATS = ("kohya", "peft")
KOHYA_FILE = "lora.safetensors"
PEFT_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for in a folder
_KOHYA_PARTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class LoRAPair:
    """One layer's factors: ``down`` [rank, in(, kh, kw)], ``up`` [out, rank(, 1, 1)]; the update is
    ``alpha / rank * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return self.alpha / self.rank * lora_delta(self.down, self.up, shape)


@dataclass
class LoRAWeights:
    """A LoRA in our names: ``unet`` by our UNet's module paths, ``text_encoder`` by the text encoder's own."""

    unet: dict[str, LoRAPair] = field(default_factory=dict)
    text_encoder: dict[str, LoRAPair] = field(default_factory=dict)

    def parts(self) -> dict[str, dict[str, LoRAPair]]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def describe(self) -> str:
        ranks = sorted({pair.rank for part in self.parts().values() for pair in part.values()})
        return (f"{len(self.unet)} UNet layers, {len(self.text_encoder)} text-encoder layers, rank "
                f"{'/'.join(map(str, ranks)) or '-'}")


def lora_from_layers(unet: dict[str, LoRALayer], text_encoder: dict[str, LoRALayer]) -> LoRAWeights:
    """The factors of trained ``LoRALayer`` wrappers (by their paths in the UNet / text encoder), detached."""
    def pairs(layers: dict[str, LoRALayer]) -> dict[str, LoRAPair]:
        return {name: LoRAPair(layer.lora_down.weight.detach().cpu(), layer.lora_up.weight.detach().cpu(),
                               layer.alpha) for name, layer in layers.items()}
    return LoRAWeights(pairs(unet), pairs(text_encoder))


def _unet_paths(unet_config: UNetConfig) -> dict[str, str]:
    """Our UNet's module paths -> diffusers' (the weights' map, less the ``.weight``)."""
    return {ours[:-len(".weight")]: theirs[:-len(".weight")]
            for ours, theirs in unet_key_map(unet_config).ours_to_diffusers.items() if ours.endswith(".weight")}


def _external_names(lora: LoRAWeights, unet_config: UNetConfig) -> dict[tuple[str, str], str]:
    """(part, our path) -> the path in the ecosystem's names."""
    unet_paths = _unet_paths(unet_config) if lora.unet else {}
    names = {}
    for name in lora.unet:
        if name not in unet_paths:
            raise CheckpointError(f"the UNet has no layer {name!r} to name in a LoRA file")
        names["unet", name] = unet_paths[name]
    names.update({("text_encoder", name): name for name in lora.text_encoder})
    return names


def write_lora(lora: LoRAWeights, unet_config: UNetConfig, path: str | Path, format: str) -> Path:
    """Write ``lora`` as ``format`` ("kohya" or "peft", see the module docstring) to the ``.safetensors`` ``path``."""
    path = Path(path)
    if format not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; choose one of {', '.join(LORA_FORMATS)}")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {path}")
    names = _external_names(lora, unet_config)
    tensors: dict[str, torch.Tensor] = {}
    for part, pairs in lora.parts().items():
        for name, pair in pairs.items():
            theirs = names[part, name]
            if format == "kohya":
                key = _KOHYA_PARTS[part] + theirs.replace(".", "_")
                tensors.update({f"{key}.lora_down.weight": pair.down, f"{key}.lora_up.weight": pair.up,
                                f"{key}.alpha": torch.tensor(pair.alpha)})
            else:
                key = f"{part}.{theirs}"
                tensors.update({f"{key}.lora_A.weight": pair.down,
                                f"{key}.lora_B.weight": pair.up * (pair.alpha / pair.rank)})
    ranks = sorted({pair.rank for part in lora.parts().values() for pair in part.values()})
    metadata = {"latentdiff_lora": json.dumps({"format": format, "ranks": ranks})}
    if format == "kohya" and len(ranks) == 1:
        alphas = sorted({pair.alpha for part in lora.parts().values() for pair in part.values()})
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0]),
                         "ss_network_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else "mixed"})
    return save_safetensors_atomic(tensors, path, metadata)


def lora_file_format(keys: Iterable[str]) -> str:
    """"kohya" or "peft" from a file's keys; a ``CheckpointError`` when they are neither."""
    keys = list(keys)
    if keys and all(k.startswith(tuple(_KOHYA_PARTS.values())) and k.endswith(_KOHYA_SUFFIXES) for k in keys):
        return "kohya"
    if keys and all(k.startswith(("unet.", "text_encoder.")) and k.endswith(_PEFT_SUFFIXES) for k in keys):
        return "peft"
    raise CheckpointError(f"not a LoRA file in the kohya (lora_unet_*.lora_down.weight) or diffusers/PEFT "
                          f"(unet.*.lora_A.weight) layout; its first keys are {', '.join(sorted(keys)[:3])}")


def _group(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Layer key -> {suffix: tensor}."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next(s for s in suffixes if key.endswith(s))
        layers.setdefault(key[:-len(suffix)], {})[suffix] = tensor
    return layers


def read_lora(path: str | Path, unet_config: UNetConfig | None, text_encoder_layers: Iterable[str] = ()) -> LoRAWeights:
    """Read a kohya or PEFT LoRA file into our names, for a model whose UNet is ``unet_config`` and whose text
    encoder has the layers ``text_encoder_layers`` (module paths). Raises ``CheckpointError`` for a file that is
    not a LoRA or names layers the model does not have."""
    tensors, _ = read_state_dict(path)
    file_format = lora_file_format(tensors)
    by_external = {"unet": {theirs: ours for ours, theirs in _unet_paths(unet_config).items()} if unet_config else {},
                   "text_encoder": {name: name for name in text_encoder_layers}}
    if file_format == "kohya":  # dots became underscores: match against the underscored candidates
        by_external = {part: {theirs.replace(".", "_"): ours for theirs, ours in names.items()}
                       for part, names in by_external.items()}
    lora = LoRAWeights()
    unknown = []
    for key, factors in _group(tensors, _KOHYA_SUFFIXES if file_format == "kohya" else _PEFT_SUFFIXES).items():
        if file_format == "kohya":
            part = next(p for p, prefix in _KOHYA_PARTS.items() if key.startswith(prefix))
            external = key[len(_KOHYA_PARTS[part]):]
            down, up = factors.get(".lora_down.weight"), factors.get(".lora_up.weight")
        else:
            part, _, external = key.partition(".")
            down, up = factors.get(".lora_A.weight"), factors.get(".lora_B.weight")
        if down is None or up is None:
            raise CheckpointError(f"{path}: layer {key} lacks its down or up factor")
        ours = by_external[part].get(external)
        if ours is None:
            unknown.append(key)
            continue
        alpha = float(factors[".alpha"]) if ".alpha" in factors else float(down.shape[0])
        lora.parts()[part][ours] = LoRAPair(down.float(), up.float(), alpha)
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} LoRA layers are not in this model "
                              f"({', '.join(sorted(unknown)[:3])})")
    return lora


def merge_lora(weights: dict[str, torch.Tensor], pairs: dict[str, LoRAPair], scale: float = 1.0,
               prefix: str = "") -> dict[str, torch.Tensor]:
    """A copy of the state dict ``weights`` with ``scale`` times each layer's update added to
    ``prefix + path + ".weight"`` (in the weight's dtype)."""
    merged = dict(weights)
    for name, pair in pairs.items():
        key = f"{prefix}{name}.weight"
        if key not in merged:
            raise CheckpointError(f"the model has no weight {key} for the LoRA layer {name}")
        base = merged[key]
        if base.shape[:2] != (pair.up.shape[0], pair.down.shape[1]):
            raise CheckpointError(f"the LoRA layer {name} has shape {tuple(pair.up.shape[:1])} x "
                                  f"{tuple(pair.down.shape[1:2])}; the model's weight is {tuple(base.shape)}")
        merged[key] = (base.float() + scale * pair.delta(base.shape)).to(base.dtype)
    return merged


def apply_lora_to_components(comps: StableDiffusionComponents, path: str | Path,
                             scale: float = 1.0) -> StableDiffusionComponents:
    """A copy of ``comps`` with the LoRA file at ``path`` merged into its UNet and text encoder at ``scale``."""
    return load_lora(comps, path, scale)[0]


@dataclass(frozen=True)
class LoRAHandle:
    """What ``load_lora`` changed, to undo it exactly: per part ("unet", "text_encoder"), the weights it replaced
    (``originals``, the tensors themselves) and the ones it put in their place (``merged``)."""

    path: str
    scale: float
    originals: dict[str, dict[str, torch.Tensor]]
    merged: dict[str, dict[str, torch.Tensor]]


def load_lora(comps: StableDiffusionComponents, path: str | Path,
              scale: float = 1.0) -> tuple[StableDiffusionComponents, LoRAHandle]:
    """``apply_lora_to_components`` with a handle for ``unload_lora``: (the merged copy, the handle)."""
    text_layers = {k[:-len(".weight")] for k in comps.text_encoder or {} if k.endswith(".weight")}
    lora = read_lora(path, comps.unet_config, text_layers)
    if lora.text_encoder and comps.text_encoder is None:
        raise CheckpointError(f"{path} adapts a text encoder, and the model has none")
    parts = {"unet": comps.unet, "text_encoder": comps.text_encoder}
    changed = {part: merge_lora(parts[part], pairs, scale) for part, pairs in lora.parts().items() if pairs}
    keys = {part: [f"{name}.weight" for name in pairs] for part, pairs in lora.parts().items() if pairs}
    handle = LoRAHandle(str(path), scale, {part: {k: parts[part][k] for k in keys[part]} for part in keys},
                        {part: {k: changed[part][k] for k in keys[part]} for part in keys})
    return dataclasses.replace(comps, **changed), handle


def unload_lora(comps: StableDiffusionComponents, handle: LoRAHandle) -> StableDiffusionComponents:
    """A copy of ``comps`` with the weights ``load_lora`` replaced put back, bit for bit (the original tensors, not
    a subtraction that rounding would spoil). LoRAs loaded on top of it must be unloaded first (last in, first out):
    a weight that is no longer the one this LoRA left is refused with a ``ValueError``."""
    restored = {}
    for part, originals in handle.originals.items():
        weights = dict(getattr(comps, part) or {})
        moved = [k for k in originals if weights.get(k) is not handle.merged[part][k]]
        if moved:
            raise ValueError(f"cannot unload {handle.path}: the {part} weight {moved[0]} changed since it was loaded "
                             "(unload the LoRAs loaded after it first)")
        weights.update(originals)
        restored[part] = weights
    return dataclasses.replace(comps, **restored)


__all__ = ["KOHYA_FILE", "LORA_FORMATS", "PEFT_FILE", "LoRAHandle", "LoRAPair", "LoRAWeights",
           "apply_lora_to_components", "load_lora", "lora_file_format", "lora_from_layers", "merge_lora", "read_lora",
           "unload_lora", "write_lora"]
