"""The checkpoint formats, in the order they are detected, and reading, writing and converting through them.

Order matters because a path can look like more than one format; the first whose ``detect`` says yes reads it:

1. ``native``: our config (in the metadata or config.json beside) says what it is. First, because a native file is
   also a ``.safetensors`` in the original names, and a native folder holds a ``config.json`` too.
2. ``component``: a ``config.json`` naming a diffusers / transformers class, or diffusers' names in a
   ``.safetensors`` header. Before ``original``: both are ``.safetensors`` files, and the names tell them apart.
3. ``original``: any other ``.safetensors`` file.
4. ``diffusers``: a pipeline folder (model_index.json, unet/, vae/). Folders and files do not overlap, so its place
   after ``original`` only keeps the writable formats in the order the command line lists them.
5. ``ckpt``: a pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``); only loading it tells its names, so it comes last.

A new format (LoRA, textual-inversion embeddings) is one module with a ``FORMAT`` and one line in ``FORMATS``,
placed before the first format that would otherwise claim its files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentdiff.formats import ckpt, diffusers_component, diffusers_pipeline, native, stable_diffusion
from latentdiff.formats.components import CheckpointFormat, ReadOptions, StableDiffusionComponents
from latentdiff.io.atomic import atomic_output, check_destination
from latentdiff.io.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMATS: dict[str, CheckpointFormat] = {fmt.name: fmt for fmt in (
    native.FORMAT,
    diffusers_component.FORMAT,
    stable_diffusion.FORMAT,
    diffusers_pipeline.FORMAT,
    ckpt.FORMAT,
)}


def writable_formats() -> tuple[str, ...]:
    """The names of the formats that can be written, in registry order."""
    return tuple(name for name, fmt in FORMATS.items() if fmt.write is not None)


def detect_format(path: str | Path) -> str:
    """The name of the first format in ``FORMATS`` that recognises ``path``; a ``CheckpointError`` when the path
    is missing or no format does (the message lists what each one reads)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    for name, fmt in FORMATS.items():
        if fmt.detect(path):
            return name
    known = "; ".join(f"{name}: {fmt.description}" for name, fmt in FORMATS.items())
    raise CheckpointError(f"{path} is not a checkpoint in a format read here ({known})")


def read_components(path: str | Path, format: str | None = None, **options: Any) -> StableDiffusionComponents:
    """Read ``path`` in ``format`` (default: as detected) into components; ``options`` are ``ReadOptions``'
    fields (ema, text_encoder, text_encoder_converter, strict, config)."""
    read_options = ReadOptions(**options)
    name = format or detect_format(path)
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name].read(Path(path), read_options)


def _writer(format: str) -> CheckpointFormat:
    fmt = FORMATS.get(format)
    if fmt is None or fmt.write is None:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(writable_formats())}")
    return fmt


def write_components(comps: StableDiffusionComponents, path: str | Path, format: str,
                     overwrite: bool = False) -> Path:
    """Write ``comps`` to ``path`` in ``format`` (one of ``writable_formats()``); returns what was written.

    Atomically: the writer writes into a temporary folder beside ``path``, and what it made (file or folder) is
    renamed to ``path`` when complete. An existing ``path`` (a file, or a folder with anything in it) is refused
    unless ``overwrite``; then it is replaced as a whole (no file of the old one is left)."""
    writer, path = _writer(format), Path(path)
    with atomic_output(path, overwrite) as staged:
        written = writer.write(comps, staged)
    return path / Path(written).relative_to(staged)


def load_stable_diffusion_weights(path: str | Path, *, ema: bool = True, text_encoder: bool = True,
                                  text_encoder_converter: Callable | None = None,
                                  strict: bool = True) -> StableDiffusionComponents:
    """Read Stable Diffusion weights in any supported format into components in our names.

    ``path``: an original single file (``.safetensors`` / ``.ckpt``; full model, bare UNet or bare VAE), a diffusers
    pipeline or component folder, a diffusers-named weights file with its ``config.json`` beside it, or a native
    checkpoint (file, checkpoint folder, run folder). ``ema``: take the UNet's EMA copy when the file has one.
    ``text_encoder=False`` leaves the text encoder out. ``text_encoder_converter`` maps an SD v2 OpenCLIP text
    tower to ``CLIPTextModel`` names (default: ``latentdiff.conditioning.clip.openclip_to_hf``). Weights keep their
    stored dtype. Raises ``CheckpointError`` naming what does not fit.
    """
    return read_components(path, ema=ema, text_encoder=text_encoder, text_encoder_converter=text_encoder_converter,
                           strict=strict)


def convert(src: str | Path, dst: str | Path, to: str, *, ema: bool = True, dtype: torch.dtype | None = None,
            text_encoder: bool = True, config: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert the checkpoint at ``src`` to format ``to`` (one of ``writable_formats()``: "native", "original",
    "diffusers") at ``dst``.

    ``dst`` is a ``.safetensors`` file (original), a folder (diffusers) or a run folder (native). Returns what was
    written. ``dtype`` casts the floating-point weights (default: as stored). ``config``: a single file's original
    YAML (default: the ``.yaml`` beside it, if any). ``dst`` is written atomically, and an existing one is
    replaced only with ``overwrite`` (see ``write_components``).
    """
    _writer(to)  # an unknown format, or a destination in the way, is refused before anything is read
    check_destination(dst, overwrite)
    comps = read_components(src, ema=ema, text_encoder=text_encoder, config=config)
    if dtype is not None:
        comps = comps.to(dtype)
    logger.info("read %s: %s", src, comps.describe())
    return write_components(comps, dst, to, overwrite)
