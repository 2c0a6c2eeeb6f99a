"""``latentdiff generate --prompts FILE``: many prompts in one call, the model loaded once, one PNG per prompt line.

The file is either text, one prompt per line, or JSON Lines (a ``.jsonl`` / ``.ndjson`` file): one object per line
with a ``"prompt"`` and any of ``LINE_OPTIONS``, which override the command line's options for that line (a value
of ``null`` keeps the command line's). In both, blank lines and lines starting with ``#`` are skipped. Every line
inherits the rest of the command line (model, LoRAs, sampler, steps, seed, ...); a line without its own ``"seed"``
uses ``--seed``, so the prompts of a file are compared on the same noise.

Output names come from ``-o``:

- with ``{...}`` it is a pattern, formatted with ``index`` (the prompt's place among the file's prompt lines, from
  0), ``line`` (its line number) and ``seed``: ``-o out/{index:04d}.png``, ``-o "{line}-{seed}.png"``;
- a folder (one that exists, or a path ending in ``/`` or without a suffix): ``FOLDER/0000.png``, ``0001.png``, ...;
- a file name: ``NAME-0000.png``, ``NAME-0001.png``, ... beside it (the default ``out.png`` gives ``out-0000.png``).

With ``-n`` > 1 each line writes what one ``generate`` call writes: a grid, or with ``--separate`` one file per
image (``0000-0.png``, ``0000-1.png``, ...). Each PNG records its own line's parameters, so ``--from-png`` re-runs it.

Problems in the file itself (a line that is not JSON, an unknown key, a value of the wrong type, a bad sampler
name or number) are all reported, each with its line number, before the model is loaded, and nothing is generated.
A line that fails on the model (a size it cannot make, a prompt for a model without text) is reported with its
line number and skipped, nothing written for it; the other lines go on, and the command fails at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# The keys a JSON line may give: its name in the file -> (the generate option it overrides, the types it takes).
LINE_OPTIONS: dict[str, tuple[str, tuple[type, ...]]] = {
    "prompt": ("prompt", (str,)), "negative_prompt": ("negative", (str,)), "seed": ("seed", (int,)),
    "steps": ("steps", (int,)), "guidance": ("guidance", (int, float)),
    "guidance_rescale": ("guidance_rescale", (int, float)), "sampler": ("sampler", (str,)),
    "width": ("width", (int,)), "height": ("height", (int,)), "n": ("n", (int,)), "subseed": ("subseed", (int,)),
    "subseed_strength": ("subseed_strength", (int, float)), "spacing": ("spacing", (str,)),
    "deep_cache": ("deep_cache", (int,)), "tome": ("tome", (int, float)),
}


@dataclass(frozen=True)
class PromptLine:
    """One prompt line of the file: its line number, its place among the prompt lines (from 0) and the options it
    sets (generate's argument names)."""

    number: int
    index: int
    options: dict[str, Any]


def _json_options(text: str) -> dict[str, Any]:
    """A JSON line's options in generate's argument names; a ValueError naming the first problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"a line is a JSON object with a \"prompt\", got {type(data).__name__}")
    unknown = [key for key in data if key not in LINE_OPTIONS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(LINE_OPTIONS)})")
    if not isinstance(data.get("prompt"), str):
        raise ValueError("no \"prompt\" (a string)")
    options = {}
    for key, value in data.items():
        name, types = LINE_OPTIONS[key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"{key!r} must be {' or '.join(t.__name__ for t in types)}, got {json.dumps(value)}")
        options[name] = value
    return options


def read_prompts_file(path: str | Path) -> tuple[list[PromptLine], list[str]]:
    """(the prompt lines, a message "FILE:LINE: problem" for each line that cannot be read)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    lines, errors = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        index = len(lines) + len(errors)
        try:
            lines.append(PromptLine(number, index, _json_options(stripped) if jsonl else {"prompt": stripped}))
        except ValueError as e:
            errors.append(f"{path}:{number}: {e}")
    return lines, errors


def output_path(output: str, line: PromptLine, seed: int) -> Path:
    """The PNG a line writes, from ``-o`` (see the module docstring)."""
    if "{" in output:
        try:
            return Path(output.format(index=line.index, line=line.number, seed=seed))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"-o {output!r}: a pattern may use {{index}}, {{line}} and {{seed}} ({e})") from None
    out = Path(output)
    if out.is_dir() or output.endswith(("/", "\\")) or not out.suffix:
        return out / f"{line.index:04d}.png"
    return out.with_name(f"{out.stem}-{line.index:04d}{out.suffix}")


def _line_args(args: argparse.Namespace, line: PromptLine) -> argparse.Namespace:
    line_args = argparse.Namespace(**vars(args))
    for name, value in line.options.items():
        setattr(line_args, name, value)
    line_args.output = str(output_path(args.output, line, line_args.seed))
    return line_args


def _planned_lines(args: argparse.Namespace, check: Callable[[argparse.Namespace], None]
                   ) -> list[tuple[PromptLine, argparse.Namespace]]:
    """Every line with its arguments, checked by ``check`` (generate's checks that need no model); a ValueError
    after reporting each bad line on stderr."""
    lines, errors = read_prompts_file(args.prompts_file)
    planned = []
    for line in lines:
        try:
            line_args = _line_args(args, line)
            check(line_args)
            planned.append((line, line_args))
        except ValueError as e:
            errors.append(f"{args.prompts_file}:{line.number}: {e}")
    outputs = {}
    for line, line_args in planned:
        if line_args.output in outputs:
            errors.append(f"{args.prompts_file}:{line.number}: writes {line_args.output}, as line "
                          f"{outputs[line_args.output]} does; give -o a pattern with {{index}}")
        outputs.setdefault(line_args.output, line.number)
    if errors:
        for message in errors:
            print(f"latentdiff: {message}", file=sys.stderr)
        raise ValueError(f"{args.prompts_file}: {len(errors)} bad line{'s' if len(errors) > 1 else ''} (above); "
                         "nothing was generated")
    if not planned:
        raise ValueError(f"{args.prompts_file} holds no prompts (blank lines and # comments are skipped)")
    return planned


def run_prompts_file(args: argparse.Namespace, check: Callable[[argparse.Namespace], None],
                     load: Callable[[argparse.Namespace], Any],
                     render: Callable[[argparse.Namespace, Any], Any]) -> None:
    """Check every line (``check``), load the model once (``load``), then ``render`` each line's images; a line
    that fails on the model is reported with its number and skipped, and the call fails at the end."""
    if args.prompt:
        raise ValueError("give a prompt or --prompts FILE, not both")
    if getattr(args, "from_png", None):
        raise ValueError("--from-png re-runs one image; it does not combine with --prompts")
    check(args)
    planned = _planned_lines(args, check)
    pipe = load(args)
    failed = []
    for line, line_args in planned:
        try:
            render(line_args, pipe)
        except ValueError as e:
            print(f"latentdiff: {args.prompts_file}:{line.number}: {e}", file=sys.stderr)
            failed.append(line.number)
    if failed:
        raise ValueError(f"{len(failed)} of {len(planned)} lines of {args.prompts_file} failed (line"
                         f"{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))}); nothing was written for "
                         "them")


__all__ = ["LINE_OPTIONS", "PromptLine", "output_path", "read_prompts_file", "run_prompts_file"]
