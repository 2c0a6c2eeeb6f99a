"""The ``class_map_concat`` embedder: a class map one-hot at the latent size, appended to the UNet's input channels.

LDM's semantic synthesis (Rombach et al. 2022, sec. 4.3.2). ``resize`` "nearest" takes each latent cell's top-left
pixel; "area" gives the fraction of each class in the cell. The unconditional version is all zeros, as LDM's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from latentdiff.conditioning.embedders.base import Encode, Geometry, zero_where_dropped
from latentdiff.conditioning.embedders.class_map import ClassMapConfig, ClassMapEmbedder

RESIZE_MODES = ("nearest", "area")


@dataclass
class ClassMapConcatConfig(ClassMapConfig, output="concat"):
    """``resize`` ("nearest" or "area") brings the one-hot map to the latent size."""

    kind: str = field(default="class_map_concat", init=False)
    resize: str = "nearest"

    def check(self) -> None:
        super().check()
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"class map resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")

    def channels(self, geometry: Geometry) -> int:
        return self.num_classes


class ClassMapConcatEmbedder(ClassMapEmbedder):
    config_class = ClassMapConcatConfig

    def forward(self, prepared: dict[str, torch.Tensor], dropped: torch.Tensor,
                encode: Encode | None = None) -> torch.Tensor:
        class_map, classes, device = prepared.get("class_map"), self.config.num_classes, dropped.device
        size = (self.geometry.latent_size, self.geometry.latent_size)
        if class_map is None:
            return torch.zeros(len(dropped), classes, *size, device=device)
        onehot = F.one_hot(class_map.to(device).long(), classes).permute(0, 3, 1, 2).float()
        return zero_where_dropped(F.interpolate(onehot, size=size, mode=self.config.resize), dropped)


__all__ = ["RESIZE_MODES", "ClassMapConcatConfig", "ClassMapConcatEmbedder"]
