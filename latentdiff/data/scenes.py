"""Fashion-MNIST scenes: a built-in text-to-image dataset whose captions can be checked against the pixels.

A scene is a black RGB canvas holding one or two real Fashion-MNIST items, each tinted in a named colour and
placed at a named position, with a caption that says exactly that::

    "a red sneaker on the left and a blue bag on the right"
    "an orange boot at the top and a white dress at the bottom"
    "a green shirt"                       (a single item in the centre)
    "a yellow coat on the right"          (a single item in the right slot, the left slot empty)

It exists to test conditioning for real: a class-conditional model cannot follow these prompts, and because
every attribute is drawn from a small closed set, :mod:`latentdiff.eval.prompt_accuracy` can decide from the
generated pixels whether each attribute of a prompt holds.

Vocabulary
    Classes: the 10 Fashion-MNIST labels with short nouns (``CLASS_NAMES``: t-shirt, trouser, pullover, dress,
    coat, sandal, shirt, sneaker, bag, boot). Colours (``COLOURS``): red, orange, yellow, green, cyan, blue,
    purple, white, each an RGB triple whose largest channel is 1, so that dividing a pixel by its brightest
    channel recovers the colour exactly; the closest two (orange to red and to yellow) are 0.5 apart in RGB.
    Positions (``POSITIONS``): center, left, right, top, bottom.

Layout (:class:`SceneLayout`)
    Canvas ``S`` x ``S`` (``image_size``, default 32; 64 works the same), items ``s`` x ``s`` with
    ``s = S // 2`` by default (16 px at 32, 32 px at 64: still recognisable, and two fit side by side). Each
    position is a fixed box of side ``s`` centred at a quarter point of the canvas: left (S/2, S/4),
    right (S/2, 3S/4), top (S/4, S/2), bottom (3S/4, S/2), center (S/2, S/2), as (row, column) centres. The
    left/right boxes are disjoint, and so are top/bottom. All items have the same size in every layout, so a
    class is equally recognisable wherever it is.

Scenes
    With probability ``two_item_prob`` (0.5) a scene has two items, either left+right or top+bottom (equally
    likely), otherwise one item at any of the five positions (uniformly). The caption mentions the items in a
    random order, so that position words, not word order, carry the layout. ``"center"`` has no phrase in the
    caption ("a green shirt"); the others read "on the left", "on the right", "at the top", "at the bottom".

Items
    A source image is scaled so that its brightest pixel is 1, resized to ``s`` x ``s`` (bilinear, antialiased),
    renormalised to a maximum of 1 again and used as the intensity of its colour: pixel = alpha * rgb over a
    black background, then mapped to [-1, 1]. Source images with fewer than 5% of their pixels above 0.2 of
    their maximum (70 of 60k train, 10 of 10k test: nearly blank scans) are never used. Train scenes draw
    items from the Fashion-MNIST train file only, both test splits from the t10k file only.

Held-out combinations (:func:`heldout_pairs`)
    8 of the 80 (colour, class) pairs, 10%, are never shown in training: a seeded permutation of the classes
    gives each of the 8 colours one held-out class (8 distinct classes), so every colour and every class is
    still seen in training with other partners. ``"train"`` and ``"test"`` use only the 72 seen pairs;
    ``"test_heldout"`` puts one held-out pair on a randomly chosen item of every scene (the other item, if
    any, is any of the 80 pairs), to measure compositional generalisation. The held-out set depends on
    ``heldout_seed`` only, not on the scene seed, so a model trained with one scene seed is evaluated on the
    same held-out pairs with any other.

Determinism
    Item ``i`` of split ``s`` is a pure function of ``(seed, split, i)``: its generator is
    ``numpy.random.default_rng(SeedSequence([seed, SPLIT_CODES[split], i]))``, so any worker, order or
    subset of indices gives the same scenes. The dataset is virtual; its length is a parameter (defaults:
    60000 train, 10000 per test split). Random flips are never applied: they would swap left and right.

Each item is a dict that the default DataLoader collate handles:

``image``          float32 (3, S, S) in [-1, 1]
``caption``        str
``label``          -1 (no class label; kept so code that reads ``batch["label"]`` still works)
``class_map``      int64 (S, S): 0 background, 1 + class on item pixels (alpha >= ``MASK_THRESHOLD``): 11 classes
``instance_masks`` bool (MAX_ITEMS, S, S): item k's pixels, in caption order; all-False rows pad 1-item scenes
``attributes``     int64 (MAX_ITEMS, 3): (class, colour, position) indices in caption order, -1 rows pad;
                   :func:`decode_attributes` turns it (or a collated (B, MAX_ITEMS, 3) batch) into
                   :class:`SceneAttribute` tuples of names
``num_items``      int, 1 or 2
``is_heldout``     bool (MAX_ITEMS,): whether item k's (colour, class) is a held-out pair
``source_index``   int64 (MAX_ITEMS,): row of each item's image in the Fashion-MNIST file named by
                   ``FashionScenes.source_split`` ("train" or "test"), -1 pads
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from latentdiff.data.datasets import FASHION_MNIST_DIR, DataConfig, _load_fashion_mnist

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "COLOURS",
    "NEW_COLOURS",
    "MAX_ITEMS",
    "POSITIONS",
    "SCENE_SPLITS",
    "FashionScenes",
    "SceneAttribute",
    "SceneLayout",
    "caption_for",
    "decode_attributes",
    "encode_attributes",
    "heldout_pairs",
    "item_alpha",
    "render_scene",
]

CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
# Largest channel 1 in every colour: the colour of a tinted pixel is then pixel / max(pixel), exactly.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.3, 1.0),  # a little green lifts pure blue, which is very dark, away from black
    "purple": (0.65, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
COLOUR_NAMES = tuple(COLOURS)
# Colours for new data only (benchmarks/teach_concept.py --concept pink: a colour word the bundled models never saw).
# FashionScenes never draws them, so its scenes, captions and attribute indices stay what they were; render_scene
# and the prompt checker (CheckerConfig.new_colours) know them by name. Largest channel 1, as COLOURS.
NEW_COLOURS: dict[str, tuple[float, float, float]] = {
    "pink": (1.0, 0.45, 0.75),  # 0.60 from white, 0.62 from purple, 0.75 from orange in RGB
}
POSITIONS = ("center", "left", "right", "top", "bottom")
POSITION_PHRASES = {"center": "", "left": " on the left", "right": " on the right", "top": " at the top",
                    "bottom": " at the bottom"}
TWO_ITEM_LAYOUTS = (("left", "right"), ("top", "bottom"))
MAX_ITEMS = 2
SCENE_SPLITS = ("train", "test", "test_heldout")
SPLIT_CODES = {"train": 0, "test": 1, "test_heldout": 2}
DEFAULT_LENGTHS = {"train": 60000, "test": 10000, "test_heldout": 10000}
MASK_THRESHOLD = 0.1  # alpha above which a pixel belongs to its item in class_map / instance_masks
MIN_SOURCE_FILL = 0.05  # source images with fewer pixels above 0.2 x their max are not used


class SceneAttribute(NamedTuple):
    """One item of a prompt, by name: ``SceneAttribute("sneaker", "red", "left")``."""

    cls: str
    colour: str
    position: str


@dataclass(frozen=True)
class SceneLayout:
    """Where items go on the canvas: one ``item_size`` box per position (see the module docstring)."""

    canvas_size: int = 32
    item_size: int = 0  # 0: canvas_size // 2

    def __post_init__(self) -> None:
        if self.canvas_size < 16:
            raise ValueError(f"scene canvas must be at least 16 px, got {self.canvas_size}")
        size = self.item_size or self.canvas_size // 2
        if not 8 <= size <= self.canvas_size // 2:
            raise ValueError(f"scene item_size must be in [8, {self.canvas_size // 2}] for a "
                             f"{self.canvas_size} px canvas (two items side by side), got {size}")
        object.__setattr__(self, "item_size", size)  # resolve the default once; the dataclass is frozen

    def box(self, position: str) -> tuple[int, int]:
        """(top, left) corner of the ``item_size`` box for ``position``."""
        S, s = self.canvas_size, self.item_size
        centres = {"center": (S // 2, S // 2), "left": (S // 2, S // 4), "right": (S // 2, (3 * S) // 4),
                   "top": (S // 4, S // 2), "bottom": ((3 * S) // 4, S // 2)}
        if position not in centres:
            raise ValueError(f"unknown position {position!r}, expected one of {', '.join(POSITIONS)}")
        cy, cx = centres[position]
        # Clamped so that odd canvas sizes never push a box off the canvas.
        return min(max(cy - s // 2, 0), S - s), min(max(cx - s // 2, 0), S - s)

    def box_mask(self, position: str) -> Tensor:
        """bool (S, S), True inside the box of ``position``."""
        top, left = self.box(position)
        mask = torch.zeros(self.canvas_size, self.canvas_size, dtype=torch.bool)
        mask[top : top + self.item_size, left : left + self.item_size] = True
        return mask


# ---------------------------------------------------------------------------------------------------------
# Vocabulary helpers
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def heldout_pairs(seed: int = 0) -> tuple[tuple[str, str], ...]:
    """The 8 (colour, class) pairs never shown in training: colour k is held out with class perm[k]."""
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5CE7E])).permutation(len(CLASS_NAMES))
    return tuple((colour, CLASS_NAMES[int(perm[k])]) for k, colour in enumerate(COLOUR_NAMES))


def caption_for(attributes: Sequence[SceneAttribute]) -> str:
    """"a red sneaker on the left and a blue bag on the right", in the order given."""
    parts = []
    for cls, colour, position in attributes:
        article = "an" if colour[0] in "aeiou" else "a"
        parts.append(f"{article} {colour} {cls}{POSITION_PHRASES[position]}")
    return " and ".join(parts)


def encode_attributes(attributes: Sequence[SceneAttribute], max_items: int = MAX_ITEMS) -> Tensor:
    """int64 (max_items, 3) of (class, colour, position) indices, padded with -1 rows."""
    if len(attributes) > max_items:
        raise ValueError(f"{len(attributes)} attributes do not fit max_items={max_items}")
    out = torch.full((max_items, 3), -1, dtype=torch.long)
    for k, (cls, colour, position) in enumerate(attributes):
        out[k] = torch.tensor([CLASS_NAMES.index(cls), COLOUR_NAMES.index(colour), POSITIONS.index(position)])
    return out


def decode_attributes(encoded: Tensor) -> list[SceneAttribute] | list[list[SceneAttribute]]:
    """Inverse of :func:`encode_attributes`; a collated (B, max_items, 3) batch gives one list per scene."""
    if encoded.dim() == 3:
        return [decode_attributes(row) for row in encoded]  # type: ignore[misc]
    if encoded.dim() != 2 or encoded.shape[-1] != 3:
        raise ValueError(f"expected (max_items, 3) or (B, max_items, 3) attributes, got {tuple(encoded.shape)}")
    return [SceneAttribute(CLASS_NAMES[c], COLOUR_NAMES[k], POSITIONS[p])
            for c, k, p in encoded.tolist() if c >= 0]


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def item_alpha(source: np.ndarray | Tensor, size: int) -> Tensor:
    """A 28x28 uint8 Fashion-MNIST image as a (size, size) float intensity mask whose maximum is 1."""
    x = torch.as_tensor(np.array(source, dtype=np.float32))  # a copy: the idx arrays are read-only
    x = x / x.max().clamp_min(1.0)
    if x.shape[-1] != size:
        x = F.interpolate(x[None, None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    # Renormalised after resizing, so every item's brightest pixel shows its colour at full strength.
    return (x.clamp(0.0, 1.0) / x.max().clamp_min(1e-6)).clamp(0.0, 1.0)


def render_scene(sources: Sequence[np.ndarray | Tensor], attributes: Sequence[SceneAttribute],
                 layout: SceneLayout, max_items: int = MAX_ITEMS) -> dict[str, Tensor]:
    """Draw source images as the given attributes; returns ``image``, ``class_map`` and ``instance_masks``.

    Public so that tests (and anyone auditing the metric) can render deliberately wrong scenes: a source of
    one class drawn under another class's attribute, swapped positions, other colours.
    """
    if len(sources) != len(attributes):
        raise ValueError(f"{len(sources)} source images for {len(attributes)} attributes")
    S, s = layout.canvas_size, layout.item_size
    canvas = torch.zeros(3, S, S)
    class_map = torch.zeros(S, S, dtype=torch.long)
    masks = torch.zeros(max_items, S, S, dtype=torch.bool)
    for k, (source, (cls, colour, position)) in enumerate(zip(sources, attributes, strict=True)):
        alpha = item_alpha(source, s)
        top, left = layout.box(position)
        rgb = torch.tensor(COLOURS[colour] if colour in COLOURS else NEW_COLOURS[colour]).view(3, 1, 1)
        region = canvas[:, top : top + s, left : left + s]
        # max, not overwrite: dataset layouts never overlap, but a hand-made one must not erase an item.
        canvas[:, top : top + s, left : left + s] = torch.maximum(region, alpha * rgb)
        inside = alpha >= MASK_THRESHOLD
        masks[k, top : top + s, left : left + s] = inside
        class_map[top : top + s, left : left + s][inside] = 1 + CLASS_NAMES.index(cls)
    return {"image": canvas * 2.0 - 1.0, "class_map": class_map, "instance_masks": masks}


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _source_pool(root: str, split: str) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Fashion-MNIST images, labels and, per class, the rows usable as scene items."""
    images, labels = _load_fashion_mnist(root, split)
    peak = images.reshape(len(images), -1).max(axis=1).astype(np.float32)
    fill = (images.reshape(len(images), -1) > 0.2 * peak[:, None]).mean(axis=1)
    usable = (fill >= MIN_SOURCE_FILL) & (peak > 0)
    per_class = tuple(np.flatnonzero(usable & (labels == k)) for k in range(len(CLASS_NAMES)))
    return images, labels, per_class


class FashionScenes(Dataset):
    """Captioned scenes of tinted Fashion-MNIST items; see the module docstring for the whole design."""

    num_classes: int | None = None  # text-conditioned: no class labels

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        item_size: int = 0,
        length: int = 0,
        seed: int = 0,
        heldout_seed: int = 0,
        two_item_prob: float = 0.5,
        root: str = "",
    ) -> None:
        if split not in SCENE_SPLITS:
            raise ValueError(f"fmnist_scenes split must be one of {', '.join(SCENE_SPLITS)}, got {split!r}")
        if seed < 0 or heldout_seed < 0:
            raise ValueError(f"scene seeds must be non-negative, got seed={seed}, heldout_seed={heldout_seed}")
        if not 0.0 <= two_item_prob <= 1.0:
            raise ValueError(f"two_item_prob must be in [0, 1], got {two_item_prob}")
        self.name = "fmnist_scenes"
        self.split = split
        self.source_split = "train" if split == "train" else "test"
        self.layout = SceneLayout(image_size, item_size)
        self.length = length if length > 0 else DEFAULT_LENGTHS[split]
        self.seed = seed
        self.two_item_prob = two_item_prob
        self.heldout = heldout_pairs(heldout_seed)
        all_pairs = [(colour, cls) for colour in COLOUR_NAMES for cls in CLASS_NAMES]
        self.all_pairs = tuple(all_pairs)
        self.seen_pairs = tuple(p for p in all_pairs if p not in set(self.heldout))
        self.root = root or FASHION_MNIST_DIR
        self.images, self.labels, self.pool = _source_pool(self.root, self.source_split)

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str) -> FashionScenes:
        """Build from a :class:`DataConfig`: ``image_size`` is the canvas, ``limit`` the length, ``seed`` the seed."""
        if cfg.channels != 3:
            raise ValueError("fmnist_scenes are colour scenes: set data.channels: 3")
        if cfg.random_flip:
            logger.warning("fmnist_scenes ignores random_flip: a flip would swap 'left' and 'right' in captions")
        return cls(split, image_size=cfg.image_size, length=cfg.limit, seed=cfg.seed, root=cfg.root)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[list[SceneAttribute], list[int]]:
        """The attributes (caption order) and source rows of scene ``index``, without rendering it."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLIT_CODES[self.split], index]))
        if rng.random() < self.two_item_prob:
            positions = list(TWO_ITEM_LAYOUTS[int(rng.integers(len(TWO_ITEM_LAYOUTS)))])
            rng.shuffle(positions)  # mention order is random, so position words must carry the layout
        else:
            positions = [POSITIONS[int(rng.integers(len(POSITIONS)))]]
        if self.split == "test_heldout":
            pairs = [self.all_pairs[int(rng.integers(len(self.all_pairs)))] for _ in positions]
            pairs[int(rng.integers(len(positions)))] = self.heldout[int(rng.integers(len(self.heldout)))]
        else:
            pairs = [self.seen_pairs[int(rng.integers(len(self.seen_pairs)))] for _ in positions]
        attributes, sources = [], []
        for (colour, cls), position in zip(pairs, positions, strict=True):
            rows = self.pool[CLASS_NAMES.index(cls)]
            sources.append(int(rows[int(rng.integers(len(rows)))]))
            attributes.append(SceneAttribute(cls, colour, position))
        return attributes, sources

    def __getitem__(self, index: int) -> dict[str, Any]:
        attributes, sources = self.scene(index)
        item: dict[str, Any] = render_scene([self.images[i] for i in sources], attributes, self.layout)
        held = set(self.heldout)
        item.update(
            caption=caption_for(attributes),
            label=-1,
            attributes=encode_attributes(attributes),
            num_items=len(attributes),
            is_heldout=torch.tensor([(a.colour, a.cls) in held for a in attributes]
                                    + [False] * (MAX_ITEMS - len(attributes))),
            source_index=torch.tensor(sources + [-1] * (MAX_ITEMS - len(sources)), dtype=torch.long),
        )
        return item

    def __repr__(self) -> str:
        return (f"FashionScenes(split={self.split!r}, len={self.length}, image_size={self.layout.canvas_size}, "
                f"item_size={self.layout.item_size}, seed={self.seed}, heldout={list(self.heldout)})")
