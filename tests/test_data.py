"""Tests for latentdiff.data: built-in datasets, image folders, loaders and grid/transform helpers."""

from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data import (
    DataConfig,
    build_dataset,
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
from latentdiff.data.datasets import FASHION_MNIST_DIR


def _check_item(item: dict, channels: int, size: int) -> None:
    x = item["image"]
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.float32
    assert x.shape == (channels, size, size)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert isinstance(item["label"], int)


# ---------------------------------------------------------------------------------------------------------
# Built-in datasets
# ---------------------------------------------------------------------------------------------------------

needs_fashion = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist is not installed",
)


@needs_fashion
@pytest.mark.parametrize("channels", [1, 3])
def test_fashion_mnist_items(channels: int) -> None:
    ds = build_dataset(DataConfig(name="fashion_mnist", channels=channels, limit=8), "test")
    assert len(ds) == 8 and ds.num_classes == 10
    assert "fashion_mnist" in repr(ds)
    for i in range(len(ds)):
        item = ds[i]
        _check_item(item, channels, 32)
        assert 0 <= item["label"] < 10
    x = ds[0]["image"]
    # 28 -> 32 padding uses the black background, so the 2-pixel frame is exactly -1.
    assert torch.all(x[:, :2] == -1.0) and torch.all(x[:, :, -2:] == -1.0)
    if channels == 3:
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


@needs_fashion
def test_fashion_mnist_full_sizes() -> None:
    assert len(build_dataset(DataConfig(name="fashion_mnist"), "test")) == 10_000


def test_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)), "train")


def test_mnist5k_splits_and_items() -> None:
    train = build_dataset(DataConfig(name="mnist5k", channels=3, image_size=28), "train")
    test = build_dataset(DataConfig(name="mnist5k"), "test")
    assert len(train) == 4500 and len(test) == 500
    assert train.num_classes == 10
    _check_item(train[0], 3, 28)
    _check_item(test[0], 1, 32)
    # Every class is in the test split, and a short prefix is class-balanced.
    assert sorted(set(test.labels.tolist())) == list(range(10))
    assert [test[i]["label"] for i in range(10)] == list(range(10))
    limited = build_dataset(DataConfig(name="mnist5k", limit=5), "train")
    assert len(limited) == 5
    # No digit image is in both splits.
    train_set = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in train_set for img in test.images)


def test_photos_test_split_is_deterministic() -> None:
    cfg = DataConfig(name="photos", channels=3, image_size=24, photos_test_crops=6)
    a = build_dataset(cfg, "test")
    b = build_dataset(cfg, "test")
    assert len(a) == 6 and a.num_classes is None
    for i in range(len(a)):
        _check_item(a[i], 3, 24)
        assert a[i]["label"] == -1
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["image"], a[i]["image"])
    assert not torch.equal(a[0]["image"], a[1]["image"])
    other_seed = build_dataset(DataConfig(name="photos", channels=3, image_size=24, seed=1), "test")
    assert not torch.equal(a[0]["image"], other_seed[0]["image"])
    assert not set(a.photo_names) & set(build_dataset(cfg, "train").photo_names)


def test_photos_train_is_random() -> None:
    cfg = DataConfig(name="photos", channels=1, image_size=16, photos_crops_per_epoch=50, random_flip=True)
    ds = build_dataset(cfg, "train")
    assert len(ds) == 50
    _check_item(ds[0], 1, 16)
    torch.manual_seed(0)
    first = torch.stack([ds[i]["image"] for i in range(4)])
    second = torch.stack([ds[i]["image"] for i in range(4)])
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    again = torch.stack([ds[i]["image"] for i in range(4)])
    assert torch.equal(first, again)
    assert len(build_dataset(DataConfig(name="photos", limit=7), "train")) == 7


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(ValueError, match="fashion_mnist.*mnist5k.*photos"):
        build_dataset(DataConfig(name="no_such_dataset_xyz"), "train")


def test_bad_config_and_split() -> None:
    with pytest.raises(ValueError, match="channels"):
        DataConfig(channels=2)
    with pytest.raises(ValueError, match="resize"):
        DataConfig(resize="stretch")
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(name="mnist5k"), "val")


# ---------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (20, 12), color=None, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        color = 128 if mode in ("L", "P") else tuple([100] * len(mode))
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def test_folder_recursive_formats(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    _save(tmp_path / "sub" / "b.JPG", fmt="JPEG")
    _save(tmp_path / "sub" / "deeper" / "c.webp", mode="RGBA", color=(255, 0, 0, 0))
    _save(tmp_path / "sub" / "d.bmp", mode="L")
    _save(tmp_path / "e.jpeg", mode="L", fmt="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    cfg = DataConfig(name=str(tmp_path), channels=3, image_size=16)
    ds = build_dataset(cfg, "train")
    names = [p.relative_to(tmp_path).as_posix() for p in ds.files]
    assert names == ["a.png", "e.jpeg", "sub/b.JPG", "sub/d.bmp", "sub/deeper/c.webp"]
    assert ds.num_skipped == 0 and ds.num_classes is None
    for i in range(len(ds)):
        _check_item(ds[i], 3, 16)
        assert ds[i]["label"] == -1
    # Fully transparent pixels are composited on white.
    webp = ds[names.index("sub/deeper/c.webp")]["image"]
    assert torch.allclose(webp, torch.ones_like(webp))
    assert str(tmp_path) in repr(ds)


def test_folder_small_uses_all_files_for_both_splits(tmp_path: Path, caplog) -> None:
    for i in range(3):
        _save(tmp_path / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        test = build_dataset(DataConfig(name=str(tmp_path)), "test")
    assert len(test) == 3
    assert "train and test both use all" in caplog.text


def test_folder_every_20th_file_is_test(tmp_path: Path) -> None:
    for i in range(45):
        _save(tmp_path / f"{i:03d}.png", mode="L", size=(4, 4))
    train = build_dataset(DataConfig(name=str(tmp_path)), "train")
    test = build_dataset(DataConfig(name=str(tmp_path)), "test")
    assert [p.name for p in test.files] == ["019.png", "039.png"]
    assert len(train) == 43
    assert not set(train.files) & set(test.files)
    assert len(build_dataset(DataConfig(name=str(tmp_path), limit=4), "train")) == 4


def test_folder_corrupt_files_are_skipped(tmp_path: Path, caplog) -> None:
    _save(tmp_path / "good1.png")
    _save(tmp_path / "nested" / "good2.jpg", fmt="JPEG")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    _truncated_jpeg(tmp_path / "nested" / "truncated.jpg")
    cfg = DataConfig(name=str(tmp_path), channels=1, image_size=8)
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(cfg, "train")
        items = [ds[i] for i in range(len(ds))]
    for item in items:
        _check_item(item, 1, 8)
    assert ds.num_skipped == 2
    assert sorted(Path(p).name for p in ds.skipped_files) == ["garbage.png", "truncated.jpg"]
    assert "garbage.png" in caplog.text and "truncated.jpg" in caplog.text
    # A file that failed once is skipped silently from then on, without being counted twice.
    [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2


def test_folder_only_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="no readable images"):
        build_dataset(DataConfig(name=str(tmp_path)), "train")


def test_empty_folder_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"no images found in folder.*{tmp_path.name}"):
        build_dataset(DataConfig(name=str(tmp_path)), "train")


def test_missing_folder_error(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist.*does not exist"):
        build_dataset(DataConfig(name=str(missing)), "train")


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pad", "resize", "center_crop"])
@pytest.mark.parametrize("size", [(40, 20), (20, 40), (10, 6), (16, 16)])
def test_fit_to_size_shapes(mode: str, size: tuple[int, int]) -> None:
    img = Image.new("RGB", size, (10, 20, 30))
    out = fit_to_size(img, 16, mode)
    assert out.size == (16, 16) and out.mode == "RGB"


def test_pad_resize_crop_semantics() -> None:
    # A white bar on a black 20x10 image: padding keeps it whole, cropping cuts it, resizing stretches it.
    arr = np.zeros((10, 20), np.uint8)
    arr[3:7, 2:18] = 255
    img = Image.fromarray(arr)
    padded = np.asarray(pad_to_size(img, 20))
    assert padded.shape == (20, 20)
    assert (padded[:5] == 0).all() and (padded[15:] == 0).all()  # black border => black padding
    assert (padded[5:15] == arr).all()
    small = np.asarray(pad_to_size(Image.fromarray(np.full((4, 6), 200, np.uint8)), 8))
    assert small.shape == (8, 8) and (small == 200).all()
    shrunk = np.asarray(pad_to_size(img, 10))  # 20x20 canvas, then halved
    assert shrunk.shape == (10, 10) and shrunk[5, 5] > 200 and (shrunk[:2] < 20).all()
    cropped = np.asarray(center_crop_resize(img, 10))
    assert cropped.shape == (10, 10)
    assert (cropped[3:7] == 255).all() and (cropped[:3] == 0).all()
    stretched = np.asarray(resize_square(img, 10))
    assert stretched.shape == (10, 10) and stretched[5, 0] < 128 and stretched[5, 5] > 200


def test_convert_mode_variants() -> None:
    assert convert_mode(Image.new("L", (4, 4), 7), 3).mode == "RGB"
    assert convert_mode(Image.new("RGB", (4, 4), (255, 255, 255)), 1).getpixel((0, 0)) == 255
    la = convert_mode(Image.new("LA", (4, 4), (0, 0)), 1)
    assert la.getpixel((0, 0)) == 255
    p = Image.new("P", (4, 4), 3)
    assert convert_mode(p, 3).mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert convert_mode(deep, 1).getpixel((0, 0)) == 255
    assert convert_mode(Image.new("1", (4, 4), 1), 1).getpixel((0, 0)) == 255


def test_tensor_uint8_round_trip() -> None:
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = to_tensor(arr)
    assert x.shape == (1, 16, 16) and x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(to_uint8(x)[..., 0], arr)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_pil(to_tensor(Image.fromarray(rgb)))), rgb)
    wild = torch.tensor([[[-5.0, 5.0, float("nan")]]])
    assert to_uint8(wild).reshape(-1).tolist() == [0, 255, 128]


def test_make_grid_layout() -> None:
    # Image i is filled with a distinct value; check each cell's corners and the padding between them.
    values = [-1.0, -0.5, 0.0, 0.5, 1.0]
    images = torch.stack([torch.full((3, 4, 5), v) for v in values])
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 6 + 2, 3 * 7 + 2, 3)
    expected = to_uint8(torch.tensor(values).view(-1, 1, 1, 1))[:, 0, 0, 0]
    for i, value in enumerate(expected):
        top, left = 2 + (i // 3) * 6, 2 + (i % 3) * 7
        cell = grid[top : top + 4, left : left + 5]
        assert (cell == value).all()
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()
    assert (grid[6:8] == 0).all()  # gap between rows
    assert (grid[8:12, 16:21] == 0).all()  # the unused 6th cell
    one_channel = make_grid(torch.zeros(2, 1, 3, 3), nrow=4, padding=1)
    assert one_channel.shape == (5, 9, 1) and one_channel[1, 1, 0] == 128
    with pytest.raises(ValueError):
        make_grid(torch.zeros(1, 2, 3, 3), nrow=1)


def test_save_image_grid_round_trip(tmp_path: Path) -> None:
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    path = save_image_grid(images, tmp_path / "out" / "grid.png", nrow=3)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        loaded = np.asarray(img)
    assert np.array_equal(loaded, make_grid(images, nrow=3))
    gray = save_image_grid(torch.zeros(2, 1, 4, 4), tmp_path / "gray.png", nrow=2)
    with Image.open(gray) as img:
        assert img.mode == "L" and img.size == (2 * 6 + 2, 6 + 2)


# ---------------------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------------------




def test_colour_photo_crops_come_from_colour_photos_only() -> None:
    cfg = DataConfig(name="photos", image_size=32, channels=3, photos_test_crops=8)
    for split in ("train", "test"):
        ds = build_dataset(cfg, split)
        for photo in ds.photos:
            assert photo.ndim == 3 and float(photo.astype("float32").std(axis=2).mean()) > 1.0, ds.photo_names
    grey = build_dataset(dataclasses.replace(cfg, channels=1), "train")
    assert len(grey.photo_names) > len(build_dataset(cfg, "train").photo_names)
