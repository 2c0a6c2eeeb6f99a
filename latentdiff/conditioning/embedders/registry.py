"""The embedder registry: a config's ``kind`` -> its embedder class. A new kind is one file and one line here."""

from __future__ import annotations

from typing import Any

from latentdiff.conditioning.embedders.base import Embedder, EmbedderConfig, Geometry
from latentdiff.conditioning.embedders.class_map_concat import ClassMapConcatEmbedder
from latentdiff.conditioning.embedders.class_map_tokens import ClassMapTokensEmbedder
from latentdiff.conditioning.embedders.clip_text import CLIPTextEmbedder
from latentdiff.conditioning.embedders.inpaint import InpaintEmbedder
from latentdiff.conditioning.embedders.label import LabelEmbedder
from latentdiff.conditioning.embedders.lowres import LowResEmbedder
from latentdiff.conditioning.embedders.minilm import MiniLMEmbedder
from latentdiff.conditioning.embedders.text_transformer import TextTransformerEmbedder
from latentdiff.config import ConfigError, from_dict

EMBEDDERS: dict[str, type[Embedder]] = {cls.config_class.kind: cls for cls in (
    MiniLMEmbedder,
    TextTransformerEmbedder,
    CLIPTextEmbedder,
    ClassMapConcatEmbedder,
    ClassMapTokensEmbedder,
    LowResEmbedder,
    InpaintEmbedder,
    LabelEmbedder,
)}


def embedder_class(kind: str) -> type[Embedder]:
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder kind {kind!r}; choose one of {', '.join(EMBEDDERS)}")
    return EMBEDDERS[kind]


def read_embedder_config(data: Any, where: str) -> EmbedderConfig:
    """One entry of ``conditioner.embedders`` (a mapping with its ``kind``) as its kind's config dataclass."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError(f"{where}: an embedder is a mapping with its kind ({', '.join(EMBEDDERS)}), got {data!r}")
    fields = dict(data)
    try:
        cls = embedder_class(str(fields.pop("kind")))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return from_dict(cls.config_class, fields, where)


def build_embedder(config: EmbedderConfig, geometry: Geometry) -> Embedder:
    return embedder_class(config.kind)(config, geometry)


def registered_input_keys() -> tuple[str, ...]:
    """Every batch key some registered embedder reads, once each."""
    return tuple(dict.fromkeys(key for cls in EMBEDDERS.values() for key in cls.keys))


__all__ = ["EMBEDDERS", "build_embedder", "embedder_class", "read_embedder_config", "registered_input_keys"]
