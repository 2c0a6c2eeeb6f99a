"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for ``nn.Linear`` and ``nn.Conv2d`` layers.

A wrapped layer computes ``W x + b + (alpha / rank) * up(down(dropout(x)))``. ``down`` maps to ``rank`` features
(for a convolution it has the layer's kernel, stride and padding), ``up`` maps back (a 1x1 convolution), so
``up @ down`` has the shape of ``W`` and merging is one addition. ``up`` starts at zero: a freshly wrapped model
computes exactly what it did before. The wrapper holds the original layer's ``weight`` and ``bias`` Parameters
under their own names, so the model's state dict keeps every key it had and gains ``<layer>.lora_down.weight`` and
``<layer>.lora_up.weight`` (kohya's names; diffusers/PEFT call them ``lora_A`` / ``lora_B``).

``inject_lora`` wraps the layers of a module whose names end with one of the given suffixes; the suffix sets for
our UNet and text encoders are ``UNET_TARGETS`` and ``TEXT_ENCODER_TARGETS``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# Layer-name suffixes for each target set, cumulative as the names say (``attention+ff+conv`` has all three).
_UNET_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_UNET_FF = ("ff.net.0.proj", "ff.net.2")
_UNET_CONV = ("in_layers.2", "out_layers.3", "skip_connection")  # a ResBlock's two convolutions and its shortcut
UNET_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": _UNET_ATTENTION,
    "attention+ff": _UNET_ATTENTION + _UNET_FF,
    "attention+ff+conv": _UNET_ATTENTION + _UNET_FF + _UNET_CONV,
}
# CLIP (Hugging Face names) and our jointly trained text transformer (qkv in one projection; mlp.0 / mlp.3).
_TEXT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "qkv", "proj")
_TEXT_FF = ("mlp.fc1", "mlp.fc2", "mlp.0", "mlp.3")
TEXT_ENCODER_TARGETS: dict[str, tuple[str, ...]] = {
    "attention": _TEXT_ATTENTION,
    "attention+ff": _TEXT_ATTENTION + _TEXT_FF,
    "attention+ff+conv": _TEXT_ATTENTION + _TEXT_FF,  # a text encoder has no convolutions
}


class LoRALayer(nn.Module):
    """A ``nn.Linear`` or ``nn.Conv2d`` with a low-rank update; see the module docstring."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = rank, float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if isinstance(base, nn.Conv2d):
            if base.padding_mode != "zeros" or base.groups != 1:
                raise ValueError("LoRA wraps ungrouped, zero-padded convolutions only")
            self.conv = {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, bias=False, **self.conv, **factory)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        else:
            self.conv = None
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as nn.Linear's own initialisation
        nn.init.zeros_(self.lora_up.weight)
        self.merged_from: torch.Tensor | None = None  # the weight before ``merge``, put back by ``unmerge``

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in the shape of the wrapped weight."""
        return self.scale * lora_delta(self.lora_down.weight, self.lora_up.weight, self.weight.shape)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, **self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(x)
        if self.merged_from is not None:
            return out
        return out + self.scale * self.lora_up(self.lora_down(self.dropout(x)))

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the weight (forward then costs what the plain layer costs); ``unmerge`` undoes it."""
        if self.merged_from is None:
            self.merged_from = self.weight.detach().clone()
            self.weight.add_(self.delta().to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put back the weight from before ``merge`` exactly (a copy, not a subtraction that would round)."""
        if self.merged_from is not None:
            self.weight.copy_(self.merged_from)
            self.merged_from = None


def lora_delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``up @ down`` for Linear ([r, in], [out, r]) or Conv2d ([r, in, kh, kw], [out, r, 1, 1]) factors, reshaped to
    the wrapped weight's ``shape``, in float32."""
    product = up.float().flatten(1) @ down.float().flatten(1)
    return product.reshape(shape)


def inject_lora(module: nn.Module, suffixes: Iterable[str], rank: int, alpha: float,
                dropout: float = 0.0) -> dict[str, LoRALayer]:
    """Wrap every ``nn.Linear`` / ``nn.Conv2d`` of ``module`` whose name ends with one of ``suffixes`` (a whole
    name component: ``to_q`` matches ``attn1.to_q``, not ``xto_q``); returns the wrappers by their names in
    ``module``. Raises ``ValueError`` when nothing matches."""
    suffixes = tuple(suffixes)
    found = [(name, layer) for name, layer in module.named_modules()
             if isinstance(layer, nn.Linear | nn.Conv2d)
             and any(name == s or name.endswith("." + s) for s in suffixes)]
    if not found:
        raise ValueError(f"no Linear or Conv2d layer of {type(module).__name__} is named like "
                         f"{', '.join(suffixes)}")
    wrapped = {}
    for name, layer in found:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        wrapped[name] = LoRALayer(layer, rank, alpha, dropout)
        setattr(parent, child, wrapped[name])
    return wrapped


def lora_layers(module: nn.Module) -> dict[str, LoRALayer]:
    """The LoRA wrappers inside ``module``, by name."""
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoRALayer)}


def merged_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as if every LoRA layer were merged: each wrapped weight plus its update, and no
    ``lora_down`` / ``lora_up`` keys, so it loads into the model without adapters (the model is not changed)."""
    state = module.state_dict()
    for name, layer in lora_layers(module).items():
        prefix = f"{name}." if name else ""
        if layer.merged_from is None:
            state[prefix + "weight"] = (layer.weight.detach().float() + layer.delta().detach()).to(layer.weight.dtype)
        del state[prefix + "lora_down.weight"], state[prefix + "lora_up.weight"]
    return state


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors inside ``module`` (what a LoRA run trains and saves), by their state-dict names."""
    return {f"{name}.{kind}.weight": getattr(layer, kind).weight.detach().clone()
            for name, layer in lora_layers(module).items() for kind in ("lora_down", "lora_up")}


def load_lora_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put ``lora_state_dict``'s factors back into the same adapters of ``module``; a ``ValueError`` naming the
    difference when the adapters are not the same."""
    own = lora_state_dict(module)
    if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"the saved LoRA adapters do not fit this model's (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, or other ranks)")
    module.load_state_dict(state, strict=False)


__all__ = ["TEXT_ENCODER_TARGETS", "UNET_TARGETS", "LoRALayer", "inject_lora", "load_lora_state", "lora_delta",
           "lora_layers", "lora_state_dict", "merged_state_dict"]
