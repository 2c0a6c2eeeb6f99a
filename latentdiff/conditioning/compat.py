"""The compatibility reader: the flat conditioner config written before embedders -> the embedder list.

Every config made before (``configs/*.yaml``, the bundled ``models/*/config.json``, a run folder's ``config.yaml``)
has one field per mode (``text_encoder``, ``class_map``, ``image``, ``num_classes``) and one rate per input
(``text_dropout``...). ``FlatConditionerConfig.embedders`` turns it into the list, in the order the flat conditioner
built its modules and drew its numbers (text, class map, image, label): the same construction order under a seeded
RNG (so the same initial weights), the same parameter names and the same dropout columns. ``FlatFields`` answers
the flat fields' questions (``text_encoder``, ``num_map_classes``...) from the list, for the callers written before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from latentdiff.conditioning.embedders.base import EmbedderConfig
from latentdiff.conditioning.embedders.class_map_concat import ClassMapConcatConfig
from latentdiff.conditioning.embedders.class_map_tokens import ClassMapTokensConfig
from latentdiff.conditioning.embedders.clip_text import CLIPEncoderConfig
from latentdiff.conditioning.embedders.inpaint import InpaintConfig
from latentdiff.conditioning.embedders.label import LabelConfig
from latentdiff.conditioning.embedders.lowres import LowResConfig
from latentdiff.conditioning.embedders.minilm import MiniLMConfig
from latentdiff.conditioning.embedders.text_transformer import TextTransformerEmbedderConfig
from latentdiff.conditioning.text import TextTransformerConfig

TEXT_ENCODERS = ("none", "minilm", "transformer", "clip")
CLASS_MAP_MODES = ("none", "concat", "crossattn")
IMAGE_MODES = ("none", "lowres", "inpaint")


@dataclass
class FlatConditionerConfig:
    """The conditioner config before embedders, as it was written; see the module docstring."""

    # captions
    text_encoder: str = "none"  # "none" | "minilm" | "transformer" | "clip"
    minilm: MiniLMConfig = field(default_factory=MiniLMConfig)
    clip: CLIPEncoderConfig = field(default_factory=CLIPEncoderConfig)
    text: TextTransformerConfig = field(default_factory=TextTransformerConfig)
    text_dropout: float = 0.1
    # class maps
    class_map: str = "none"  # "none" | "concat" | "crossattn"
    num_map_classes: int = 0
    class_map_resize: str = "nearest"
    class_map_width: int = 0  # crossattn tokens' width without a text encoder (with one: the text width)
    class_map_dropout: float = 0.0
    # images: low-res ones (super-resolution) or ones to inpaint
    image: str = "none"  # "none" | "lowres" | "inpaint"
    image_dropout: float = 0.0
    lowres_size: int = 8
    lowres_space: str = "pixels"
    # inpainting's training masks
    inpaint_full_prob: float = 0.25
    inpaint_min_box: float = 0.25
    inpaint_max_box: float = 0.75
    # class labels
    num_classes: int = 0
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name, value, choices in (("text_encoder", self.text_encoder, TEXT_ENCODERS),
                                     ("class_map", self.class_map, CLASS_MAP_MODES),
                                     ("image", self.image, IMAGE_MODES)):
            if value not in choices:
                raise ValueError(f"conditioner.{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.num_classes < 0:
            raise ValueError(f"conditioner.num_classes must be >= 0, got {self.num_classes}")

    def embedders(self) -> list[EmbedderConfig]:
        """The embedder list this config describes, in the flat conditioner's order: text, class map, image,
        label. (The text encoder's nested config is shared, not copied.)"""
        found: list[EmbedderConfig] = []
        text = self._text()
        if text is not None:
            found.append(text)
        if self.class_map == "concat":
            found.append(ClassMapConcatConfig(num_classes=self.num_map_classes, resize=self.class_map_resize,
                                              dropout=self.class_map_dropout))
        elif self.class_map == "crossattn":
            found.append(ClassMapTokensConfig(num_classes=self.num_map_classes, dropout=self.class_map_dropout,
                                              width=text.width if text is not None else self.class_map_width))
        if self.image == "lowres":
            found.append(LowResConfig(size=self.lowres_size, space=self.lowres_space, dropout=self.image_dropout))
        elif self.image == "inpaint":
            found.append(InpaintConfig(full_prob=self.inpaint_full_prob, min_box=self.inpaint_min_box,
                                       max_box=self.inpaint_max_box, dropout=self.image_dropout))
        if self.num_classes > 0:
            found.append(LabelConfig(num_classes=self.num_classes, dropout=self.label_dropout))
        return found

    def _text(self) -> EmbedderConfig | None:
        if self.text_encoder == "minilm":
            return dataclasses.replace(self.minilm, dropout=self.text_dropout)
        if self.text_encoder == "clip":
            return dataclasses.replace(self.clip, dropout=self.text_dropout)
        if self.text_encoder == "transformer":
            return TextTransformerEmbedderConfig(text=self.text, dropout=self.text_dropout)
        return None


class FlatField(NamedTuple):
    """Where a flat field's value is in the embedder list: an attribute of the embedder of that name (of that
    ``kind``, when given; "" is the embedder's config itself), else ``absent``."""

    embedder: str
    attribute: str
    absent: Any
    kind: str = ""


FLAT_FIELDS = {
    "text_encoder": FlatField("caption", "kind", "none"),
    "text": FlatField("caption", "text", None, kind="transformer"),  # the trainer fills in its vocabulary
    "clip": FlatField("caption", "", None, kind="clip"),
    "minilm": FlatField("caption", "", None, kind="minilm"),
    "class_map": FlatField("class_map", "output", "none"),
    "num_map_classes": FlatField("class_map", "num_classes", 0),
    "class_map_dropout": FlatField("class_map", "dropout", 0.0),
    "image": FlatField("image", "kind", "none"),
    "lowres_size": FlatField("image", "size", 0, kind="lowres"),
    "image_dropout": FlatField("image", "dropout", 0.0),
    "num_classes": FlatField("label", "num_classes", 0),
}


def _read_flat_field(where: FlatField) -> property:
    def read(self: Any) -> Any:
        found = self.embedder(where.embedder)
        if found is None or where.kind not in ("", found.kind):
            return where.absent
        return getattr(found, where.attribute) if where.attribute else found

    return property(read)


class FlatFields:
    """The flat config's fields (``FLAT_FIELDS``, one read-only property each) as queries on the embedder list, for
    the callers written before it. Mixed into ``ConditionerConfig``, whose ``embedder(name)`` they read."""


for _name, _where in FLAT_FIELDS.items():
    setattr(FlatFields, _name, _read_flat_field(_where))


__all__ = ["CLASS_MAP_MODES", "FLAT_FIELDS", "IMAGE_MODES", "TEXT_ENCODERS", "FlatConditionerConfig", "FlatField",
           "FlatFields"]
