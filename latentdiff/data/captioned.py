"""A folder of the user's own captioned images (``data.path``), in the conventions people already have.

Captions
    kohya's sd-scripts: ``photo.png`` + ``photo.txt`` beside it (the first non-empty line of the UTF-8 file).
    Hugging Face imagefolder: a ``metadata.jsonl`` (one JSON object per line) or ``metadata.csv`` (a header row)
    with the columns ``file_name`` (relative to the metadata file's folder) and ``text``; any folder of the tree
    may hold one. Where both conventions caption an image, the metadata wins (it is the dataset-level record, and
    Hugging Face's loader ignores .txt files) and one warning counts the images whose two captions differ. A folder
    with both metadata.jsonl and metadata.csv uses the jsonl where they overlap (with a warning); a metadata file
    deeper in the tree wins over one above it. Rows naming missing files are counted in one warning. A metadata
    file that cannot be parsed, or lacks the two columns, is an error naming the file and line.

Images
    Found recursively (``data.name`` folders' rules: png/jpg/jpeg/webp/bmp, symlinks followed once, sorted by
    relative path), EXIF-rotated and converted to ``data.channels``. Images without a caption (none, or an empty
    one) and images that fail to open are skipped; one log line gives the counts and the first few names. A split
    left empty is one error naming the folder and what was looked for.

Split
    The same rule as image folders (``folder_split``): on the full sorted listing of images, every 20th is test and
    the rest train; a folder of fewer than 20 images uses all of them for both (with a warning). Deciding on the
    full listing means that captioning or fixing one image never moves another between splits. The test split
    gives the sample grid its captions (cycled where it has fewer than ``sample_images``).

Items
    ``{"image": (C, H, W) in [-1, 1], "caption": str, "label": -1, "original_size": (height, width) int64,
    "crop_coords_top_left": (top, left) int64}``, as the Fashion-MNIST scenes' (image, caption, label), so the
    text-conditioned configs train on them unchanged. The last two are SDXL's micro-conditioning inputs: the image's
    size after EXIF rotation, and the crop's corner in the resized image (0, 0 for ``resize: pad | resize``).

Geometry
    With ``data.buckets`` (the train split) each image is resized to cover its aspect-ratio bucket
    (``data/buckets.py``) and cropped; otherwise to ``image_size`` with ``data.resize``. ``resize: center_crop``
    and buckets crop at ``data.crop``: ``center``, or ``random`` (train split) at a uniformly drawn corner. The test
    split is never bucketed: the model samples at ``image_size``, and the sample grid collates its items.

Caption augmentation (train split)
    ``caption_dropout``: the empty caption with this probability, then ``shuffle_tags``: the comma-separated tags in
    random order, the first ``keep_tokens`` kept in place (kohya's options). The conditioner's embedder dropout
    (``model.conditioner.embedders.caption.dropout``) does the same thing as ``caption_dropout`` for classifier-
    free guidance (the empty caption's encoding), drawn from the step's generator: exactly resumable, the same for
    any number of processes, and the rate ``sample_guidance`` looks for. Prefer it; the two rates compound. Both
    data-level options act on the caption text, before the latent cache's token ids are made, so a cache made once
    would freeze them: the diffusion trainer refuses them with ``cache_latents`` (``DataConfig.check_cacheable``), as
    it refuses random crops (buckets are cached at each item's bucket size). Random draws come from torch's global
    RNG, as ``random_flip``'s do.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from latentdiff.data.buckets import Size, assign_bucket, bucket_sizes
from latentdiff.data.datasets import (
    IMAGE_EXTENSIONS,
    DataConfig,
    ImageDataset,
    Item,
    folder_split,
    load_image_file,
    read_or_next,
    scan_folder,
    scan_image_folder,
)
from latentdiff.data.image_files import open_checked
from latentdiff.data.transforms import convert_mode, fit_to_size, resize_to_cover, to_tensor

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.csv", "metadata.jsonl")  # in a folder with both, the jsonl (read last) wins
CAPTION_EXTENSION = ".txt"
NAMES_SHOWN = 3  # skipped files named in the log line
# EXIF orientations 5-8 rotate by a quarter turn: the stored width is the shown height.
_QUARTER_TURNS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


class CaptionedFolderError(ValueError):
    """A captioned folder that gives no usable images, or a metadata file that cannot be read."""


def shuffle_tags(caption: str, keep_tokens: int = 0, generator: torch.Generator | None = None) -> str:
    """The comma-separated tags of ``caption`` in random order, the first ``keep_tokens`` kept in place (kohya's
    ``shuffle_caption`` with ``keep_tokens``); tags are stripped, empty ones dropped, rejoined with ", "."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join([*kept, *(rest[i] for i in order)])


def caption_key(path: Path) -> str:
    """How images and metadata rows are matched: the normalised path."""
    return os.path.normcase(os.path.normpath(path))


def read_caption_file(path: Path) -> str | None:
    """The first non-empty line of a kohya caption file, or None (no file, unreadable, empty)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


def _metadata_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a metadata.jsonl or metadata.csv."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        if path.suffix == ".jsonl":
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CaptionedFolderError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        else:
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row


def read_metadata(path: Path) -> dict[str, str]:
    """A metadata file's captions by ``caption_key`` of ``file_name`` taken relative to the file's folder."""
    captions = {}
    for number, row in _metadata_rows(path):
        if not isinstance(row, dict) or row.get("file_name") is None or "text" not in row:
            raise CaptionedFolderError(f"{path}:{number}: a metadata row needs the columns file_name and text")
        captions[caption_key(path.parent / str(row["file_name"]))] = str(row["text"] or "").strip()
    return captions


class FolderCaptions:
    """Every caption source of a folder: its metadata files, read at once, and the .txt beside each image."""

    def __init__(self, root: Path, images: list[Path]) -> None:
        files = scan_folder(root, lambda name: name in METADATA_FILES)
        # Shallow before deep and csv before jsonl: what is read later wins.
        files.sort(key=lambda p: (len(p.relative_to(root).parts), p.parent.as_posix(), p.name == "metadata.jsonl"))
        self.metadata: dict[str, str] = {}
        for file in files:
            if file.name == "metadata.jsonl" and (file.parent / "metadata.csv").is_file():
                logger.warning("%s has both metadata.jsonl and metadata.csv: the jsonl's captions win", file.parent)
            self.metadata.update(read_metadata(file))
        missing = sorted(set(self.metadata) - {caption_key(p) for p in images})
        if missing:
            logger.warning("%d metadata rows name no image file in %s (%s%s)", len(missing), root,
                           ", ".join(missing[:NAMES_SHOWN]), ", ..." if len(missing) > NAMES_SHOWN else "")
        self.disagreeing = 0  # images whose metadata caption and .txt caption differ

    def caption(self, image: Path) -> str | None:
        """The image's caption (the metadata's, else its .txt file's), or None."""
        from_file = read_caption_file(image.with_suffix(CAPTION_EXTENSION))
        from_metadata = self.metadata.get(caption_key(image)) or None
        if from_metadata is not None and from_file is not None and from_metadata != from_file:
            self.disagreeing += 1
        return from_metadata or from_file


def inspect_image(path: Path) -> tuple[Size | None, str | None]:
    """((height, width) as shown, after EXIF rotation, None) for a file that opens, else (None, the error)."""
    try:
        with open_checked(path, str(path)) as img:
            img.verify()
        with Image.open(path) as img:  # verify() leaves the file unusable; reading the EXIF needs it open again
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS:
                width, height = height, width
    except Exception as exc:  # PIL raises many unrelated exception types for bad files
        return None, f"{type(exc).__name__}: {exc}"
    return (height, width), None


def _names(paths: list[Path], root: Path) -> str:
    shown = ", ".join(p.relative_to(root).as_posix() for p in paths[:NAMES_SHOWN])
    return f" ({shown}{', ...' if len(paths) > NAMES_SHOWN else ''})" if paths else ""


class CaptionedFolderDataset(ImageDataset):
    """Images with captions under ``data.path`` (see the module docstring for every rule)."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        root = Path(cfg.path).expanduser()
        super().__init__(cfg, split, str(root))
        self.root = root
        if not root.is_dir():
            kind = "is a file, not a folder" if root.exists() else f"does not exist (resolved to {root.resolve()})"
            raise FileNotFoundError(f"data.path {str(root)!r} {kind}: give a folder of captioned images")
        all_images = scan_image_folder(root)
        captions = FolderCaptions(root, all_images)
        self.files: list[Path] = []
        self.captions: list[str] = []
        self.sizes: list[Size] = []
        unreadable: list[Path] = []
        captionless: list[Path] = []
        for path in folder_split(all_images, split, root) if all_images else []:
            if 0 < cfg.limit <= len(self.files):
                break
            caption = captions.caption(path)
            size, error = (None, None) if caption is None else inspect_image(path)
            if caption is None:
                captionless.append(path)
            elif error is not None:
                unreadable.append(path)
            else:
                self.files.append(path)
                self.captions.append(caption)
                self.sizes.append(size)
        self.num_skipped = len(unreadable) + len(captionless)
        differ = (f"; {captions.disagreeing} captioned both by metadata and .txt differently (the metadata's kept)"
                  if captions.disagreeing else "")
        logger.log(logging.WARNING if self.num_skipped or differ else logging.INFO,
                   "captioned folder %s, %s split: %d images with captions; skipped %d unreadable%s and %d without a "
                   "caption%s%s", root, split, len(self.files), len(unreadable), _names(unreadable, root),
                   len(captionless), _names(captionless, root), differ)
        if not self.files:
            raise CaptionedFolderError(
                f"no captioned images for the {split} split in {str(root)!r}: {len(all_images)} image files "
                f"({', '.join(IMAGE_EXTENSIONS)}, searched recursively), {len(unreadable)} unreadable, "
                f"{len(captionless)} without a caption; a caption is IMAGE.txt beside the image or a row of a "
                "metadata.jsonl / metadata.csv with the columns file_name and text")
        self.bucket_sizes: list[Size] = []
        self.item_buckets: list[int] | None = None  # the bucket sampler's input (train/loop.py's make_loader)
        if cfg.buckets and split == "train":
            self.bucket_sizes = bucket_sizes(*cfg.bucket_geometry)
            self.item_buckets = [assign_bucket(h, w, self.bucket_sizes) for h, w in self.sizes]
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        """Item ``index``'s caption as written (no augmentation): what a text encoder's vocabulary is built from."""
        return self.captions[index]

    def target_size(self, index: int) -> Size:
        """(height, width) of item ``index``: its bucket, else ``image_size`` square."""
        if self.item_buckets is not None:
            return self.bucket_sizes[self.item_buckets[index]]
        return self.cfg.image_size, self.cfg.image_size

    def _training_caption(self, index: int) -> str:
        caption, cfg = self.captions[index], self.cfg
        if self.split != "train":
            return caption
        if cfg.caption_dropout > 0 and float(torch.rand(())) < cfg.caption_dropout:
            return ""
        return shuffle_tags(caption, cfg.keep_tokens) if cfg.shuffle_tags else caption

    def _shape(self, img: Image.Image, index: int) -> tuple[Image.Image, tuple[int, int]]:
        """The image at its target size and the crop's (top, left) in the resized image."""
        if not self.cfg.buckets and self.cfg.resize != "center_crop":
            return fit_to_size(img, self.cfg.image_size, self.cfg.resize), (0, 0)
        height, width = self.target_size(index)
        img = resize_to_cover(img, height, width)
        spare_h, spare_w = img.height - height, img.width - width
        if self.cfg.crop == "random" and self.split == "train":
            top, left = int(torch.randint(spare_h + 1, ())), int(torch.randint(spare_w + 1, ()))
        else:
            top, left = spare_h // 2, spare_w // 2
        return img.crop((left, top, left + width, top + height)), (top, left)

    def _item(self, index: int) -> Item:
        img = load_image_file(self.files[index])
        original = (img.height, img.width)
        img, corner = self._shape(convert_mode(img, self.cfg.channels), index)
        x = to_tensor(img)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x, "caption": self._training_caption(index), "label": -1,
                "original_size": torch.tensor(original), "crop_coords_top_left": torch.tensor(corner)}

    def __getitem__(self, index: int) -> Item:
        # A file that passed verify() but fails to decode is replaced by the next good one of the same size (the
        # same bucket), so that a batch never mixes sizes.
        size = self.target_size(index)
        item = read_or_next(index, len(self.files), self._bad, self._item, self._report,
                            lambda i: self.target_size(i) == size)
        if item is None:
            raise CaptionedFolderError(f"no image of size {size} in {self.root} decodes")
        return item

    def _report(self, index: int, error: str) -> None:
        logger.warning("skipping image %s that fails to decode (%s)", self.files[index], error)

    def __repr__(self) -> str:
        buckets = f", buckets={len(set(self.item_buckets))}" if self.item_buckets is not None else ""
        return f"{super().__repr__()[:-1]}, num_skipped={self.num_skipped}{buckets})"
