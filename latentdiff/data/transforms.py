"""Image transforms: mode conversion, resizing to a square, tensor <-> uint8 and PNG image grids.

Everything here is a small pure function so that datasets, training previews and evaluation all share
one definition of "an image in [-1, 1]". Conventions:

* tensors are float ``(C, H, W)`` (or ``(N, C, H, W)``) with values in ``[-1, 1]``;
* uint8 arrays are ``(H, W, C)`` with ``C`` in {1, 3}, or ``(H, W)`` for grayscale input;
* geometry works on PIL images, whose resamplers antialias when shrinking.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.io.atomic import atomic_path

logger = logging.getLogger(__name__)

RESIZE_MODES = ("pad", "resize", "center_crop")

_BICUBIC = Image.Resampling.BICUBIC


# ---------------------------------------------------------------------------------------------------------
# Mode conversion
# ---------------------------------------------------------------------------------------------------------


def high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """Map 16/32-bit integer and float grayscale images onto 0..255 ("L")."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        # Float images are usually normalised to [0, 1]; anything else is taken to be on a 0..255 scale.
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale)
    else:
        arr = arr.astype(np.float64)
        # "I;16*" modes are 16 bit by definition; PIL also opens 16-bit PNGs as "I", so a 32-bit image
        # whose values fit in 16 bits is treated as 16 bit rather than (mostly black) 32 bit.
        peak = arr.max(initial=0.0)
        if img.mode.startswith("I;16") or 255.0 < peak <= 65535.0:
            arr = arr / 257.0
        elif peak > 65535.0:
            arr = arr * (255.0 / peak)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def convert_mode(img: Image.Image, channels: int, background: int = 255) -> Image.Image:
    """Convert any PIL image to ``"L"`` (``channels=1``) or ``"RGB"`` (``channels=3``).

    Transparency (RGBA, LA, PA, and palette or RGB images with a ``transparency`` entry) is
    alpha-composited onto a flat ``background`` grey level, white (255) by default: transparent images
    are mostly logos, icons and drawings meant to be shown on a light page, and black would turn dark
    line art invisible. High-bit-depth grayscale ("I;16", "I", "F") is rescaled to 8 bit; CMYK/YCbCr/
    HSV/LAB go through PIL's own conversion. Colour to grayscale uses PIL's ITU-R 601-2 luma.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img

    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
    elif img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = high_bit_depth_to_8bit(img)
    elif img.mode == "1":
        img = img.convert("L")
    return img.convert(target)


# ---------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------


def border_color(img: Image.Image) -> int | tuple[int, ...]:
    """Median colour of the one-pixel border: a cheap estimate of the image's background."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[..., None]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]], axis=0)
    med = np.median(border, axis=0).round().astype(int)
    return int(med[0]) if img.mode == "L" else tuple(int(v) for v in med)


def pad_to_size(img: Image.Image, size: int, fill: int | tuple[int, ...] | None = None) -> Image.Image:
    """Centre the image on a square canvas, then shrink it to ``size`` if the canvas is larger.

    The canvas side is ``max(width, height, size)`` so nothing is cropped and the aspect ratio is kept.
    ``fill=None`` uses :func:`border_color`, which is black for MNIST-style digits and white for
    product shots on white, so the padding blends in with whatever background the image has.
    """
    w, h = img.size
    side = max(w, h, size)
    if (w, h) != (side, side):
        if fill is None:
            fill = border_color(img)
        canvas = Image.new(img.mode, (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if side != size:
        img = img.resize((size, size), _BICUBIC)
    return img


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize straight to ``size x size`` (aspect ratio not kept; antialiased when shrinking)."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), _BICUBIC)


def resize_to_cover(img: Image.Image, height: int, width: int) -> Image.Image:
    """Bicubic resize, aspect ratio kept, to the smallest size that covers ``height x width`` (ready to crop)."""
    w, h = img.size
    if (w, h) == (width, height):
        return img
    scale = max(width / w, height / h)
    # Rounding may leave a side a pixel short of the target; max() keeps the crop inside the image.
    return img.resize((max(width, round(w * scale)), max(height, round(h * scale))), _BICUBIC)


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size``, then crop the central ``size x size`` square."""
    img = resize_to_cover(img, size, size)
    nw, nh = img.size
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def fit_to_size(img: Image.Image, size: int, mode: str = "pad") -> Image.Image:
    """Bring an image to ``size x size`` with one of :data:`RESIZE_MODES`."""
    if mode == "pad":
        return pad_to_size(img, size)
    if mode == "resize":
        return resize_square(img, size)
    if mode == "center_crop":
        return center_crop_resize(img, size)
    raise ValueError(f"unknown resize mode {mode!r}; expected one of {', '.join(RESIZE_MODES)}")


# ---------------------------------------------------------------------------------------------------------
# Tensor <-> uint8
# ---------------------------------------------------------------------------------------------------------


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 PIL image or array (``HW`` or ``HWC``) -> float32 tensor ``(C, H, W)`` in ``[-1, 1]``."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an HW or HWC image, got shape {arr.shape}")
    # np.asarray on a PIL image may be read-only; torch needs a writable, contiguous buffer.
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)).copy())
    return t.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Tensor in ``[-1, 1]``, ``(C, H, W)`` or ``(N, C, H, W)`` -> uint8 ``(H, W, C)`` / ``(N, H, W, C)``.

    Values are clamped (and NaN mapped to 0, i.e. mid grey) so that raw model output can be saved as-is.
    """
    if images.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
    x = torch.nan_to_num(images.detach().float().cpu(), nan=0.0)
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def to_pil(image: torch.Tensor) -> Image.Image:
    """Tensor ``(C, H, W)`` in ``[-1, 1]`` with C in {1, 3} -> PIL ``"L"`` or ``"RGB"`` image."""
    arr = to_uint8(image)
    if arr.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[..., 0]))
    if arr.shape[-1] == 3:
        return Image.fromarray(arr)
    raise ValueError(f"expected 1 or 3 channels, got {arr.shape[-1]}")


# ---------------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------------


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in ``[-1, 1]`` into one uint8 ``(H', W', C)`` array.

    ``nrow`` images go in each row (the last row may be partly empty and is filled with ``pad_value``).
    There are ``padding`` pixels of ``pad_value`` between cells and around the border, so image ``i``
    has its top-left pixel at ``(padding + (i // nrow) * (H + padding), padding + (i % nrow) * (W +
    padding))``. C must be 1 or 3; a single ``(C, H, W)`` image is accepted too.
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {c}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, dtype=np.uint8
    )
    tiles = to_uint8(images)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top : top + h, left : left + w] = tiles[i]
    return grid


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike[str], nrow: int = 8, padding: int = 2
) -> Path:
    """Write :func:`make_grid` of ``images`` as a PNG (grayscale or RGB); parent folders are created."""
    grid = make_grid(images, nrow=nrow, padding=padding)
    path = Path(path)
    # fromarray infers "L" from a 2-D array and "RGB" from (H, W, 3) uint8.
    img = Image.fromarray(np.ascontiguousarray(grid[..., 0]) if grid.shape[-1] == 1 else grid)
    with atomic_path(path) as temp:  # written whole or not at all
        img.save(temp, format="PNG")
    logger.debug("saved %d-image grid to %s", images.shape[0] if images.ndim == 4 else 1, path)
    return path
