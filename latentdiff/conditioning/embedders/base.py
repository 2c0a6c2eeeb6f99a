"""The embedder contract: one conditioning input of a batch -> cross-attention tokens, concat channels or a vector.

An embedder is one small class with a config dataclass (registered by its ``kind``). It declares:

- ``keys``: the batch keys it reads, raw and prepared (``caption`` and its token ids ``input_ids``...);
- its ``name`` (in the config; by default the kind's), by which its CFG dropout is addressed, and ``dropout``, the
  probability that a training sample sees its unconditional version instead (classifier-free guidance);
- ``output``: "crossattn" (tokens (N, L, width) and a mask (N, L) or None: attend to all), "concat" (channels
  (N, C, h, w) at the latent size, appended to the UNet's input) or "vector" (N, ...), the UNet's ``y``;
- its size: ``width`` (token width, vector width) or ``channels(geometry)`` (concat channels);
- ``prepare(batch)``: the deterministic, cacheable tensors (token ids, validated class maps...), and the part of
  the latent-cache signature they depend on (``cache_signature``);
- ``forward(prepared, dropped, encode)``: its output, with the unconditional version where ``dropped`` (N,) is
  true; a missing input counts as dropped, so an empty batch gives the unconditional model;
- ``draw`` / ``complete`` when training needs random numbers of its own (the inpainting boxes).

Weights keep CompVis' names: the conditioner adopts each embedder's direct submodules and parameters under their
own attribute names (``transformer.*``, ``class_map_embedding``), so checkpoints keep their keys. An embedder
therefore keeps no buffers of its own (``.to`` replaces buffers, which would leave the embedder a stale copy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

OUTPUTS = ("crossattn", "concat", "vector")
# The dropout uniforms of the conditioner before embedders: one column per name, always all four, in this order.
# An embedder with one of these names keeps its column (so old configs draw what they drew); any other name gets
# a column after them, in list order, so adding an embedder never moves the numbers of the others.
FIXED_DROPOUT_COLUMNS = ("caption", "class_map", "image", "label")

Encode = Callable[[torch.Tensor], torch.Tensor]
Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class Geometry:
    """The images a model makes and the UNet's latents (the image itself in pixel space): concat channels and
    token counts depend on them."""

    image_size: int
    image_channels: int
    latent_size: int
    latent_channels: int


@dataclass
class EmbedderConfig:
    """What every embedder's config has. ``kind`` is the registry's key (fixed by the subclass), ``name`` how its
    dropout and unconditional version are addressed ("" is the kind's ``default_name``), ``dropout`` the
    probability in [0, 1] of the unconditional version in training."""

    kind: str = field(default="", init=False)
    name: str = ""
    dropout: float = 0.0

    output: ClassVar[str] = ""
    default_name: ClassVar[str] = ""

    def __init_subclass__(cls, output: str = "", default_name: str = "", **kwargs: Any) -> None:
        """``class LabelConfig(EmbedderConfig, output="vector", default_name="label")`` declares what it gives."""
        super().__init_subclass__(**kwargs)
        if output and output not in OUTPUTS:
            raise TypeError(f"{cls.__name__}: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        cls.output = output or cls.output
        cls.default_name = default_name or cls.default_name

    def __post_init__(self) -> None:
        self.name = self.name or self.default_name
        if not self.name:
            raise ValueError(f"a {self.kind!r} embedder needs a name")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"the {self.name!r} embedder's dropout must be in [0, 1], got {self.dropout}")
        self.check()

    def check(self) -> None:
        """Raise ValueError for a field out of its range (each kind checks its own)."""

    @property
    def width(self) -> int:
        """The width of its cross-attention tokens, or of its vector; 0 for concat channels."""
        return 0

    def channels(self, geometry: Geometry) -> int:
        """How many channels it appends to the UNet's input (0 unless its output is "concat")."""
        return 0

    def cache_signature(self) -> dict[str, Any]:
        """What ``prepare`` depends on besides the batch (a cache made under another one is not reused)."""
        return {}


class Embedder(nn.Module):
    """One conditioning input -> one output for the UNet; see the module docstring for the contract."""

    config_class: ClassVar[type[EmbedderConfig]]
    keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: EmbedderConfig, geometry: Geometry) -> None:
        super().__init__()
        self.config, self.geometry = config, geometry

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The deterministic, cacheable tensors of this input in ``batch`` (nothing when it is not there)."""
        raise NotImplementedError

    def forward(self, prepared: dict[str, torch.Tensor], dropped: torch.Tensor, encode: Encode | None) -> Output:
        """Its output for ``len(dropped)`` samples on ``dropped.device``; ``encode`` maps images in [-1, 1] to the
        first stage's scaled latents (for embedders of images)."""
        raise NotImplementedError

    def draw(self, n: int, generator: torch.Generator | None, device: torch.device) -> dict[str, torch.Tensor]:
        """Random numbers of its own for one training step of ``n`` samples (none by default)."""
        return {}

    def complete(self, prepared: dict[str, torch.Tensor], draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``prepared`` with what training leaves to ``draw``'s numbers filled in (nothing by default)."""
        return prepared


def zero_where_dropped(channels: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Concat channels (N, C, h, w) with the dropped samples' set to 0, their unconditional version (as LDM)."""
    return channels * (~dropped).float()[:, None, None, None]


__all__ = ["FIXED_DROPOUT_COLUMNS", "OUTPUTS", "Embedder", "EmbedderConfig", "Encode", "Geometry", "Output",
           "zero_where_dropped"]
