"""The ``latentdiff`` command: train models and evaluate them."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("latentdiff")

# Errors a user can cause and fix: reported in one line, without a traceback.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError, RuntimeError, KeyError,
                                                 ImportError)


def _train(args: argparse.Namespace) -> None:
    from latentdiff.config import load_config, merge, parse_overrides, read_yaml
    from latentdiff.train import resolve_task

    overrides = list(args.overrides)
    config_path = args.config
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)  # `latentdiff train --resume DIR key=value`
        config_path = None
    if config_path is None and args.resume is None:
        raise ValueError("give a CONFIG.yaml to train, or --resume RUN_DIR to continue a run")
    if config_path is not None:
        data = read_yaml(config_path)
    else:
        data = read_yaml(Path(args.resume) / "config.yaml")
    if args.resume is not None:
        data = merge(data, {"train": {"out_dir": str(args.resume)}})
    schema, train_fn = resolve_task(merge(data, parse_overrides(overrides)))
    experiment = load_config(schema, data, overrides)
    run_dir = train_fn(experiment, resume=args.resume)
    print(f"run directory: {run_dir}")


def _eval_autoencoder(args: argparse.Namespace) -> None:
    from latentdiff.eval.autoencoder import evaluate_autoencoder

    results = evaluate_autoencoder(args.checkpoint, data=args.data, split=args.split, limit=args.limit,
                                   batch_size=args.batch_size, image_size=args.image_size,
                                   perceptual=args.perceptual, device=args.device, seed=args.seed)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train what CONFIG.yaml describes (task: autoencoder)",
                       description="Train the model a YAML config describes. Any config field can be "
                                   "overridden as key.sub=value, e.g. train.steps=2000 model.ch=64.")
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval-autoencoder", help="reconstruction metrics of a first-stage checkpoint",
                       description="PSNR, SSIM, perceptual distance, reconstruction Frechet distance on "
                                   "EfficientNet-Lite0 features, and for VQ models codebook usage/perplexity.")
    p.add_argument("checkpoint", help="model.safetensors, a checkpoint folder or a run folder")
    p.add_argument("--data", default=None, help="built-in dataset name or image folder (default: the training data)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=2000, help="number of images (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="default: the training image size")
    p.add_argument("--perceptual", default="efficientnet", choices=["efficientnet", "lpips", "none"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", help="also write the JSON here")
    p.set_defaults(func=_eval_autoencoder)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
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


if __name__ == "__main__":
    sys.exit(main())
