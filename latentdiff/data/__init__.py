"""Data loading for latentdiff: built-in datasets, image folders, captioned folders, aspect-ratio buckets, loaders and
image/grid transforms."""

from latentdiff.data.buckets import BucketBatchSampler, assign_bucket, bucket_sizes
from latentdiff.data.captioned import CaptionedFolderDataset, shuffle_tags
from latentdiff.data.datasets import (
    BUILTIN_DATASETS,
    ArrayImageDataset,
    DataConfig,
    ImageDataset,
    ImageFolderDataset,
    PhotoCropDataset,
    seed_worker,
)
from latentdiff.data.registry import build_dataset
from latentdiff.data.transforms import (
    center_crop_resize,
    convert_mode,
    fit_to_size,
    make_grid,
    pad_to_size,
    resize_square,
    save_image_grid,
    to_pil,
    to_tensor,
    to_uint8,
)

__all__ = [
    "BUILTIN_DATASETS",
    "ArrayImageDataset",
    "BucketBatchSampler",
    "CaptionedFolderDataset",
    "DataConfig",
    "ImageDataset",
    "ImageFolderDataset",
    "PhotoCropDataset",
    "assign_bucket",
    "bucket_sizes",
    "build_dataset",
    "center_crop_resize",
    "convert_mode",
    "fit_to_size",
    "make_grid",
    "pad_to_size",
    "resize_square",
    "save_image_grid",
    "seed_worker",
    "shuffle_tags",
    "to_pil",
    "to_tensor",
    "to_uint8",
]
