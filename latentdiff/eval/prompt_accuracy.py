"""Prompt accuracy: does a generated Fashion-MNIST scene show what its caption asked for?

For images generated from :mod:`latentdiff.data.scenes` captions, each attribute (class, colour, position) of
the prompt is checked in the pixels of the item's box (the same box the dataset draws it in,
:class:`~latentdiff.data.scenes.SceneLayout`). With ``b`` the brightness of a pixel (its largest channel, in
[0, 1]) and "foreground" meaning ``b > foreground_threshold``:

position
    The box holds foreground on at least ``min_fill`` of its area, AND the image's foreground outside the
    union of all the prompt's boxes is at most ``max_stray`` times the foreground inside them. So a single
    item drawn on the right fails "on the left" (its own box is empty), and one drawn both left and right,
    or centred, fails too (the stray foreground outside the named box). In two-item scenes the boxes cover
    their whole band, and a swapped pair fails colour and/or class instead.
colour
    Pixels of the box with ``b >= max(foreground_threshold, colour_fraction * brightest b in the box)`` are
    averaged; the mean RGB is divided by its largest channel (the dataset's colours all have a largest channel
    of 1, so a real tinted item gives its colour exactly, at any intensity) and the nearest named colour in
    RGB wins. An empty box has no colour.
class
    The box's brightness map, resized to 28x28, is classified by :class:`FashionClassifier`, a small CNN
    trained on real Fashion-MNIST (:func:`train_classifier`). An empty box has no class.

An attribute holds when all three hold; a prompt holds when all its attributes do. Because the classifier
is not perfect, the class (and so attribute and prompt) accuracy of *real* scenes is the ceiling to compare
generated images with: ``tests/test_scenes.py`` checks that real scenes score 100% on colour and position
and the classifier's own accuracy on class, and that recoloured, swapped, misplaced or mislabelled scenes
fail.

The classifier is trained with the degradation the scenes apply (28 px down to the item size and back up,
random item sizes 14-32 px on 3 images in 4, shifts of up to 2 px) and normalises each input by its
maximum, so that a dim but well-formed item is judged by its shape.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from latentdiff.config import from_dict, to_dict
from latentdiff.data.datasets import FASHION_MNIST_DIR, _load_fashion_mnist
from latentdiff.data.scenes import (
    CLASS_NAMES,
    COLOUR_NAMES,
    COLOURS,
    NEW_COLOURS,
    POSITIONS,
    SceneAttribute,
    SceneLayout,
    decode_attributes,
)
from latentdiff.io.atomic import atomic_path, write_text

logger = logging.getLogger(__name__)

__all__ = [
    "AttributeCheck",
    "CheckerConfig",
    "ClassifierConfig",
    "FashionClassifier",
    "degrade",
    "PromptChecker",
    "evaluate_classifier",
    "load_classifier",
    "prompt_accuracy",
    "train_classifier",
]

METADATA_KEY = "latentdiff_classifier"


# ---------------------------------------------------------------------------------------------------------
# The Fashion-MNIST classifier
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ClassifierConfig:
    """Widths of the three conv stages (28, 14, 7 px) and the hidden layer (91% test accuracy in 3000 steps)."""

    channels: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    dropout: float = 0.25


class FashionClassifier(nn.Module):
    """(N, 1, 28, 28) brightness in [0, 1] -> 10 Fashion-MNIST logits; each input is divided by its maximum."""

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        c1, c2, c3 = self.config.channels

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        # Narrow at full resolution, wide at 7x7: about half the compute of a 32-64 two-stage net, which
        # matters when training on one CPU thread.
        self.features = nn.Sequential(*stage(1, c1), nn.MaxPool2d(2), *stage(c1, c2), nn.MaxPool2d(2), *stage(c2, c3))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(self.config.dropout), nn.Linear(c3 * 7 * 7, self.config.hidden), nn.ReLU(),
            nn.Linear(self.config.hidden, len(CLASS_NAMES)),
        )
        self.metadata: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        # Brightness-invariant by construction: a generated item may be dimmer than the data without being
        # a different garment. The floor keeps an all-black input from being blown up into noise.
        x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(0.05)
        return self.head(self.features(x - 0.5))


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def degrade(x: Tensor, item_size: int) -> Tensor:
    """28x28 -> item_size -> 28x28, what a scene's item goes through between the dataset and the checker."""
    return _resize(_resize(x, item_size), 28).clamp(0.0, 1.0)


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``max_shift`` px in each direction (zero fill), for slightly misplaced items."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28] for i in range(n)])


@torch.no_grad()
def evaluate_classifier(model: FashionClassifier, item_size: int | None = None, root: str = "",
                        limit: int = 0, batch_size: int = 1000) -> float:
    """Accuracy on the Fashion-MNIST test split, on clean 28x28 images or degraded through ``item_size``."""
    images, labels = _load_fashion_mnist(root or FASHION_MNIST_DIR, "test")
    if limit > 0:
        images, labels = images[:limit], labels[:limit]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size].copy()).float().div(255.0)[:, None]
        if item_size is not None:
            x = degrade(x, item_size)
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == torch.from_numpy(labels[start : start + batch_size].astype("int64"))).sum())
    model.train(was_training)
    return correct / len(images)


def train_classifier(
    out_path: str | Path | None = "fashion_classifier.safetensors",
    steps: int = 3000,
    seed: int = 0,
    threads: int = 1,
    *,
    batch_size: int = 128,
    lr: float = 3e-3,
    config: ClassifierConfig | None = None,
    item_sizes: tuple[int, int] = (14, 32),
    size_groups: int = 4,
    eval_sizes: tuple[int, ...] = (16, 32),
    eval_limit: int = 0,
    root: str = "",
) -> tuple[FashionClassifier, dict[str, Any]]:
    """Train :class:`FashionClassifier` on the Fashion-MNIST train split on the CPU, measure it, save it.

    Each batch is cut into ``size_groups`` groups: the first stays clean, each other one is degraded through
    a random item size in ``item_sizes`` (as scenes are); every image is shifted by up to 2 px. Mixing the
    sizes within a batch keeps BatchNorm's batch statistics close to its running ones at evaluation. AdamW,
    cosine learning-rate decay. The metadata (saved in the safetensors header and as JSON beside it,
    ``<out_path>.json``) holds the config, the training settings and the measured test accuracy,
    clean (``test_accuracy``) and through each of ``eval_sizes`` (``test_accuracy_at_item_size``).
    ``out_path=None`` trains without saving. Returns the model (in eval mode) and its metadata.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        images, labels = _load_fashion_mnist(root or FASHION_MNIST_DIR, "train")
        images_t = torch.from_numpy(images.copy())
        labels_t = torch.from_numpy(labels.astype("int64"))
        model = FashionClassifier(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        model.train()
        start = time.time()
        for step in range(steps):
            idx = torch.randint(0, len(images_t), (batch_size,), generator=generator)
            x = images_t[idx].float().div(255.0)[:, None]
            sizes = torch.randint(item_sizes[0], item_sizes[1] + 1, (size_groups,), generator=generator).tolist()
            groups = x.chunk(size_groups)
            x = torch.cat([groups[0], *(degrade(g, size) for g, size in zip(groups[1:], sizes, strict=False))])
            x = _random_shift(x, 2, generator)
            loss = F.cross_entropy(model(x), labels_t[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if (step + 1) % 500 == 0 or step + 1 == steps:
                logger.info("classifier step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(),
                            time.time() - start)
        model.eval()
        metadata = {
            "config": to_dict(model.config),
            "steps": steps,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
            "item_sizes": list(item_sizes),
            "size_groups": size_groups,
            "train_seconds": round(time.time() - start, 1),
            "test_accuracy": evaluate_classifier(model, None, root, eval_limit),
            "test_accuracy_at_item_size": {str(s): evaluate_classifier(model, s, root, eval_limit)
                                           for s in eval_sizes},
            "eval_limit": eval_limit,
        }
    finally:
        torch.set_num_threads(previous_threads)
    model.metadata = metadata
    logger.info("classifier test accuracy %.4f, through item sizes %s", metadata["test_accuracy"],
                metadata["test_accuracy_at_item_size"])
    if out_path is not None:
        save_classifier(model, out_path)
    return model, metadata


def save_classifier(model: FashionClassifier, out_path: str | Path) -> None:
    """The weights with ``model.metadata`` in the safetensors header, and the metadata as JSON beside them."""
    out_path = Path(out_path)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_path) as temp:
        save_file(weights, str(temp), metadata={METADATA_KEY: json.dumps(model.metadata)})
    write_text(out_path.with_name(out_path.name + ".json"), json.dumps(model.metadata, indent=2))


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> FashionClassifier:
    """A classifier saved by :func:`train_classifier`, in eval mode, its metadata in ``model.metadata``."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if METADATA_KEY not in header:
        raise ValueError(f"{path} is not a FashionClassifier checkpoint (no {METADATA_KEY!r} metadata)")
    metadata = json.loads(header[METADATA_KEY])
    model = FashionClassifier(from_dict(ClassifierConfig, metadata["config"]))
    model.load_state_dict(load_file(str(path)))
    model.metadata = metadata
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Checking prompts
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CheckerConfig:
    """Thresholds of :class:`PromptChecker`; see the module docstring for how each is used."""

    item_size: int = 0  # 0: canvas // 2, as FashionScenes
    foreground_threshold: float = 0.2  # brightness (largest channel, [0, 1]) above which a pixel is foreground
    min_fill: float = 0.02  # position: foreground fraction of the box; real items fill at least ~3%
    max_stray: float = 0.25  # position: foreground outside the prompt's boxes / inside them
    colour_fraction: float = 0.5  # colour: use pixels at least this fraction of the box's brightest
    new_colours: tuple[str, ...] = ()  # data.scenes.NEW_COLOURS added to the palette (e.g. "pink"); () as before


@dataclass
class AttributeCheck:
    """The verdict on one attribute of one prompt, with what was seen."""

    attribute: SceneAttribute
    predicted_class: str | None
    predicted_colour: str | None
    fill: float
    stray: float
    class_ok: bool
    colour_ok: bool
    position_ok: bool

    @property
    def ok(self) -> bool:
        return self.class_ok and self.colour_ok and self.position_ok


Attributes = Sequence[SceneAttribute] | Sequence[tuple[Any, Any, Any]] | Tensor


def _as_attributes(attributes: Attributes, colours: Sequence[str] = COLOUR_NAMES) -> list[SceneAttribute]:
    """Attributes as names, from names, indices, or an encoded (max_items, 3) tensor; a colour outside ``colours``
    (the checker's palette) is refused."""
    if isinstance(attributes, Tensor):
        return decode_attributes(attributes)  # type: ignore[return-value]
    out = []
    for cls, colour, position in attributes:
        cls = CLASS_NAMES[cls] if isinstance(cls, int) else cls
        colour = COLOUR_NAMES[colour] if isinstance(colour, int) else colour
        position = POSITIONS[position] if isinstance(position, int) else position
        if cls not in CLASS_NAMES or colour not in colours or position not in POSITIONS:
            raise ValueError(f"unknown attribute {(cls, colour, position)!r} (colours: {', '.join(colours)})")
        out.append(SceneAttribute(cls, colour, position))
    return out


@dataclass
class PromptChecker:
    """Checks (class, colour, position) attributes in (N, 3, H, W) images in [-1, 1] of any scene canvas size."""

    classifier: FashionClassifier
    config: CheckerConfig = field(default_factory=CheckerConfig)
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        self.classifier = self.classifier.to(self.device).eval()
        unknown = [c for c in self.config.new_colours if c not in NEW_COLOURS]
        if unknown:
            raise ValueError(f"new_colours must be among {', '.join(NEW_COLOURS)}, got {', '.join(unknown)}")
        self._colour_names = COLOUR_NAMES + tuple(self.config.new_colours)
        palette = torch.tensor([*COLOURS.values(), *(NEW_COLOURS[c] for c in self.config.new_colours)])
        self._palette = palette / palette.amax(1, keepdim=True)

    @torch.no_grad()
    def check(self, images: Tensor, attributes_list: Sequence[Attributes]) -> list[list[AttributeCheck]]:
        """One :class:`AttributeCheck` per attribute, per image."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"expected square RGB images (N, 3, S, S), got {tuple(images.shape)}")
        if len(images) != len(attributes_list):
            raise ValueError(f"{len(images)} images but {len(attributes_list)} attribute lists")
        cfg = self.config
        layout = SceneLayout(images.shape[-1], cfg.item_size)
        s = layout.item_size
        rgb = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
        bright = rgb.amax(1)  # (N, S, S)
        foreground = bright > cfg.foreground_threshold

        prompts = [_as_attributes(a, self._colour_names) for a in attributes_list]
        crops, strays = [], []
        for n, attrs in enumerate(prompts):
            union = torch.zeros_like(foreground[n])
            for a in attrs:
                union |= layout.box_mask(a.position)
            inside = int(foreground[n][union].sum())
            strays.append(int(foreground[n][~union].sum()) / max(inside, 1))
            for a in attrs:
                top, left = layout.box(a.position)
                crops.append(rgb[n, :, top : top + s, left : left + s])
        if not crops:
            return [[] for _ in prompts]
        crops_t = torch.stack(crops)  # (M, 3, s, s)
        crop_bright = crops_t.amax(1)  # (M, s, s)
        fill = (crop_bright > cfg.foreground_threshold).float().mean((1, 2))

        # Colour: the mean of the bright pixels, brightness-normalised, nearest palette entry.
        peak = crop_bright.amax((1, 2), keepdim=True)
        use = crop_bright >= torch.maximum(peak * cfg.colour_fraction, torch.tensor(cfg.foreground_threshold))
        count = use.sum((1, 2))
        mean = (crops_t * use[:, None]).sum((2, 3)) / count.clamp_min(1)[:, None]
        mean = mean / mean.amax(1, keepdim=True).clamp_min(1e-6)
        colour_idx = torch.cdist(mean, self._palette).argmin(1)

        # Class: the brightness map at 28x28, as the classifier was trained.
        x = _resize(crop_bright[:, None], 28).clamp(0.0, 1.0)
        logits = torch.cat([self.classifier(chunk.to(self.device)).cpu() for chunk in x.split(512)])
        class_idx = logits.argmax(1)

        results, m = [], 0
        for n, attrs in enumerate(prompts):
            row = []
            for a in attrs:
                has_item = bool(count[m] > 0)
                pred_class = CLASS_NAMES[int(class_idx[m])] if has_item else None
                pred_colour = self._colour_names[int(colour_idx[m])] if has_item else None
                row.append(AttributeCheck(
                    attribute=a,
                    predicted_class=pred_class,
                    predicted_colour=pred_colour,
                    fill=float(fill[m]),
                    stray=strays[n],
                    class_ok=pred_class == a.cls,
                    colour_ok=pred_colour == a.colour,
                    position_ok=bool(fill[m] >= cfg.min_fill) and strays[n] <= cfg.max_stray,
                ))
                m += 1
            results.append(row)
        return results


def prompt_accuracy(images: Tensor | Sequence[Tensor], attributes_list: Sequence[Attributes] | Tensor,
                    checker: PromptChecker, batch_size: int = 256) -> dict[str, float | int]:
    """Per-attribute accuracies (class, colour, position, all three) and the fraction of prompts fully met.

    ``images``: (N, 3, S, S) in [-1, 1] or a sequence of (3, S, S); ``attributes_list``: per image a list of
    (class, colour, position) names or indices, an encoded (max_items, 3) tensor, or a collated
    (N, max_items, 3) ``batch["attributes"]``.
    """
    if not isinstance(images, Tensor):
        images = torch.stack(list(images))
    if len(images) != len(attributes_list):
        raise ValueError(f"{len(images)} images but {len(attributes_list)} attribute lists")
    totals = dict.fromkeys(("class", "colour", "position", "attribute"), 0)
    prompts_ok = num_attributes = 0
    for start in range(0, len(images), batch_size):
        chunk = checker.check(images[start : start + batch_size], attributes_list[start : start + batch_size])
        for row in chunk:
            prompts_ok += all(c.ok for c in row) and len(row) > 0
            num_attributes += len(row)
            for c in row:
                totals["class"] += c.class_ok
                totals["colour"] += c.colour_ok
                totals["position"] += c.position_ok
                totals["attribute"] += c.ok
    denom = max(num_attributes, 1)
    out: dict[str, float | int] = {f"{k}_accuracy": v / denom for k, v in totals.items()}
    out["prompt_accuracy"] = prompts_ok / max(len(images), 1)
    out["num_prompts"] = len(images)
    out["num_attributes"] = num_attributes
    return out
