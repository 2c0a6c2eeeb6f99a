"""The ``label`` embedder: a class label per sample -> the UNet's ``y``, the index into its label embedding.

The output kind is "vector": a class index is the compact form of a one-hot vector of ``num_classes + 1`` entries,
and the UNet's label embedding (``nn.Embedding``, rows ``num_classes + 1``) is the linear map of that one-hot
vector, without a bias. The last index, ``num_classes``, is the null class: the unconditional version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from latentdiff.conditioning.embedders.base import Embedder, EmbedderConfig, Encode


@dataclass
class LabelConfig(EmbedderConfig, output="vector", default_name="label"):
    """``num_classes`` labels (0 to num_classes - 1) and the null class; dropped for 10% of samples by default."""

    kind: str = field(default="label", init=False)
    num_classes: int = 0
    dropout: float = 0.1

    def check(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"the {self.name!r} labels need num_classes >= 1, got {self.num_classes}")

    @property
    def width(self) -> int:
        return self.num_classes + 1  # the one-hot width, the null class included


class LabelEmbedder(Embedder):
    config_class = LabelConfig
    keys = ("label",)

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if batch.get("label") is None:
            return {}
        label, classes = torch.as_tensor(batch["label"], dtype=torch.long).reshape(-1), self.config.num_classes
        if bool((label < 0).any()) or bool((label > classes).any()):
            raise ValueError(f"labels must be in [0, {classes - 1}] (or {classes}, the null class), got "
                             f"{sorted(set(label.tolist()))}")
        return {"label": label}

    def forward(self, prepared: dict[str, torch.Tensor], dropped: torch.Tensor,
                encode: Encode | None = None) -> torch.Tensor:
        label = prepared.get("label")
        null = torch.full((len(dropped),), self.config.num_classes, dtype=torch.long, device=dropped.device)
        return null if label is None else torch.where(dropped, null, label.to(dropped.device).long())


__all__ = ["LabelConfig", "LabelEmbedder"]
