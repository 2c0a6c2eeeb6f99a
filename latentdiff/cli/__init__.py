"""The ``latentdiff`` command: train models, sample from them and evaluate them.

One module per verb group, each with an ``add_parsers(sub)``: ``train`` (train, export, eval-autoencoder,
eval-nll), ``generate`` (generate, img2img, inpaint, seg2img, upscale, sample), ``convert``, ``data``
(make-shards) and ``info``.

Only the named verb's group is loaded (``VERB_GROUPS`` maps every verb to its module): ``latentdiff generate`` does
not import the trainers, torch.distributed's checkpointing or the evaluation code, which took about a second of
its start-up. ``latentdiff --help`` (or no verb, or an unknown one) loads every group to list them all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from latentdiff.cli.args import OneLineParser
from latentdiff.io.state import nonfinite_weights_allowed

# Errors a user can cause and fix: reported in one line, without a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, RuntimeError, KeyError,
                                                 ImportError)
# Verb group module (latentdiff.cli.<name>) -> the verbs its add_parsers defines (tests/test_cli_lazy.py checks it).
VERB_GROUPS: dict[str, tuple[str, ...]] = {
    "train": ("train", "eval-autoencoder", "eval-nll", "export"),
    "generate": ("sample", "generate", "img2img", "inpaint", "seg2img", "upscale"),
    "convert": ("convert",),
    "data": ("make-shards",),
    "info": ("info",),
}


def _groups_for(argv: Sequence[str] | None) -> list[str]:
    """The verb groups to load for ``argv``: the named verb's, or all of them (help, no verb, an unknown verb)."""
    verb = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    group = next((name for name, verbs in VERB_GROUPS.items() if verb in verbs), None)
    return [group] if group is not None else list(VERB_GROUPS)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``latentdiff`` parser with the verbs of ``argv``'s group (None: every verb)."""
    parser = OneLineParser(prog="latentdiff", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _groups_for(argv):
        importlib.import_module(f"latentdiff.cli.{name}").add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as e:
        if e.code == 2:  # a usage error, reported in one line (OneLineParser); --help exits as argparse does
            return 2
        raise
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        with nonfinite_weights_allowed(getattr(args, "allow_nonfinite", False)):
            args.func(args)
    except KeyboardInterrupt:
        print("latentdiff: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"latentdiff: error: {e}", file=sys.stderr)
        return 2
    return 0
