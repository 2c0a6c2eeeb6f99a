"""Generation parameters inside the PNGs we write, and back out: AUTOMATIC1111's ``parameters`` text chunk (read by
A1111, ComfyUI and image viewers) and our own ``latentdiff`` JSON chunk, which holds every argument a re-run needs.

A1111's text is three parts: the prompt (any number of lines), an optional ``Negative prompt: ...`` line, and one
last line of ``Key: value`` pairs separated by ", " (a value with a comma is written in double quotes), e.g.
``Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: name``. The
model hash is A1111's short one: the first 10 hex digits of the file's sha256.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from latentdiff.data.image_files import open_checked
from latentdiff.diffusion.samplers import SAMPLER_ALIASES, resolve_sampler
from latentdiff.io.atomic import atomic_path
from latentdiff.io.files import file_sha256

PARAMETERS_KEY = "parameters"  # A1111's text chunk
JSON_KEY = "latentdiff"  # ours
NEGATIVE_PREFIX = "Negative prompt: "
SHORT_HASH_DIGITS = 10
# Our record's keys and A1111's names for them, in the order A1111 writes them.
A1111_KEYS = {"steps": "Steps", "sampler": "Sampler", "guidance": "CFG scale", "seed": "Seed", "size": "Size",
              "model_hash": "Model hash", "model": "Model", "subseed": "Variation seed",
              "subseed_strength": "Variation seed strength", "strength": "Denoising strength",
              "guidance_rescale": "CFG Rescale phi", "clip_skip": "Clip skip", "tome": "Token merging ratio",
              "lora_hashes": "Lora hashes"}
_A1111_NAMES = {target: alias for alias, target in SAMPLER_ALIASES.items()}
# `Key: value` pairs of the last line: a value runs to the next comma unless it is quoted.
_PAIR = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


class PNGParametersError(ValueError):
    """A PNG without readable generation parameters."""


def a1111_sampler_name(sampler: str, sigma_ramp: str | None) -> str:
    """A1111's name for a sampler and noise-level ramp ("DPM++ 2M Karras"), else our registry's name."""
    spec, named_ramp = resolve_sampler(sampler)
    return _A1111_NAMES.get((spec.name, sigma_ramp or named_ramp), spec.name)


def _quoted(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if "," in text or ":" in text or '"' in text else text


def a1111_parameters(record: dict[str, Any]) -> str:
    """A1111's ``parameters`` text for one image's record (the keys of ``generation_record``)."""
    values = {"steps": record["steps"], "sampler": a1111_sampler_name(record["sampler"], record.get("sigma_ramp")),
              "guidance": float(record["guidance"]), "seed": record["seed"],
              "size": f"{record['width']}x{record['height']}", "model_hash": record.get("model_hash"),
              "model": record.get("model_name"), "subseed": record.get("subseed"),
              "subseed_strength": record.get("subseed_strength"), "strength": record.get("strength"),
              "guidance_rescale": record.get("guidance_rescale") or None,
              "clip_skip": record["clip_skip"] if (record.get("clip_skip") or 1) > 1 else None,  # A1111: only > 1
              "tome": record.get("tome") or None,
              "lora_hashes": ", ".join(f"{Path(e['file']).stem}: {e['sha256'][:SHORT_HASH_DIGITS]}"
                                       for e in record.get("loras") or []) or None}
    pairs = ", ".join(f"{A1111_KEYS[k]}: {_quoted(v)}" for k, v in values.items() if v is not None)
    lines = [record.get("prompt") or ""]
    if record.get("negative"):
        lines.append(NEGATIVE_PREFIX + record["negative"])
    return "\n".join([*lines, pairs])


def parse_a1111_parameters(text: str) -> dict[str, Any]:
    """A1111's ``parameters`` text as a record (prompt, negative, steps, sampler, guidance, seed, width, height,
    model_name, model_hash, strength, guidance_rescale, clip_skip, tome, subseed, subseed_strength: those present);
    unknown keys are kept under ``a1111``."""
    lines = text.strip("\n").split("\n")
    pairs = {key.strip(): json.loads(value) if value.startswith('"') else value.strip()
             for key, value in _PAIR.findall(lines[-1])}
    if "Steps" not in pairs:
        raise PNGParametersError("the PNG's parameters text has no 'Steps: ...' line; it is not A1111's format")
    negative_at = next((i for i, line in enumerate(lines) if line.startswith(NEGATIVE_PREFIX)), len(lines) - 1)
    record: dict[str, Any] = {"prompt": "\n".join(lines[:negative_at]),
                              "negative": "\n".join(lines[negative_at:-1])[len(NEGATIVE_PREFIX):] or None}
    try:
        record["steps"], record["seed"] = int(pairs.pop("Steps")), int(pairs.pop("Seed", 0))
        record["guidance"] = float(pairs.pop("CFG scale", 7.0))
        if "Size" in pairs:
            record["width"], record["height"] = (int(v) for v in pairs.pop("Size").split("x"))
        for key, kind in (("strength", float), ("subseed", int), ("subseed_strength", float),
                          ("guidance_rescale", float), ("model_hash", str), ("model", str), ("clip_skip", int),
                          ("tome", float)):
            if A1111_KEYS[key] in pairs:  # the record calls the model's name model_name
                record["model_name" if key == "model" else key] = kind(pairs.pop(A1111_KEYS[key]))
    except ValueError as e:
        raise PNGParametersError(f"the PNG's parameters text has a malformed value: {e}") from None
    if "Sampler" in pairs:
        record["sampler"] = pairs.pop("Sampler")
    record["a1111"] = pairs
    return record


def png_info(record: dict[str, Any] | None) -> PngImagePlugin.PngInfo | None:
    """The two text chunks for ``record`` (None: no metadata)."""
    if record is None:
        return None
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(record))
    info.add_text(JSON_KEY, json.dumps(record, sort_keys=True))
    return info


def save_png(image: Image.Image, path: str | os.PathLike[str], record: dict[str, Any] | None = None) -> Path:
    """Write ``image`` as a PNG carrying ``record``'s parameters (None: none), atomically: to a temporary name in
    the same folder, renamed over ``path`` once complete, so a reader never sees half a file."""
    path = Path(path)
    with atomic_path(path) as temp, open(temp, "wb") as f:
        image.save(f, format="PNG", pnginfo=png_info(record))
    return path


def read_png_parameters(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The record a PNG carries: our JSON chunk, else A1111's ``parameters`` text parsed (``parse_a1111_parameters``);
    a PNGParametersError (a ValueError) when it has neither or is not an image, an OSError when it cannot be read."""
    try:
        with open_checked(Path(path), str(path)) as image:  # a decompression bomb is one clear line too
            chunks = dict(getattr(image, "text", {}))
    except UnidentifiedImageError:
        raise PNGParametersError(f"{path} is not an image") from None
    if JSON_KEY in chunks:
        try:
            record = json.loads(chunks[JSON_KEY])
        except json.JSONDecodeError as e:
            raise PNGParametersError(f"{path}: the {JSON_KEY!r} chunk is not JSON ({e})") from None
        if not isinstance(record, dict):
            raise PNGParametersError(f"{path}: the {JSON_KEY!r} chunk is not a JSON object")
        return record
    if PARAMETERS_KEY in chunks:
        return parse_a1111_parameters(chunks[PARAMETERS_KEY])
    raise PNGParametersError(f"{path} carries no generation parameters (no {JSON_KEY!r} or {PARAMETERS_KEY!r} chunk; "
                             "written with --no-metadata, or by another program)")


def input_hashes(paths: dict[str, str | None]) -> dict[str, str]:
    """The sha256 of each named input file given (init image, mask, ...), so a record says which inputs it used."""
    return {name: file_sha256(p) for name, p in paths.items() if p}


def model_identity(model: str | os.PathLike[str]) -> dict[str, str]:
    """The model's name (A1111's: a file's stem), its file or folder name and, for a single file, its sha256 and
    A1111's short hash. The path itself is left out: it differs between machines, and the same image must carry the
    same bytes everywhere."""
    path = Path(model)
    identity = {"model_name": path.stem if path.is_file() else path.name, "model_file": path.name}
    if path.is_file():
        digest = file_sha256(path)
        identity.update(model_sha256=digest, model_hash=digest[:SHORT_HASH_DIGITS])
    return identity


def image_records(record: dict[str, Any], count: int, separate: bool) -> Sequence[dict[str, Any]]:
    """One record per written file: ``count`` separate files each name their image (``index``), a grid or a single
    image has ``index`` None."""
    if separate and count > 1:
        return [dict(record, index=i) for i in range(count)]
    return [dict(record, index=None)]


__all__ = ["JSON_KEY", "PARAMETERS_KEY", "PNGParametersError", "a1111_parameters", "a1111_sampler_name",
           "image_records", "input_hashes", "model_identity", "parse_a1111_parameters",
           "read_png_parameters", "save_png"]
