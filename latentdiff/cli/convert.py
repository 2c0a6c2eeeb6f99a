"""``latentdiff convert``: Stable Diffusion weights between the original, diffusers and native formats."""

from __future__ import annotations

import argparse

import torch

from latentdiff.formats import convert, writable_formats

DTYPES = {"keep": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _convert(args: argparse.Namespace) -> None:
    out = convert(args.src, args.dst, args.to, ema=not args.no_ema, dtype=DTYPES[args.dtype],
                  text_encoder=not args.no_text_encoder, config=args.config, overwrite=args.overwrite)
    print(f"wrote {args.to} checkpoint: {out}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert Stable Diffusion weights between original, diffusers and native formats",
        description="Convert Stable Diffusion weights. Reads an original single file (.safetensors or .ckpt, "
                    "read without running code; a full model, a bare UNet or a bare VAE), a diffusers folder, or "
                    "a native checkpoint; writes any of them. The architecture is read from the weights, and "
                    "what they cannot tell from the original YAML beside a single file (or --config).")
    p.add_argument("src", help="single file, diffusers folder, or native checkpoint / run folder")
    p.add_argument("dst", help="a .safetensors file (original), a folder (diffusers) or a run folder (native)")
    p.add_argument("--to", required=True, choices=writable_formats(), help="output format")
    p.add_argument("--no-ema", action="store_true", help="take the raw UNet weights even when EMA weights exist")
    p.add_argument("--dtype", default="keep", choices=list(DTYPES), help="cast the weights (default: keep)")
    p.add_argument("--no-text-encoder", action="store_true", help="leave the text encoder out")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="the original YAML of a single file (heads, text encoder, v-prediction; default: SRC's stem "
                        "with .yaml, if it exists, else guessed by SD's conventions)")
    p.add_argument("--overwrite", action="store_true", help="replace DST when it exists (as a whole)")
    p.set_defaults(func=_convert)
