"""The conditioner: an ordered list of embedders that turns a batch into the UNet's conditioning dict.

As sgm's GeneralConditioner. Each embedder (``latentdiff.conditioning.embedders``: one class per file, registered
by its ``kind``) reads some keys of a batch and gives cross-attention tokens, concat channels or a vector; the
conditioner joins them in list order, as in the LDM paper (Rombach et al. 2022, sec. 3.3 and 4.3-4.5):

- "crossattn" -> ``context``: the tokens one after the other along the sequence, with ``context_mask`` (True: attend)
  unless no embedder gives one (SD's CLIP: the UNet attends to all 77 positions);
- "concat" -> ``concat``: the channels one after the other, appended to the UNet's input;
- "vector" -> ``y``: one embedder's vector as is (the label embedder's class indices, for the UNet's label
  embedding), several joined along their last dimension (SDXL's vector conditioning).

The built-in kinds: captions through a text encoder (``minilm`` frozen, ``transformer`` trained jointly, ``clip``
frozen, SD's), class maps (``class_map_concat``, ``class_map_tokens``), images (``lowres`` for super-resolution,
``inpaint`` for SD-style inpainting) and class labels (``label``).

Config. ``model.conditioner.embedders: [{kind: ..., name: ..., dropout: ..., ...}, ...]`` is the form a model
saves. The flat form written before embedders (``text_encoder: transformer``, ``text_dropout: 0.1``, ``image:
inpaint``...) still loads and builds the same modules: see ``latentdiff.conditioning.compat``.

Dropout for classifier-free guidance, by name: each embedder's output is replaced by its unconditional version
where the step's uniform for that sample and embedder is below its ``dropout``. The uniforms come from ``draw``
(``LatentDiffusion.draw_training_noise`` calls it for the global batch, so DDP trains exactly as one process does):
one column per name of ``FIXED_DROPOUT_COLUMNS`` (always, in that order, as before embedders) and then one per
other embedder in list order; then each embedder's own numbers (the inpainting boxes). ``unconditional_mask``
gives the CFG branch at sampling: the embedders trained with dropout dropped, the others kept, so an inpainting
model guides on its text while keeping the image it fills in.

Two stages, so that a latent cache can hold what is deterministic: ``prepare(batch)`` -> tensors (token ids, class
maps, low-res images, images to inpaint, labels; cacheable), and ``forward(prepared, drop, ...)`` -> the dict. In a
checkpoint the conditioner is ``cond_stage_model`` (CompVis' name), and its embedders' weights keep their own
names under it (``cond_stage_model.transformer.*``, ``cond_stage_model.class_map_embedding.weight``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latentdiff.conditioning.compat import FlatConditionerConfig, FlatFields
from latentdiff.conditioning.embedders.base import FIXED_DROPOUT_COLUMNS, Embedder, EmbedderConfig, Encode, Geometry
from latentdiff.conditioning.embedders.clip_text import CLIPEncoderConfig, FrozenCLIPTextEncoder
from latentdiff.conditioning.embedders.inpaint import InpaintEmbedder, inpaint_boxes
from latentdiff.conditioning.embedders.minilm import MiniLMConfig
from latentdiff.conditioning.embedders.registry import build_embedder, read_embedder_config
from latentdiff.config import ConfigError, from_dict


@dataclass(init=False)
class ConditionerConfig(FlatFields):
    """Which inputs condition the model: the ordered list of embedder configs (see the module docstring).

    ``ConditionerConfig(embedders=[...])``, or with the flat form's keywords (``ConditionerConfig(text_encoder=
    "clip", image="inpaint", clip=CLIPEncoderConfig(...))``), which the compatibility reader turns into the list.
    """

    embedders: list[EmbedderConfig]

    def __init__(self, embedders: Sequence[EmbedderConfig] | None = None, **flat: Any) -> None:
        if embedders is not None and flat:
            raise ValueError(f"give the conditioner's embedders or the flat fields ({', '.join(flat)}), not both")
        self.embedders = list(embedders) if embedders is not None else FlatConditionerConfig(**flat).embedders()
        if not self.embedders:
            raise ValueError("the conditioner has no inputs: list its embedders (in the flat form: set text_encoder, "
                             "class_map, image or num_classes)")
        names = [e.name for e in self.embedders]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"embedder names must be unique (dropout is addressed by name): {', '.join(twice)}")
        widths = {e.name: e.width for e in self.embedders if e.output == "crossattn"}
        if len(set(widths.values())) > 1:
            raise ValueError(f"cross-attention tokens follow one another, so they need one width, got {widths}")

    @classmethod
    def from_config_dict(cls, data: dict[str, Any], where: str) -> ConditionerConfig:
        """The tagged reader: ``embedders`` entries by their ``kind``, or the flat form."""
        where = where or "conditioner"
        if "embedders" not in data:
            return cls(from_dict(FlatConditionerConfig, data, where).embedders())
        extra = sorted(set(data) - {"embedders"})
        if extra:
            raise ConfigError(f"{where}: give embedders or the flat fields ({', '.join(extra)}), not both (this "
                              f"config lists embedders: override one by name, e.g. {where}.embedders.caption."
                              "dropout=0.2)")
        if not isinstance(data["embedders"], list):
            raise ConfigError(f"{where}.embedders: expected a list of embedders, got {data['embedders']!r}")
        entries = [read_embedder_config(e, f"{where}.embedders[{i}]") for i, e in enumerate(data["embedders"])]
        try:
            return cls(entries)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e

    def embedder(self, name: str) -> EmbedderConfig | None:
        return next((e for e in self.embedders if e.name == name), None)

    def dropout_rate(self, name: str) -> float:
        found = self.embedder(name)
        return found.dropout if found is not None else 0.0

    @property
    def inputs(self) -> tuple[str, ...]:
        """The embedders' names, in list order."""
        return tuple(e.name for e in self.embedders)

    @property
    def dropout_columns(self) -> tuple[str, ...]:
        """The name of each column of ``draw``'s "cond_dropout" uniforms."""
        return FIXED_DROPOUT_COLUMNS + tuple(n for n in self.inputs if n not in FIXED_DROPOUT_COLUMNS)

    @property
    def dropout_rates(self) -> tuple[float, ...]:
        """The rate of each dropout column (0 for a name no embedder has)."""
        return tuple(self.dropout_rate(name) for name in self.dropout_columns)

    @property
    def context_dim(self) -> int | None:
        """Width of the cross-attention tokens, None when nothing goes to cross-attention."""
        return next((e.width for e in self.embedders if e.output == "crossattn"), None)

    @property
    def has_context(self) -> bool:
        return self.context_dim is not None

    @property
    def has_concat(self) -> bool:
        return any(e.output == "concat" for e in self.embedders)

    def concat_channels(self, image_channels: int, latent_channels: int, image_size: int, latent_size: int) -> int:
        """How many channels the conditioner appends to the UNet's input."""
        geometry = Geometry(image_size, image_channels, latent_size, latent_channels)
        return sum(e.channels(geometry) for e in self.embedders)

    def cache_signature(self) -> dict[str, Any]:
        """What ``prepare``'s output depends on: a latent cache made under another signature is not reused. (Its
        first two keys are those of caches made before embedders, so that those stay valid.)"""
        signature: dict[str, Any] = {"inputs": list(self.inputs), "text_encoder": self.text_encoder}
        for e in self.embedders:
            signature.update(e.cache_signature())
        return signature


class Conditioner(nn.Module):
    """Batch -> ``{"context", "context_mask", "concat", "y"}`` (the keys its embedders give), with CFG dropout.

    ``image_size`` and ``image_channels`` describe the images, ``latent_channels`` and ``latent_size`` the UNet's
    latents (the image itself in pixel space). The embedders are built in list order (which decides their initial
    weights under a seeded RNG); their weights are registered here under their own names.
    """

    def __init__(self, config: ConditionerConfig, image_size: int, image_channels: int, latent_channels: int,
                 latent_size: int) -> None:
        super().__init__()
        self.config = config
        self.geometry = Geometry(image_size, image_channels, latent_size, latent_channels)
        self.embedders = tuple(build_embedder(c, self.geometry) for c in config.embedders)  # a tuple: not registered
        for embedder in self.embedders:
            self._adopt(embedder)
        self._columns = tuple(config.dropout_columns.index(e.config.name) for e in self.embedders)
        self.register_buffer("dropout_rates", torch.tensor(config.dropout_rates), persistent=False)

    def _adopt(self, embedder: Embedder) -> None:
        """Register the embedder's submodules and parameters here, under their own names (the checkpoint's)."""
        if next(embedder.buffers(recurse=False), None) is not None:
            raise TypeError(f"the {embedder.config.name!r} embedder has buffers of its own: keep them in a submodule")
        owned = [*embedder.named_children(), *embedder.named_parameters(recurse=False)]
        for name, value in owned:
            if hasattr(self, name):
                raise ValueError(f"the {embedder.config.name!r} embedder's {name!r} is taken by another embedder")
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.add_module(name, value)

    def embedder(self, name: str) -> Embedder:
        found = next((e for e in self.embedders if e.config.name == name), None)
        if found is None:
            raise KeyError(f"this conditioner has no embedder {name!r}; it has {', '.join(self.config.inputs)}")
        return found

    def dropout_column(self, name: str) -> int:
        """The column of embedder ``name`` in a ``drop`` mask."""
        return self._columns[self.embedders.index(self.embedder(name))]

    @property
    def context_dim(self) -> int | None:
        return self.config.context_dim

    @property
    def concat_channels(self) -> int:
        g = self.geometry
        return self.config.concat_channels(g.image_channels, g.latent_channels, g.image_size, g.latent_size)

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The batch keys its embedders read."""
        return tuple(dict.fromkeys(key for e in self.embedders for key in e.keys))

    # ------------------------------------------------------------------------------------------ stage 1: prepare

    @torch.no_grad()
    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The deterministic, cacheable tensors of its inputs in a batch (a dataset's items collated, or a
        caller's inputs). Already prepared tensors (``input_ids``, ``lowres``, ``mask``) pass through."""
        prepared: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            prepared.update(embedder.prepare(batch))
        return prepared

    def complete(self, prepared: dict[str, torch.Tensor], draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fill in what a training batch leaves to ``draw``'s numbers (an inpainting batch's masks)."""
        for embedder in self.embedders:
            prepared = embedder.complete(prepared, draws)
        return prepared

    # ------------------------------------------------------------------------------------------ randomness

    def draw(self, n: int, generator: torch.Generator | None = None,
             device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The conditioner's random numbers for ``n`` samples, in a fixed order: "cond_dropout" (n, columns)
        uniforms, then each embedder's own (the inpainting embedder's "inpaint_box" (n, 5))."""
        device = device if device is not None else (generator.device if generator is not None else torch.device("cpu"))
        draws = {"cond_dropout": torch.rand((n, len(self.config.dropout_columns)), generator=generator, device=device)}
        for embedder in self.embedders:
            draws.update(embedder.draw(n, generator, device))
        return draws

    def dropout_mask(self, uniform: torch.Tensor) -> torch.Tensor:
        """(n, columns) bool: which embedders of which samples give their unconditional version."""
        return uniform.to(self.dropout_rates.device) < self.dropout_rates

    def unconditional_mask(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """The CFG branch: every embedder that was trained with dropout is dropped, the others are kept."""
        return (self.dropout_rates > 0).expand(n, -1).to(device or self.dropout_rates.device).clone()

    def keep(self, drop: torch.Tensor, keys: Iterable[str]) -> torch.Tensor:
        """``drop`` with the embedders that read any of ``keys`` kept (a negative prompt given for the caption)."""
        keys = set(keys)
        for embedder, column in zip(self.embedders, self._columns, strict=True):
            if keys & set(embedder.keys):
                drop[:, column] = False
        return drop

    def training_masks(self, uniform: torch.Tensor) -> torch.Tensor:
        """Inpainting masks (n, 1, H, W) from ``draw``'s "inpaint_box" uniforms."""
        inpainters = [e for e in self.embedders if isinstance(e, InpaintEmbedder)]
        if not inpainters:
            raise ValueError("this conditioner has no inpainting embedder")
        return inpainters[0].training_masks(uniform)

    # ------------------------------------------------------------------------------------------ stage 2: encode

    def forward(self, inputs: dict[str, torch.Tensor], drop: torch.Tensor | None = None, encode: Encode | None = None,
                n: int | None = None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning from ``prepare``'s tensors.

        ``drop`` (n, columns) bool replaces embedders' outputs by their unconditional versions (``dropout_mask``,
        ``unconditional_mask``); an input that is missing altogether counts as dropped, so an empty dict gives the
        unconditional model. ``encode`` maps images in [-1, 1] to scaled latents (the first stage's posterior
        mode; needed for inpainting and for low-res latents). An inpainting batch without a ``mask`` gets none
        drawn here: the caller passes ``mask`` (or ``complete``s the batch from ``draw``'s numbers).
        """
        n = self._batch_size(inputs, n)
        device, columns = self.dropout_rates.device, len(self.config.dropout_columns)
        drop = torch.zeros(n, columns, dtype=torch.bool, device=device) if drop is None else drop.to(device)
        if drop.shape != (n, columns):
            raise ValueError(f"drop must be ({n}, {columns}), got {tuple(drop.shape)}")
        outputs: dict[str, list[Any]] = {"crossattn": [], "concat": [], "vector": []}
        for embedder, column in zip(self.embedders, self._columns, strict=True):
            outputs[embedder.config.output].append(embedder(inputs, drop[:, column], encode))
        return join_outputs(outputs["crossattn"], outputs["concat"], outputs["vector"])

    def _batch_size(self, inputs: dict[str, torch.Tensor], n: int | None) -> int:
        sizes = {len(v) for k, v in inputs.items() if k in self.input_keys and v is not None}
        if n is not None:
            sizes.add(n)
        if len(sizes) != 1:
            raise ValueError(f"conditioning inputs have different batch sizes {sorted(sizes)}" if sizes else
                             "cannot tell the batch size: give n or some conditioning input")
        return sizes.pop()


def join_outputs(crossattn: list[tuple[torch.Tensor, torch.Tensor | None]], concat: list[torch.Tensor],
                 vectors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's dict from the embedders' outputs of each kind, in list order (see the module docstring)."""
    cond: dict[str, torch.Tensor] = {}
    if crossattn:
        cond["context"] = torch.cat([tokens for tokens, _ in crossattn], dim=1)
        if any(mask is not None for _, mask in crossattn):
            cond["context_mask"] = torch.cat([torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
                                              if m is None else m for t, m in crossattn], dim=1)
    if concat:
        cond["concat"] = torch.cat(concat, dim=1)
    if vectors:
        if len(vectors) > 1 and any(v.ndim != 2 or not v.is_floating_point() for v in vectors):
            raise ValueError("several vector embedders join along their last dimension, so each must give float "
                             f"vectors (N, width), got {[(tuple(v.shape), v.dtype) for v in vectors]}")
        cond["y"] = vectors[0] if len(vectors) == 1 else torch.cat(vectors, dim=1)
    return cond


__all__ = ["CLIPEncoderConfig", "Conditioner", "ConditionerConfig", "FrozenCLIPTextEncoder", "MiniLMConfig",
           "inpaint_boxes", "join_outputs"]
