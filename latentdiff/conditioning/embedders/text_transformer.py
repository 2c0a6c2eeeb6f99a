"""The ``transformer`` embedder: captions through a small text transformer trained jointly with the UNet.

As the LDM paper's text-to-image model (Rombach et al. 2022, sec. 4.3), from scratch, with a word vocabulary built
from the training captions (``latentdiff.conditioning.text``); its weights are ``cond_stage_model.transformer.*``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latentdiff.conditioning.embedders.base import Geometry
from latentdiff.conditioning.embedders.caption import CaptionConfig, CaptionEmbedder
from latentdiff.conditioning.text import TextTransformer, TextTransformerConfig


@dataclass
class TextTransformerEmbedderConfig(CaptionConfig):
    """``text`` is the encoder's architecture and vocabulary (filled in from the captions by the trainer)."""

    kind: str = field(default="transformer", init=False)
    text: TextTransformerConfig = field(default_factory=TextTransformerConfig)

    @property
    def width(self) -> int:
        return self.text.width

    def cache_signature(self) -> dict[str, Any]:
        return {"text": {"vocab": self.text.vocab, "max_length": self.text.max_length}}


class TextTransformerEmbedder(CaptionEmbedder):
    config_class = TextTransformerEmbedderConfig

    def __init__(self, config: TextTransformerEmbedderConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.transformer = TextTransformer(config.text)


__all__ = ["TextTransformerEmbedder", "TextTransformerEmbedderConfig"]
