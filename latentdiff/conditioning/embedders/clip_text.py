"""The ``clip`` embedder: captions through a CLIP text encoder, Stable Diffusion's: frozen unless a run trains it.

Its weights are part of the checkpoint, under ``cond_stage_model.transformer.text_model.*`` in Hugging Face
``CLIPTextModel`` names, which is exactly where an original SD v1 file keeps them. As in SD, it gives no context
mask: SD's UNet attends to all 77 positions, padding too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from latentdiff.conditioning.clip import CLIPTextConfig, CLIPTextModel
from latentdiff.conditioning.embedders.base import Geometry
from latentdiff.conditioning.embedders.caption import CaptionConfig, CaptionEmbedder
from latentdiff.conditioning.tokenizer import CLIPTokenizer


@dataclass
class CLIPEncoderConfig(CaptionConfig):
    """The frozen CLIP text encoder: its architecture, how prompts are tokenized.

    ``model`` is the ``CLIPTextConfig`` (width, layers, heads, activation, ``output_layer`` "last" for SD v1 or
    "penultimate" for SD v2...); the defaults are SD v1's. ``pad_token_id`` fills each prompt after its end token:
    49407 (the end token itself) for SD v1, 0 for SD v2's OpenCLIP; the UNet attends to the padding, so it must be
    what the model was trained with. ``tokenizer`` is a tokenizer folder (``vocab.json`` + ``merges.txt``) or
    CLIP's merge file; "" is the copy inside ``open_clip_torch``. Prompts are cut to
    ``min(77, model.context_length)`` tokens.
    """

    kind: str = field(default="clip", init=False)
    model: CLIPTextConfig = field(default_factory=CLIPTextConfig.sd_v1)
    pad_token_id: int = 49407
    tokenizer: str = ""

    def check(self) -> None:
        if self.pad_token_id < 0:
            raise ValueError(f"clip.pad_token_id must be a token id (>= 0), got {self.pad_token_id}")
        if self.model.context_length < 2:
            raise ValueError("clip.model.context_length must leave room for the start and end tokens")

    @property
    def max_length(self) -> int:
        return min(77, self.model.context_length)

    @property
    def width(self) -> int:
        return self.model.width

    def cache_signature(self) -> dict[str, Any]:
        return {"clip": {"tokenizer": self.tokenizer, "pad_token_id": self.pad_token_id,
                         "max_length": self.max_length}}


class FrozenCLIPTextEncoder(CLIPTextModel):
    """The CLIP text encoder as the embedder uses it, with its tokenizer: built frozen (eval mode, no gradients).

    A fine-tuning run may make some of its weights trainable (all of them, LoRA adapters, a textual-inversion
    token's rows): ``encode_ids`` then keeps the graph and ``train()`` lets the adapters' dropout act. Frozen, it
    encodes under ``no_grad`` and stays in eval mode, as at inference (CLIP itself has no dropout).

    It *is* the ``CLIPTextModel``, so its weights are ``text_model.*`` and, as the embedder's ``transformer``,
    ``cond_stage_model.transformer.text_model.*`` in a checkpoint: the names of an original SD v1 file (CompVis'
    ``FrozenCLIPEmbedder`` holds a Hugging Face ``CLIPTextModel`` as ``transformer``). Unlike the MiniLM, the
    weights travel with the checkpoint: every SD model has its own copy, and none can be downloaded here.
    """

    def __init__(self, config: CLIPEncoderConfig) -> None:
        super().__init__(config.model)
        self.tokenizer = CLIPTokenizer(config.tokenizer or None, pad_token_id=config.pad_token_id,
                                       max_length=config.max_length)
        self.eval().requires_grad_(False)

    @property
    def trains(self) -> bool:
        """Whether any weight (an adapter's too) is trainable."""
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> FrozenCLIPTextEncoder:
        return super().train(mode and self.trains)  # frozen: always in eval mode

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.tokenizer(prompts))  # type: ignore[return-value]

    def encode_ids(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Token ids (N, L) -> (states (N, L, width) in float32, None: every position is attended to); with
        gradients only when some weight trains."""
        device = self.text_model.embeddings.token_embedding.weight.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains):
            return self.encode(input_ids.to(device)).float(), None


class CLIPTextEmbedder(CaptionEmbedder):
    config_class = CLIPEncoderConfig

    def __init__(self, config: CLIPEncoderConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        self.transformer = FrozenCLIPTextEncoder(config)


__all__ = ["CLIPEncoderConfig", "CLIPTextEmbedder", "FrozenCLIPTextEncoder"]
