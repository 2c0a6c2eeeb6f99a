"""What the class-map embedders share: a segmentation, (H, W) class indices per sample, checked against its classes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from latentdiff.conditioning.embedders.base import Embedder, EmbedderConfig


@dataclass
class ClassMapConfig(EmbedderConfig, default_name="class_map"):
    """``num_classes`` counts the map's classes, background included (fmnist_scenes: 11)."""

    num_classes: int = 0

    def check(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"the {self.name!r} class map needs num_classes >= 2 (background included), got "
                             f"{self.num_classes}")


class ClassMapEmbedder(Embedder):
    keys = ("class_map",)

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if batch.get("class_map") is None:
            return {}
        class_map = torch.as_tensor(batch["class_map"])
        if class_map.ndim == 2:
            class_map = class_map[None]
        if class_map.ndim != 3:
            raise ValueError(f"class_map must be (N, H, W) class indices, got shape {tuple(class_map.shape)}")
        classes = self.config.num_classes
        if class_map.numel() and (int(class_map.min()) < 0 or int(class_map.max()) >= classes):
            raise ValueError(f"class_map values must be in [0, {classes - 1}], got "
                             f"[{int(class_map.min())}, {int(class_map.max())}]")
        return {"class_map": class_map.long()}


__all__ = ["ClassMapConfig", "ClassMapEmbedder"]
