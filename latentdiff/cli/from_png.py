"""``--from-png FILE`` for ``generate``, ``img2img`` and ``inpaint``: the arguments of the run a PNG records (our
``latentdiff`` JSON chunk, else A1111's ``parameters`` text, ``latentdiff.pipelines.metadata``) put back in place of
the defaults, so that the same command gives the same bytes.

The model, LoRAs and embeddings are found again by their recorded file names (here, in ``models/``, among the bundled
models; a LoRA's or embedding's sha256 must match). Input images and masks are not in a PNG (A1111 does not record
them either): the user gives them again, and a warning says when one is not the recorded file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latentdiff.io.files import file_sha256
from latentdiff.pipelines.metadata import read_png_parameters

REPO_ROOT = Path(__file__).resolve().parents[2]
# What `--from-png` takes from the PNG's record, unless given on the command line (those the verb has).
FROM_PNG_ARGUMENTS = ("prompt", "negative", "steps", "sampler", "spacing", "sigma_ramp", "guidance",
                      "guidance_rescale", "seed", "height", "width", "n", "dtype", "prediction_type", "clip_skip",
                      "subseed", "subseed_strength", "strength", "keep_unmasked", "no_mask_decoder", "batch_size",
                      "deep_cache", "tome")

def find_recorded(name: str | None, accept=lambda path: path.exists()) -> str | None:
    """A file a PNG names (a model, LoRA or embedding), looked for here, in models/ and among the bundled models."""
    for candidate in ([] if not name else [Path(name), Path("models") / name, REPO_ROOT / "models" / name]):
        if accept(candidate):
            return str(candidate)
    return None


def recorded_file(entry: dict, png: str, flag: str) -> str:
    """A LoRA or embedding file a PNG was made with, found by its name (``find_recorded``), its sha256 checked."""
    found = find_recorded(entry["file"], lambda path: path.is_file() and entry.get("sha256") in
                           (None, file_sha256(path)))
    if found is None:
        raise ValueError(f"{png} was made with {entry['file']} (sha256 {entry.get('sha256')}), which is not here; "
                         f"give {flag} PATH")
    return found


def recorded_model(record: dict, png: str) -> str:
    """The model a PNG was made with, found by its file name (``find_recorded``)."""
    name = record.get("model_file") or record.get("model_name")
    found = find_recorded(name)
    if found is None:
        digest = record.get("model_sha256") or record.get("model_hash")
        raise ValueError(f"{png} was made with the model {name or '(not recorded)'}"
                         f"{f' (sha256 {digest})' if digest else ''}, which is not here; give --model PATH")
    return found


def _check_inputs(args: argparse.Namespace, recorded: dict[str, str]) -> None:
    """A warning for each input file given (init image, mask) that is not the one the PNG records."""
    for name, digest in recorded.items():
        path = getattr(args, name, None)
        if path and Path(path).is_file() and file_sha256(path) != digest:
            print(f"latentdiff: warning: {path} is not the {name} {args.from_png} was made from (its sha256 "
                  "differs)", file=sys.stderr)


def apply_png_parameters(args: argparse.Namespace) -> int | None:
    """--from-png: the PNG's parameters for every argument left at its default (those of the verb: a generate
    record's size does not apply to img2img); which image of its run it is. The PNG must be the same verb's."""
    record = read_png_parameters(args.from_png)
    if record.get("verb", args.command) != args.command:
        raise ValueError(f"{args.from_png} was made by `latentdiff {record['verb']}`; re-run it with `latentdiff "
                         f"{record['verb']} --from-png`")
    for name in FROM_PNG_ARGUMENTS:
        if record.get(name) is not None and hasattr(args, name) and getattr(args, name) == args.png_defaults[name]:
            setattr(args, name, record[name])
    _check_inputs(args, record.get("inputs") or {})
    if record.get("loras") and not getattr(args, "loras", None):
        args.loras = [(recorded_file(entry, args.from_png, "--lora"), entry["scale"]) for entry in record["loras"]]
    if record.get("embeddings") and not getattr(args, "embeddings", None):
        args.embeddings = [recorded_file(entry, args.from_png, "--embedding") for entry in record["embeddings"]]
    recorded_hash = record.get("model_sha256") or record.get("model_hash")  # ours, else A1111's short one
    if args.model is None:
        args.model = recorded_model(record, args.from_png)
    elif recorded_hash and Path(args.model).is_file() and not file_sha256(args.model).startswith(recorded_hash):
        print(f"latentdiff: warning: {args.model} is not the model {args.from_png} was made with (its sha256 is not "
              f"{recorded_hash})", file=sys.stderr)
    index = record.get("index")
    if index is not None and not 0 <= index < args.n:
        raise ValueError(f"{args.from_png}: image {index} of a run of {args.n} does not exist")
    return index


def add_from_png_option(p: argparse.ArgumentParser, inputs: str = "") -> None:
    p.add_argument("--from-png", metavar="FILE", default=None,
                   help="re-run the image FILE was made from (its latentdiff JSON chunk, else A1111's parameters "
                        f"text), byte for byte{inputs}; options given here override the recorded ones")
    p.set_defaults(png_defaults={name: p.get_default(name) for name in FROM_PNG_ARGUMENTS})


__all__ = ["FROM_PNG_ARGUMENTS", "add_from_png_option", "apply_png_parameters", "find_recorded", "recorded_file",
           "recorded_model"]
