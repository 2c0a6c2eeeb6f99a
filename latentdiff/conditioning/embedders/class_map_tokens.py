"""The ``class_map_tokens`` embedder: a class map as cross-attention tokens, one per latent position.

Each token is a learned embedding of the class at that position (nearest) plus a learned embedding of the
position. The unconditional version is the null class (index ``num_classes``) everywhere. Weights:
``cond_stage_model.class_map_embedding.weight`` and ``cond_stage_model.class_map_positions``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.conditioning.embedders.base import Encode, Geometry
from latentdiff.conditioning.embedders.class_map import ClassMapConfig, ClassMapEmbedder


@dataclass
class ClassMapTokensConfig(ClassMapConfig, output="crossattn"):
    """``width`` is the tokens' width: that of the other cross-attention tokens (the text encoder's), if any."""

    kind: str = field(default="class_map_tokens", init=False)
    width: int = 0  # type: ignore[assignment]  # a field here, a property in the base

    def check(self) -> None:
        super().check()
        if self.width < 1:
            raise ValueError(f"the {self.name!r} class-map tokens need a width (>= 1), got {self.width}")


class ClassMapTokensEmbedder(ClassMapEmbedder):
    config_class = ClassMapTokensConfig

    def __init__(self, config: ClassMapTokensConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.class_map_embedding = nn.Embedding(config.num_classes + 1, config.width)  # the last: the null class
        self.class_map_positions = nn.Parameter(torch.randn(geometry.latent_size ** 2, config.width) * 0.02)
        nn.init.normal_(self.class_map_embedding.weight, std=0.02)

    def forward(self, prepared: dict[str, torch.Tensor], dropped: torch.Tensor,
                encode: Encode | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        class_map, null, device = prepared.get("class_map"), self.config.num_classes, dropped.device
        size = (self.geometry.latent_size, self.geometry.latent_size)
        if class_map is None:
            idx = torch.full((len(dropped), *size), null, dtype=torch.long, device=device)
        else:
            idx = F.interpolate(class_map.to(device)[:, None].float(), size=size, mode="nearest")[:, 0].long()
        idx = torch.where(dropped[:, None, None], torch.full_like(idx, null), idx)
        tokens = self.class_map_embedding(idx.flatten(1)) + self.class_map_positions
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)


__all__ = ["ClassMapTokensConfig", "ClassMapTokensEmbedder"]
