"""Checked command-line values: argparse ``type=`` functions that refuse what a verb cannot use, in one line.

Every numeric option of every verb goes through one of these, so ``nan``, ``inf``, a negative count or a seed
beyond 64 bits fails while the arguments are parsed (argparse names the option: "argument --seed: ..."), before a
model is read or a file is written. Also here: the checks of sizes against a model and the pixel limit, and the
``--batch-size`` split that keeps the memory of ``-n`` images bounded.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from latentdiff.data.image_files import check_pixels
from latentdiff.pipelines.base import PipelineOutput, as_generator

# -n: images per call. Each call holds all its images (the grid is made of them), so the count is capped; make more
# with several calls and different --seed values.
MAX_IMAGES = 10000
# --steps: more sampler steps than a model's 1000 training timesteps add nothing but time.
MAX_STEPS = 10000
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits
IMAGE_SUFFIXES = (".png",)  # what the generating verbs write (PNG, with the generation parameters)
DEFAULT_BATCH = 16  # --batch-size of the generating verbs
# The largest side a native model is run at, in multiples of its training size (generate --height/--width, inputs).
NATIVE_MAX_SCALE = 4


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --seed: must be ..." reads as "--seed must be ..."
        named = re.match(r"argument (?:\S+/)?(\S+): (must be .*)", message, re.DOTALL)
        if named:
            message = f"{named.group(1)} {named.group(2)}"
        print(f"latentdiff: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text[:80]!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text[:80]!r}")
    return value


def _in_range(minimum: int | float, kind: type, what: str, maximum: int | float | None = None, why: str = ""):
    """A ``type=`` function for a ``kind`` number in [minimum, maximum] (``what`` describes it in errors)."""
    def parse(text: str):
        value = _number(text, kind)
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text[:80]}{why}")
        return value
    parse.__name__ = what.replace(" ", "_")  # argparse names the type in some messages
    return parse


positive_int = _in_range(1, int, "at least 1")
non_negative_int = _in_range(0, int, "at least 0")
finite_float = _in_range(-math.inf, float, "a finite number")
non_negative_float = _in_range(0.0, float, "a finite number >= 0")
positive_float = _in_range(math.ulp(0.0), float, "a finite number > 0")
probability = _in_range(0.0, float, "in [0, 1]", 1.0)
seed = _in_range(0, int, f"a whole number in [0, 2**64 - 1] ({SEED_MAX})", SEED_MAX)
image_count = _in_range(1, int, f"a whole number in [1, {MAX_IMAGES}]", MAX_IMAGES,
                        f" (at most {MAX_IMAGES} images per call: they are all held in memory for the grid; make more "
                        "with several calls and different --seed values)")
step_count = _in_range(1, int, f"a whole number in [1, {MAX_STEPS}]", MAX_STEPS)
strength = _in_range(math.ulp(0.0), float, "in (0, 1]", 1.0)
tome_ratio = _in_range(0.0, float, "a fraction of tokens in [0, 1)", math.nextafter(1.0, 0.0))


# The generating verbs' numbers and their argparse types: what ``recheck_numbers`` runs again.
RECHECKED = {"n": ("-n", image_count), "steps": ("--steps", step_count), "batch_size": ("--batch-size", positive_int),
             "guidance": ("--guidance", non_negative_float), "guidance_rescale": ("--guidance-rescale", probability),
             "seed": ("--seed", seed), "subseed": ("--subseed", seed),
             "subseed_strength": ("--subseed-strength", probability), "strength": ("--strength", strength),
             "height": ("--height", positive_int), "width": ("--width", positive_int),
             "clip_skip": ("--clip-skip", positive_int), "deep_cache": ("--deep-cache", positive_int),
             "tome": ("--tome", tome_ratio)}


def recheck_numbers(args: argparse.Namespace) -> None:
    """The argparse types of ``RECHECKED`` again, for values that did not come through argparse (a PNG's record for
    --from-png, a --prompts line); a ValueError naming the option."""
    for name, (option, parse) in RECHECKED.items():
        value = getattr(args, name, None)
        if value is not None:
            try:
                parse(str(value))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{option} {e}") from None


def check_native_size(pipe, width: int, height: int, what: str) -> None:
    """A size a native model can work at: sides up to ``NATIVE_MAX_SCALE`` times its training size (its own checks
    follow); beyond, the output means nothing and memory grows with the fourth power of the side."""
    size = pipe.image_size
    if max(width, height) > size * NATIVE_MAX_SCALE:
        raise ValueError(f"the {what} is {width}x{height}, but this model was trained at {size}x{size} and works at "
                         f"sides up to {NATIVE_MAX_SCALE * size} ({NATIVE_MAX_SCALE}x); resize it to {size}x{size}")


def check_requested_size(pipe, width: int | None, height: int | None, native: bool) -> None:
    """--width/--height: within ``check_native_size`` for a native model, within the pixel limit for another."""
    if native:
        check_native_size(pipe, width or pipe.image_size, height or pipe.image_size, "requested image")
    elif width and height:
        check_pixels(width, height, "--width x --height")


def add_batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, metavar="B",
                   help=f"make at most B images at once, so that memory stays bounded (default {DEFAULT_BATCH}); with "
                        "-n above B the batches draw from the one --seed's random stream in turn, so the first B "
                        "images are those of -n B")


def in_batches(batch_size: int, method: Callable[..., PipelineOutput]) -> Callable[..., PipelineOutput]:
    """``method`` (a pipeline call taking ``num_images`` and ``generator``) made ``batch_size`` images at a time:
    one call when ``num_images`` fits, else one per batch on one generator, the images joined on the CPU."""
    def run(*args, num_images: int, generator, **kwargs) -> PipelineOutput:
        if num_images <= batch_size:
            return method(*args, num_images=num_images, generator=generator, **kwargs)
        generator, outputs, variation = as_generator(generator), [], kwargs.pop("variation", None)
        for start in range(0, num_images, batch_size):  # a variation's image i keeps subseed + i across batches
            part = None if variation is None else dataclasses.replace(variation, first=variation.first + start)
            outputs.append(method(*args, num_images=min(batch_size, num_images - start), generator=generator,
                                  variation=part, **kwargs))
        return PipelineOutput(torch.cat([o.images for o in outputs]), torch.cat([o.latents for o in outputs]))
    return run


def add_allow_nonfinite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights holding NaN or infinity (refused by default), to debug a diverged model")


def image_output(text: str) -> str:
    """``-o`` of a verb that writes images: a file name ending in .png, not an existing folder."""
    path = Path(text)
    if not text or text.endswith(("/", "\\")) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name ending in .png, e.g. "
                                         f"{path / 'out.png'}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: images are written as PNG files; give a name ending in "
                                         ".png")
    return text


def check_image_output(args: argparse.Namespace) -> None:
    """``image_output``'s check of ``-o`` for the generating verbs, unless ``--prompts FILE`` makes ``-o`` a folder or
    a name pattern (latentdiff.cli.prompts checks it then)."""
    if not getattr(args, "prompts_file", None):
        try:
            image_output(args.output)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"-o/--output: {e}") from None


def file_output(text: str) -> str:
    """``-o`` of a verb that writes a report: a file name, not an existing folder."""
    if not text or text.endswith(("/", "\\")) or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is a folder; give a file name")
    return text


__all__ = ["DEFAULT_BATCH", "IMAGE_SUFFIXES", "MAX_IMAGES", "MAX_STEPS", "NATIVE_MAX_SCALE", "SEED_MAX",
           "OneLineParser", "add_allow_nonfinite", "add_batch_size", "check_image_output", "check_native_size",
           "recheck_numbers", "check_requested_size", "file_output", "finite_float", "image_count",
           "image_output", "in_batches", "non_negative_float", "non_negative_int", "positive_float", "positive_int",
           "probability", "seed", "step_count", "tome_ratio"]
