"""``latentdiff info MODEL``: what a checkpoint is, without generating anything.

Format (native, single file, diffusers), kind (Stable Diffusion v1/v2, inpainting; for a model trained here, its
task and the verb that runs it), architecture (UNet channels per level, attention, context width; first stage type,
factor and latent channels), parameters per component, size on disk, sha256 and A1111's short hash (of a single file,
or a native folder's weights file), what it conditions on (its embedders), the defaults a generating verb uses
(sampler, steps, guidance, image size) and its tokenizer; for the own word tokenizer the vocabulary (the first 40
words; ``--vocab`` all). ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path
from typing import Any

from safetensors import safe_open

from latentdiff.formats import StableDiffusionComponents, detect_format, read_components
from latentdiff.formats.components import UNET_PREFIX, VAE_PREFIX
from latentdiff.io.checkpoint import read_native_config, resolve_checkpoint
from latentdiff.io.files import file_sha256
from latentdiff.pipelines import StableDiffusionPipeline
from latentdiff.pipelines.metadata import SHORT_HASH_DIGITS
from latentdiff.pipelines.native import DEFAULT_GUIDANCE, is_native_diffusion_config

FORMAT_NAMES = {"native": "native latentdiff checkpoint", "component": "diffusers component (config.json + weights)",
                "original": "single file (original Stable Diffusion layout)", "diffusers": "diffusers folder",
                "ckpt": "single file (pickled .ckpt, read with weights_only)"}
VOCAB_SHOWN = 40  # words listed without --vocab
# What a native model's conditioning inputs are, and the verb that runs it.
_NATIVE_TASKS = (("class_map", "semantic synthesis (class map to image)", "seg2img"),
                 ("lowres", "super-resolution", "upscale"), ("inpaint", "inpainting", "inpaint"),
                 ("caption", "text-to-image", "generate"))


def _size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _count(weights: dict[str, Any] | None) -> int:
    return sum(t.numel() for t in (weights or {}).values())


def _native_parameters(file: Path) -> dict[str, int]:
    """Parameters per component of a native file, from its header (shapes only)."""
    parts = {"unet": UNET_PREFIX, "first_stage": VAE_PREFIX, "conditioner": "cond_stage_model."}
    counts = dict.fromkeys(parts, 0)
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            part = next((name for name, prefix in parts.items() if key.startswith(prefix)), None)
            if part is not None:
                counts[part] += math.prod(f.get_slice(key).get_shape())
    return {name: count for name, count in counts.items() if count}


def _architecture(comps: StableDiffusionComponents) -> dict[str, Any]:
    arch: dict[str, Any] = {}
    if comps.unet_config is not None:
        c = comps.unet_config
        arch["unet"] = {
            "in_channels": c.in_channels, "out_channels": c.out_channels,
            "channels": [c.model_channels * m for m in c.channel_mult], "levels": len(c.channel_mult),
            "res_blocks": c.num_res_blocks, "attention_at": sorted(c.attention_resolutions),
            "heads": c.num_heads if c.num_head_channels == -1 else f"{c.num_head_channels} channels each",
            "context_dim": c.context_dim, "transformer_depth": c.transformer_depth, "num_classes": c.num_classes}
    if comps.vae_config is not None:
        v = comps.vae_config
        arch["first_stage"] = {"type": v.regularizer.upper(), "factor": v.downsample_factor,
                               "latent_channels": v.embed_dim, "scale_factor": comps.scale_factor,
                               "mask_decoder": bool(getattr(v, "mask_decoder", False))}
    if comps.schedule is not None:
        arch["schedule"] = {"kind": comps.schedule.kind, "timesteps": comps.schedule.num_timesteps}
    if comps.unet_config is not None:
        arch["prediction_type"] = comps.prediction_type
    return arch


def _native_kind(comps: StableDiffusionComponents, config: dict[str, Any]) -> dict[str, Any]:
    """Task, verb, embedders, defaults and vocabulary of a model trained here."""
    cond = comps.conditioner
    embedders = [] if cond is None else [{"name": e.name, "kind": e.kind, "output": type(e).output,
                                          "dropout": e.dropout} for e in cond.embedders]
    keys = {e["name"] for e in embedders} | {e["kind"] for e in embedders}
    task, verb = next(((t, v) for key, t, v in _NATIVE_TASKS if key in keys),
                      ("class-conditional", "sample --class") if comps.unet_config.num_classes else
                      ("unconditional", "sample"))
    info: dict[str, Any] = {"kind": f"latentdiff model trained here: {task}", "verb": verb, "embedders": embedders,
                            "default_guidance": float(config.get("sample_guidance", DEFAULT_GUIDANCE))
                            if embedders or comps.unet_config.num_classes else 1.0}
    text = next((e for e in (cond.embedders if cond else []) if e.kind == "transformer"), None)
    if text is not None:
        info["tokenizer"] = {"kind": "word (latentdiff.conditioning.text.WordTokenizer)",
                             "size": len(text.text.vocab), "max_length": text.text.max_length,
                             "words": list(text.text.vocab)}
    return info


def _sd_kind(comps: StableDiffusionComponents) -> dict[str, Any]:
    """Version, embedders, defaults and tokenizer of a Stable Diffusion model."""
    c, latent = comps.unet_config, comps.vae_config.embed_dim if comps.vae_config else 4
    version = "v2" if c.use_linear_in_transformer or comps.text_encoder_layout == "openclip" else "v1"
    inpainting = c.in_channels == 2 * latent + 1
    embedders = []
    if comps.text_encoder is not None:
        layers = comps.text_encoder_config.get("num_hidden_layers") if comps.text_encoder_config else None
        embedders.append({"name": "caption", "kind": f"clip ({comps.text_encoder_layout} layout, "
                          f"{comps.text_encoder_output_layer} layer{f' of {layers}' if layers else ''})",
                          "output": "crossattn", "dropout": None})
    if inpainting:
        embedders.append({"name": "image", "kind": "mask + masked-image latent", "output": "concat", "dropout": None})
    info: dict[str, Any] = {"kind": f"Stable Diffusion {version}{' inpainting' if inpainting else ''}",
                            "verb": "inpaint" if inpainting else "generate", "embedders": embedders,
                            "default_guidance": StableDiffusionPipeline.default_guidance}
    if comps.text_encoder is not None:
        vocab = (comps.text_encoder_config or {}).get("vocab_size")
        info["tokenizer"] = {"kind": "CLIP BPE", "size": vocab or 49408}
    return info


def model_info(path: str | Path) -> dict[str, Any]:
    """Everything ``latentdiff info`` prints about the checkpoint at ``path``, JSON-serialisable."""
    path = Path(path)
    file_format = detect_format(path)
    comps = read_components(path, file_format)
    config = read_native_config(path) if file_format == "native" else None
    info: dict[str, Any] = {"path": str(path), "format": file_format, "format_name": FORMAT_NAMES.get(file_format,
                                                                                                       file_format),
                            "size_bytes": _size_on_disk(path)}
    hashed = resolve_checkpoint(path) if file_format == "native" else path
    if hashed.is_file():
        digest = file_sha256(hashed)
        info.update(hashed_file=hashed.name, sha256=digest, short_hash=digest[:SHORT_HASH_DIGITS])
    if comps.unet is None:
        info.update(kind="autoencoder only (a first stage, no UNet)", verb=None, embedders=[])
    elif is_native_diffusion_config(config):
        info.update(_native_kind(comps, config))
    else:
        info.update(_sd_kind(comps))
    info["architecture"] = _architecture(comps)
    if file_format == "native" and comps.unet is not None:  # the conditioner's weights are not among comps'
        info["parameters"] = _native_parameters(hashed)
    else:
        info["parameters"] = {name: _count(part) for name, part in (
            ("unet", comps.unet), ("first_stage", comps.vae), ("text_encoder", comps.text_encoder)) if part}
    if comps.unet is not None:
        defaults = inspect.signature(StableDiffusionPipeline.text_to_image).parameters
        size = comps.image_size or (768 if comps.prediction_type == "v_prediction" else 512)
        info["defaults"] = {"sampler": defaults["sampler"].default, "steps": defaults["steps"].default,
                            "guidance": info.pop("default_guidance"), "image_size": size}
    return info


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else str(count)


def format_info(info: dict[str, Any], all_words: bool = False) -> str:
    """``model_info``'s answer as the lines ``latentdiff info`` prints."""
    lines = [f"{info['path']}", f"  format:       {info['format_name']} ({info['format']})",
             f"  kind:         {info['kind']}" + (f"; run it with `latentdiff {info['verb']}`" if info['verb'] else ""),
             f"  size on disk: {info['size_bytes'] / 1e6:.2f} MB ({info['size_bytes']} bytes)"]
    if "sha256" in info:
        lines.append(f"  sha256:       {info['sha256']} ({info['hashed_file']}; A1111 hash {info['short_hash']})")
    arch = info["architecture"]
    if "unet" in arch:
        u = arch["unet"]
        lines.append(f"  UNet:         {u['in_channels']} -> {u['out_channels']} channels, {u['levels']} levels of "
                     f"{'/'.join(map(str, u['channels']))} channels, {u['res_blocks']} res blocks each, attention at "
                     f"downsampling {u['attention_at']}, heads {u['heads']}, context {u['context_dim']}")
    if "first_stage" in arch:
        f = arch["first_stage"]
        lines.append(f"  first stage:  {f['type']}, factor {f['factor']}, {f['latent_channels']} latent channels, "
                     f"scale {f['scale_factor']:g}{', mask-conditioned decoder' if f['mask_decoder'] else ''}")
    if "prediction_type" in arch:
        schedule = arch.get("schedule")
        lines.append(f"  predicts:     {arch['prediction_type']}" + (
            f" ({schedule['kind']} schedule, {schedule['timesteps']} steps)" if schedule else ""))
    lines.append("  parameters:   " + ", ".join(f"{name} {_millions(n)}" for name, n in info["parameters"].items()))
    conditions = [f"{e['name']} ({e['kind']}, {e['output']}" + (f", dropout {e['dropout']:g})" if e["dropout"]
                                                                 is not None else ")") for e in info["embedders"]]
    lines.append(f"  conditions:   {', '.join(conditions) or 'nothing (unconditional)'}")
    if "defaults" in info:
        d = info["defaults"]
        lines.append(f"  defaults:     sampler {d['sampler']}, {d['steps']} steps, guidance {d['guidance']:g}, "
                     f"{d['image_size']}x{d['image_size']} pixels")
    tokenizer = info.get("tokenizer")
    if tokenizer:
        lines.append(f"  tokenizer:    {tokenizer['kind']}, {tokenizer['size']} "
                     f"{'words' if 'words' in tokenizer else 'tokens'}")
        words = tokenizer.get("words")
        if words:
            shown = words if all_words else words[:VOCAB_SHOWN]
            more = "" if len(shown) == len(words) else f" ... (+{len(words) - len(shown)}; --vocab lists all)"
            lines.append(f"  vocabulary:   {' '.join(shown)}{more}")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> None:
    info = model_info(args.model)
    if args.json:
        if not args.vocab and "words" in info.get("tokenizer", {}):
            info["tokenizer"]["words"] = info["tokenizer"]["words"][:VOCAB_SHOWN]
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info, all_words=args.vocab))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what a checkpoint is: format, kind, architecture, size, hashes, conditioning",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("model", metavar="MODEL", help="a native run folder, checkpoint folder or model.safetensors, a "
                                                  "Stable Diffusion single file or a diffusers folder")
    p.add_argument("--vocab", action="store_true", help="list every word of the own word tokenizer's vocabulary")
    p.add_argument("--json", action="store_true", help="one JSON object (with --vocab: all words)")
    p.set_defaults(func=_info)


__all__ = ["format_info", "model_info"]
