"""Opening image files with a pixel limit checked from the header, before anything is decoded.

A small PNG or JPEG can declare a huge canvas (a "decompression bomb": a 60 KB PNG of 20000x20000 pixels decodes to
1.2 GB), so every image the project reads (command-line inputs, training data, shards) is opened here: the size in
the header is checked against ``max_pixels()`` first, and only then decoded. The limit is ``DEFAULT_MAX_PIXELS``
(4096 x 4096) unless the environment variable ``LATENTDIFF_MAX_PIXELS`` sets another; PIL's own guard
(``Image.MAX_IMAGE_PIXELS``) is raised with it when it is set higher.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

MAX_PIXELS_ENV = "LATENTDIFF_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 4096 * 4096


class ImageTooLargeError(ValueError):
    """An image whose header declares more pixels than ``max_pixels()``."""


def max_pixels() -> int:
    """The largest image (width x height) read: ``LATENTDIFF_MAX_PIXELS``, else ``DEFAULT_MAX_PIXELS``."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={text[:40]!r} is not a whole number of pixels") from None
    if value < 1:
        raise ValueError(f"{MAX_PIXELS_ENV} must be a positive number of pixels, got {value}")
    return value


def _too_large(where: str, size: str, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(f"{where} is {size}, more than the {limit} pixels images may have here (a guard against "
                              f"decompression bombs); to read it, raise the limit with {MAX_PIXELS_ENV}=N")


def check_pixels(width: int, height: int, where: str) -> None:
    """Refuse a ``width`` x ``height`` image above the pixel limit (``where`` names the file in the message)."""
    limit = max_pixels()
    if width * height > limit:
        raise _too_large(where, f"{width}x{height} pixels", limit)


def open_checked(source: str | Path | bytes, where: str) -> Image.Image:
    """The image in the file ``source`` (or its bytes), open but not decoded, its size checked against the limit.

    Raises ``ImageTooLargeError`` above the limit and lets PIL's other errors through (callers name the file)."""
    limit = max_pixels()
    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit  # PIL refuses at twice its limit: keep it above ours
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as e:
        raise _too_large(where, "a decompression bomb", limit) from e
    try:
        check_pixels(*img.size, where)
    except ImageTooLargeError:
        img.close()
        raise
    return img


@contextmanager
def _opened_file(path: Path, what: str) -> Iterator[Image.Image]:
    """``open_checked`` on the file at ``path``: a missing file is a FileNotFoundError and a file PIL cannot read
    (here or in the block) a ValueError, both naming ``path``; the pixel limit's error passes unchanged."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open_checked(path, str(path)) as img:
            yield img
    except ImageTooLargeError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of failing
        raise ValueError(f"{path} is not a readable image ({type(e).__name__}: {str(e)[:120]})") from e


def read_image(path: str | Path, what: str = "image") -> Image.Image:
    """The image file at ``path`` decoded into memory (the file closed again), after the header's pixel check."""
    with _opened_file(Path(path), what) as img:
        img.load()
        return img.copy()  # the decoded pixels outlive the closed file


def image_file_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) of the image file at ``path`` from its header, without decoding it; the pixel limit and the
    file's structure (``verify``: a truncated PNG fails here) are checked, with ``read_image``'s errors."""
    with _opened_file(Path(path), what) as img:
        size = img.size
        img.verify()
        return size


__all__ = ["DEFAULT_MAX_PIXELS", "MAX_PIXELS_ENV", "ImageTooLargeError", "check_pixels", "image_file_size",
           "max_pixels", "open_checked", "read_image"]
