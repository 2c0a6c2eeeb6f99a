"""What the caption embedders share: captions -> token ids -> a text encoder's states, the empty caption unconditional.

A subclass builds its text encoder as ``self.transformer`` (CompVis' name: ``cond_stage_model.transformer.*`` in a
checkpoint, as its BERTEmbedder and SD v1's CLIP), which has ``tokenize(prompts) -> (ids, mask)`` and
``encode_ids(ids) -> (states, mask or None)``. The unconditional version is the empty caption (``[CLS] [SEP]`` /
``[BOS] [EOS]``), encoded like any caption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from latentdiff.conditioning.embedders.base import Embedder, EmbedderConfig, Encode


@dataclass
class CaptionConfig(EmbedderConfig, output="crossattn", default_name="caption"):
    """A text encoder over the batch's captions: cross-attention tokens, dropped for 10% of samples by default."""

    dropout: float = 0.1


class CaptionEmbedder(Embedder):
    keys = ("caption", "input_ids")

    def tokenize(self, captions: str | Sequence[str]) -> torch.Tensor:
        ids, _ = self.transformer.tokenize([captions] if isinstance(captions, str) else [str(c) for c in captions])
        return ids

    @property
    def empty_ids(self) -> torch.Tensor:
        """(1, L) the token ids of the empty caption, the unconditional version."""
        return self.tokenize([""])

    @property
    def states_key(self) -> str:
        """The batch key of this encoder's states when a latent cache holds them (a frozen encoder's)."""
        return f"{self.config.name}.states"

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        cached = {k: batch[k] for k in (self.states_key, self.states_key + "_mask") if batch.get(k) is not None}
        if batch.get("input_ids") is not None:
            return {"input_ids": torch.as_tensor(batch["input_ids"], dtype=torch.long), **cached}
        if batch.get("caption") is not None:
            return {"input_ids": self.tokenize(batch["caption"])}
        return {}

    def forward(self, prepared: dict[str, torch.Tensor], dropped: torch.Tensor,
                encode: Encode | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.states_key in prepared:  # cached states: only the empty caption is encoded, for the dropped ones
            empty, empty_mask = self.transformer.encode_ids(self.empty_ids.to(dropped.device))
            states = torch.where(dropped[:, None, None], empty, prepared[self.states_key].to(dropped.device))
            mask = prepared.get(self.states_key + "_mask")
            return states, None if mask is None else torch.where(dropped[:, None], empty_mask, mask.to(dropped.device))
        ids = prepared.get("input_ids")
        empty = self.empty_ids.to(dropped.device).expand(len(dropped), -1)
        ids = empty if ids is None else torch.where(dropped[:, None], empty, ids.to(dropped.device))
        return self.transformer.encode_ids(ids)


__all__ = ["CaptionConfig", "CaptionEmbedder"]
