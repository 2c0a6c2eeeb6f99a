"""The ``latentdiff`` command: train models, sample from them and evaluate them.

One module per verb group, each with an ``add_parsers(sub)``: ``train`` (train, export, eval-autoencoder,
eval-nll), ``generate`` (generate, img2img, inpaint, seg2img, upscale, sample), ``convert`` and ``info``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from latentdiff.cli import convert, data, generate, info, train
from latentdiff.cli.args import OneLineParser
from latentdiff.io.state import nonfinite_weights_allowed

# Errors a user can cause and fix: reported in one line, without a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, RuntimeError, KeyError,
                                                 ImportError)
VERB_GROUPS = (train, generate, convert, data, info)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="latentdiff", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in VERB_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
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
