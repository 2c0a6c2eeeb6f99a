"""Datasets by name: a built-in dataset's name, an image folder's path or a captioned folder (``data.path``) ->
the dataset for a split."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from latentdiff.data.captioned import CaptionedFolderDataset
from latentdiff.data.datasets import (
    BUILTIN_DATASETS,
    DataConfig,
    ImageDataset,
    ImageFolderDataset,
    PhotoCropDataset,
    _check_split,
    fashion_mnist,
    mnist5k,
)
from latentdiff.data.scenes import FashionScenes
from latentdiff.data.shards import ShardDataset

logger = logging.getLogger(__name__)


_BUILDERS: dict[str, Callable[[DataConfig, str], ImageDataset]] = {
    "fashion_mnist": fashion_mnist,
    "mnist5k": mnist5k,
    "photos": PhotoCropDataset,
}


def build_dataset(cfg: DataConfig, split: str) -> ImageDataset | ShardDataset:
    """Build the dataset of ``cfg.shards`` (webdataset shards), ``cfg.path`` (a captioned folder) or ``cfg.name``
    (built-in name or folder path) for ``split``."""
    cfg.check_captioned_options()
    if cfg.shards:  # a shard set replaces data.name (see data/shards.py)
        return ShardDataset(cfg, split)
    key = cfg.name.strip().lower().replace("-", "_")
    if key == "fmnist_scenes" and not cfg.path:  # captioned colour scenes, with a third split "test_heldout"
        return FashionScenes.from_config(cfg, split)
    _check_split(split)
    if cfg.path:
        dataset = CaptionedFolderDataset(cfg, split)
    elif key in _BUILDERS:
        dataset = _BUILDERS[key](cfg, split)
    else:
        path = Path(cfg.name).expanduser()
        looks_like_path = any(sep in cfg.name for sep in ("/", os.sep)) or cfg.name.startswith(("~", "."))
        if not path.exists() and not looks_like_path:
            raise ValueError(
                f"unknown dataset {cfg.name!r}: not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) "
                "and no folder of that name exists"
            )
        dataset = ImageFolderDataset(cfg, split, path)
    logger.info("built %r", dataset)
    return dataset
