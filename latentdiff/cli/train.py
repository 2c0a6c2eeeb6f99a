"""``latentdiff train``, ``export``, ``eval-autoencoder`` and ``eval-nll``: make models and measure them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from latentdiff.cli import args as checked
from latentdiff.config import load_config, merge, parse_overrides, read_yaml
from latentdiff.eval.autoencoder import evaluate_autoencoder
from latentdiff.eval.nll import evaluate_nll, parse_timesteps
from latentdiff.io.atomic import write_text
from latentdiff.io.checkpoint import export_model
from latentdiff.train import resolve_task


def _train(args: argparse.Namespace) -> None:
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
    schema, trainer = resolve_task(merge(data, parse_overrides(overrides)))
    experiment = load_config(schema, data, overrides)
    run_dir = trainer(experiment, resume=args.resume, overwrite=args.overwrite).run()
    print(f"run directory: {run_dir}")


def _print_results(results: dict, output: str | None) -> None:
    text = json.dumps(results, indent=2)
    print(text)
    if output:
        write_text(output, text + "\n")


def _eval_autoencoder(args: argparse.Namespace) -> None:
    results = evaluate_autoencoder(args.checkpoint, data=args.data, split=args.split, limit=args.limit,
                                   batch_size=args.batch_size, image_size=args.image_size,
                                   perceptual=args.perceptual, device=args.device, seed=args.seed)
    _print_results(results, args.output)


def _eval_nll(args: argparse.Namespace) -> None:
    results = evaluate_nll(args.checkpoint, data=args.data, split=args.split, limit=args.limit,
                           batch_size=args.batch_size, timesteps=parse_timesteps(args.timesteps), seed=args.seed,
                           device=args.device, ema=not args.no_ema)
    _print_results(results, args.output)


def _export(args: argparse.Namespace) -> None:
    settings = {} if args.guidance is None else {"sample_guidance": args.guidance}
    if args.guidance is not None and args.guidance < 0:
        raise ValueError(f"--guidance must be >= 0, got {args.guidance}")
    path = export_model(args.src, args.dst, args.dtype, settings, args.first_stage, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype})")


def _add_eval_parser(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], None],
                     limit: int, ema: bool, **texts: str) -> argparse.ArgumentParser:
    """An evaluation's parser with the options both take: which checkpoint, on which images, where to write the
    JSON; ``texts``: its help and description."""
    p = sub.add_parser(name, **texts)
    p.add_argument("checkpoint", help="model.safetensors, a checkpoint folder or a run folder")
    p.add_argument("--data", default=None, help="built-in dataset name or image folder (default: the training data)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=checked.non_negative_int, default=limit, help="number of images (0: all)")
    p.add_argument("--batch-size", type=checked.positive_int, default=64)
    p.add_argument("--seed", type=checked.seed, default=0)
    p.add_argument("--device", default="auto")
    if ema:
        p.add_argument("--no-ema", action="store_true", help="the raw training weights (from train_state.pt)")
    p.add_argument("-o", "--output", type=checked.file_output, help="also write the JSON here")
    p.set_defaults(func=func)
    return p


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train what CONFIG.yaml describes (task: autoencoder or diffusion)",
                       description="Train the model a YAML config describes. Any config field can be "
                                   "overridden as key.sub=value, e.g. train.steps=2000 model.ch=64.")
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in train.out_dir and start again (without it such a folder is refused)")
    p.set_defaults(func=_train)

    p = _add_eval_parser(sub, "eval-autoencoder", _eval_autoencoder, limit=2000, ema=False,
                         help="reconstruction metrics of a first-stage checkpoint",
                         description="PSNR, SSIM, perceptual distance, reconstruction Frechet distance on "
                                     "EfficientNet-Lite0 features, and for VQ models codebook usage/perplexity.")
    p.add_argument("--image-size", type=checked.positive_int, default=None, help="default: the training image size")
    p.add_argument("--perceptual", default="efficientnet", choices=["efficientnet", "lpips", "none"])

    p = _add_eval_parser(sub, "eval-nll", _eval_nll, limit=256, ema=True,
                         help="variational bound of a diffusion checkpoint in bits/dim",
                         description="The variational bound in bits per dimension on held-out images. For latent "
                                     "models it bounds the density of the scaled latents, not the pixels (compare "
                                     "only models on the same first stage); pixel-space models use the "
                                     "discretized decoder, comparable with published pixel bits/dim.")
    p.add_argument("--timesteps", default="all",
                   help="'all' (every term) or K random timesteps per image (unbiased, with a standard error)")

    p = sub.add_parser("export", help="write a trained model's sampling weights (no training state) to a folder",
                       description="Copy the weights a model samples with (the EMA weights the trainer saved) from "
                                   "a run folder, checkpoint folder or model.safetensors to DST/model.safetensors + "
                                   "config.json, optionally stored in float16 to halve the file. This is how the "
                                   "bundled models in models/ are made.")
    p.add_argument("src", metavar="SRC", help="a run folder (its latest checkpoint), checkpoint folder or file")
    p.add_argument("dst", metavar="DST", help="the output folder")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="storage dtype of the floating-point weights (loaded back as float32; default float32)")
    p.add_argument("--guidance", type=checked.non_negative_float, default=None,
                   help="the default guidance scale stored with the model (sample_guidance)")
    p.add_argument("--first-stage", metavar="AE", default=None,
                   help="take the decoder of this autoencoder run (fine-tuned with train_only: decoder; its encoder "
                        "must be the model's, which is checked)")
    p.add_argument("--overwrite", action="store_true", help="replace DST when it exists (as a whole)")
    p.set_defaults(func=_export)
