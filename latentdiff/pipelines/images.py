"""Images in and out of the pipelines: PIL images, arrays, tensors and files to (N, C, H, W) tensors in [0, 1].

Pixels go into the pipelines as float tensors in [0, 1] (the autoencoder sees ``2x - 1``) and come out the same
way. Masks follow diffusers' ``StableDiffusionInpaintPipeline``: one channel, white (1) = repaint, black (0) = keep,
binarised at 0.5.

Class maps (semantic synthesis) are PNGs whose pixel values are class indices: a palette PNG (mode "P": each
pixel's palette index is its class, so the colours are only for viewing) or a greyscale one (mode "L", or 16/32-bit
"I;16"/"I": the grey value is the class). For the Fashion-MNIST scenes, 0 is the background and 1 + c the
Fashion-MNIST class c (11 classes). ``save_class_map`` writes a palette PNG with distinct colours.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.data.image_files import image_file_size, read_image
from latentdiff.data.transforms import high_bit_depth_to_8bit
from latentdiff.io.atomic import atomic_path

logger = logging.getLogger(__name__)

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | Path | list


def _pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = high_bit_depth_to_8bit(image)  # 16-bit PNGs scaled to 8 bit, not clipped to white
    image = image.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(image, dtype=np.float32) / 255.0  # diffusers' pil_to_numpy
    return arr if arr.ndim == 3 else arr[..., None]


def to_image_tensor(image: ImageInput, channels: int = 3) -> torch.Tensor:
    """A float32 (N, channels, H, W) tensor in [0, 1] from a path, PIL image, array or tensor (or a list of them).

    Arrays are (H, W), (H, W, C) or (N, H, W, C), uint8 or float in [0, 1]; tensors (C, H, W) or (N, C, H, W) in
    [0, 1]. Colour images are made grey (ITU-R 601 luma, as PIL's "L") for a one-channel request.
    """
    if isinstance(image, list):
        if not image:
            raise ValueError("an empty list of images")
        return torch.cat([to_image_tensor(i, channels) for i in image])
    if isinstance(image, (str, Path)):
        return to_image_tensor(read_image(image), channels)
    if isinstance(image, Image.Image):
        return torch.from_numpy(_pil_to_array(image, channels).transpose(2, 0, 1).copy())[None]
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"expected an (H, W), (H, W, C) or (N, H, W, C) array, got shape {image.shape}")
        tensor = torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ValueError(f"expected a (C, H, W) or (N, C, H, W) tensor, got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"expected a path, PIL image, numpy array or tensor, got {type(image).__name__}")
    return _match_channels(tensor, channels)


def _match_channels(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    c = tensor.shape[1]
    if c == channels:
        return tensor
    if channels == 1 and c in (3, 4):
        r, g, b = tensor[:, 0:1], tensor[:, 1:2], tensor[:, 2:3]
        return 0.299 * r + 0.587 * g + 0.114 * b
    if channels == 3 and c == 1:
        return tensor.expand(-1, 3, -1, -1)
    if channels == 3 and c == 4:
        return tensor[:, :3]
    raise ValueError(f"expected images with {channels} channel(s), got {c}")


def to_mask_tensor(mask: ImageInput) -> torch.Tensor:
    """A (N, 1, H, W) float mask of 0s and 1s: 1 (white) where to repaint, binarised at 0.5 as diffusers does."""
    m = to_image_tensor(mask, channels=1)
    return (m >= 0.5).to(torch.float32)


def check_size(height: int, width: int, multiple: int, what: str = "image") -> None:
    """Raise a ValueError unless ``height`` and ``width`` are positive multiples of ``multiple``."""
    if height < multiple or width < multiple or height % multiple or width % multiple:
        fit_w, fit_h = max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)
        raise ValueError(f"{what} size {width}x{height}: both sides must be multiples of {multiple} (this model's "
                         f"autoencoder and UNet downsample by {multiple} together); use e.g. {fit_w}x{fit_h}")


def resize_to_multiple(images: torch.Tensor, multiple: int, resample: str = "bicubic") -> torch.Tensor:
    """Resize (N, C, H, W) down to the nearest multiple of ``multiple`` in each side (at least one multiple)."""
    h, w = images.shape[-2:]
    new_h, new_w = max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)
    if (new_h, new_w) == (h, w):
        return images
    if resample == "nearest":
        return torch.nn.functional.interpolate(images, size=(new_h, new_w), mode="nearest")
    out = torch.nn.functional.interpolate(images, size=(new_h, new_w), mode=resample, align_corners=False,
                                          antialias=True)
    return out.clamp(0, 1)


CLASS_MAP_MODES = ("P", "L", "I;16", "I")  # PIL modes whose pixel values are class indices


def read_class_map(path: str | Path) -> torch.Tensor:
    """A class-map PNG (see the module docstring) as (1, H, W) int64 class indices."""
    path = Path(path)
    image = read_image(path, "class map")
    mode = image.mode
    if mode not in CLASS_MAP_MODES:
        raise ValueError(f"{path} is a colour image (mode {mode}); a class map is a palette or greyscale PNG whose "
                         "pixel values are class indices (0 background, 1 + class on the objects)")
    return torch.from_numpy(np.asarray(image).astype(np.int64))[None]


def _palette(n: int) -> list[int]:
    """``n`` RGB colours: black first (the background), then well separated hues."""
    colours = [(0, 0, 0)]
    for i in range(1, n):
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio steps spread the hues
        shade = 1.0 if (i // 8) % 2 == 0 else 0.6
        r, g, b = (max(0.0, min(1.0, abs((hue * 6 + k) % 6 - 3) - 1)) for k in (0, 4, 2))
        colours.append(tuple(round(255 * shade * c) for c in (r, g, b)))
    return [c for rgb in colours for c in rgb]


def save_class_map(class_map: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Write (H, W) (or (1, H, W)) class indices below 256 as a palette PNG that ``read_class_map`` reads back."""
    values = np.asarray(class_map.cpu() if isinstance(class_map, torch.Tensor) else class_map)
    values = values[0] if values.ndim == 3 and values.shape[0] == 1 else values
    if values.ndim != 2 or values.min() < 0 or values.max() > 255:
        raise ValueError(f"a class map to save is (H, W) class indices in [0, 255], got shape {values.shape}")
    image = Image.fromarray(values.astype(np.uint8))  # "L"; a palette makes it "P"
    image.putpalette(_palette(256))
    path = Path(path)
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
    return path


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [0, 1] -> PIL images (uint8, rounded as diffusers' ``numpy_to_pil``)."""
    arr = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


__all__ = ["CLASS_MAP_MODES", "ImageInput", "check_size", "image_file_size", "read_class_map", "resize_to_multiple",
           "save_class_map", "to_image_tensor", "to_mask_tensor", "to_pil_images"]
