"""The ``latentdiff`` command: train models, sample from them and evaluate them."""

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


def _sample(args: argparse.Namespace) -> None:
    import math

    import torch

    from latentdiff.data.transforms import save_image_grid
    from latentdiff.device import select_device
    from latentdiff.diffusion.samplers import get_sampler
    from latentdiff.io.checkpoint import load_latent_diffusion

    get_sampler(args.sampler)  # an unknown name fails before the model loads
    if args.n < 1 or args.steps < 1:
        raise ValueError("-n and --steps must be at least 1")
    model = load_latent_diffusion(args.checkpoint, select_device(args.device), ema=not args.no_ema)
    classes = args.classes or []
    conditional = model.config.conditioning == "class"
    if classes and not conditional:
        raise ValueError("--class given, but this model is unconditional (conditioning: none)")
    if args.guidance != 1.0 and not conditional:
        raise ValueError("--guidance needs a class-conditional model; this one is unconditional")
    cond, nrow = None, args.nrow or math.ceil(math.sqrt(args.n))
    if conditional:
        k = model.config.num_classes
        bad = [c for c in classes if not 0 <= c < k]
        if bad:
            raise ValueError(f"--class {bad[0]} is out of range: this model has classes 0 to {k - 1}")
        # Without --class, one class per column; with several, they cycle over the images.
        labels = classes or list(range(k))
        cond = {"y": torch.tensor([labels[i % len(labels)] for i in range(args.n)])}
        if not classes and not args.nrow:
            nrow = min(args.n, k)
    images = model.sample(args.n, args.sampler, args.steps, torch.Generator().manual_seed(args.seed), cond=cond,
                          guidance_scale=args.guidance, karras=args.karras, disable_progress=False)
    path = save_image_grid(images.cpu(), args.output, nrow=nrow)
    print(f"wrote {args.n} samples to {path}")


def _eval_nll(args: argparse.Namespace) -> None:
    from latentdiff.eval.nll import evaluate_nll, parse_timesteps

    results = evaluate_nll(args.checkpoint, data=args.data, split=args.split, limit=args.limit,
                           batch_size=args.batch_size, timesteps=parse_timesteps(args.timesteps), seed=args.seed,
                           device=args.device, ema=not args.no_ema)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train what CONFIG.yaml describes (task: autoencoder or diffusion)",
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

    from latentdiff.diffusion.samplers import SAMPLERS

    sampler_names = ", ".join(SAMPLERS)
    p = sub.add_parser("sample", help="draw images from a diffusion checkpoint into a PNG grid",
                       description=f"Sample images from a diffusion checkpoint. Samplers: {sampler_names}. The "
                                   "same --seed gives the same images on any device.")
    p.add_argument("checkpoint", help="model.safetensors, a checkpoint folder or a run folder")
    p.add_argument("-n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of: {sampler_names} (default dpmpp_2m)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale for class models (1: none)")
    p.add_argument("--class", dest="classes", type=int, nargs="+", action="extend", metavar="C",
                   help="class label(s) for a class model, cycled over the images (default: one class per column)")
    p.add_argument("--karras", action="store_true", help="Karras et al. noise levels instead of the schedule's own")
    p.add_argument("--nrow", type=int, default=0, help="images per grid row (default: about sqrt(n))")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="the raw training weights (from train_state.pt)")
    p.add_argument("-o", "--output", default="samples.png", help="PNG to write (default samples.png)")
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval-nll", help="variational bound of a diffusion checkpoint in bits/dim",
                       description="The variational bound in bits per dimension on held-out images. For latent "
                                   "models it bounds the density of the scaled latents, not the pixels (compare "
                                   "only models on the same first stage); pixel-space models use the discretized "
                                   "decoder, comparable with published pixel bits/dim.")
    p.add_argument("checkpoint", help="model.safetensors, a checkpoint folder or a run folder")
    p.add_argument("--data", default=None, help="built-in dataset name or image folder (default: the training data)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=256, help="number of images (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--timesteps", default="all",
                   help="'all' (every term) or K random timesteps per image (unbiased, with a standard error)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="the raw training weights (from train_state.pt)")
    p.add_argument("-o", "--output", help="also write the JSON here")
    p.set_defaults(func=_eval_nll)
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
