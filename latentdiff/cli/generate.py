"""``latentdiff generate``, ``img2img``, ``inpaint``, ``seg2img``, ``upscale`` and ``sample``: the verbs that make
images, on a native model (the bundled ones by default) or on Stable Diffusion weights."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from PIL import Image

from latentdiff.cli import args as checked
from latentdiff.cli.from_png import add_from_png_option, apply_png_parameters
from latentdiff.cli.prompts import run_prompts_file
from latentdiff.data.transforms import make_grid
from latentdiff.device import select_device
from latentdiff.diffusion.noise_levels import SPACINGS
from latentdiff.diffusion.samplers import SAMPLER_ALIASES, SAMPLERS, get_sampler, resolve_sampler
from latentdiff.formats.native import load_latent_diffusion
from latentdiff.io.files import file_sha256
from latentdiff.pipelines import LatentDiffusionPipeline, load_pipeline
from latentdiff.pipelines.images import (
    image_file_size,
    read_class_map,
    resize_to_multiple,
    to_image_tensor,
    to_pil_images,
)
from latentdiff.pipelines.metadata import (
    image_records,
    input_hashes,
    model_identity,
    save_png,
)
from latentdiff.pipelines.native import warn_unknown_words
from latentdiff.pipelines.variation import variation_of

# The models the task verbs use without --model: the bundled models in models/ (native runs of
# configs/ldm-<name>.yaml, exported; <name> is the folder's name).
DEFAULT_MODEL = "models/scenes-txt2img"
DEFAULT_MODELS = {"generate": DEFAULT_MODEL, "img2img": DEFAULT_MODEL, "inpaint": DEFAULT_MODEL,
                  "seg2img": "models/scenes-seg2img", "upscale": "models/scenes-upscale"}
_REPO_ROOT = Path(__file__).resolve().parents[2]
# The options besides the shared ones that change a verb's image, recorded with it.
_VERB_OPTIONS = ("strength", "keep_unmasked", "no_mask_decoder", "spacing", "sigma_ramp", "dtype", "prediction_type")


def _sample(args: argparse.Namespace) -> None:
    get_sampler(args.sampler)  # an unknown name fails before the model loads
    if args.n < 1 or args.steps < 1:
        raise ValueError("-n and --steps must be at least 1")
    model = load_latent_diffusion(args.checkpoint, select_device(args.device), ema=not args.no_ema)
    model.requires_grad_(False)  # sampling only: frozen weights are the ones the oneDNN kernels pack once
    mode, conditioner = model.config.conditioning, model.config.conditioner
    classes, prompts = args.classes or [], args.prompts or []
    has_text = conditioner is not None and conditioner.text_encoder != "none"
    num_classes = conditioner.num_classes if conditioner is not None else model.config.num_classes
    if classes and not num_classes:
        kind = "unconditional" if mode == "none" else "not class-conditional"
        raise ValueError(f"--class given, but this model is {kind} (conditioning: {mode})")
    if (prompts or args.negative is not None) and not has_text:
        raise ValueError(f"--prompt/--negative given, but this model has no text conditioning (conditioning: {mode}); "
                         "leave them out")
    if args.guidance != 1.0 and not (num_classes or prompts or args.negative is not None):
        if mode == "none":
            raise ValueError("--guidance needs a class-conditional model; this one is unconditional")
        if has_text:
            raise ValueError("--guidance needs --prompt (or --negative) with a text model")
        raise ValueError(f"--guidance: `sample` gives this model (conditioning: {mode} on "
                         f"{', '.join(conditioner.inputs)}) none of its inputs; use seg2img, upscale or inpaint")
    cond: dict = {}
    uncond = {"caption": args.negative} if args.negative is not None else None
    nrow = args.nrow or math.ceil(math.sqrt(args.n))
    if num_classes:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"--class {bad[0]} is out of range: this model has classes 0 to {num_classes - 1}")
        # Without --class (and without a prompt), one class per column; with several, they cycle over the images.
        labels = classes or ([] if prompts else list(range(num_classes)))
        if labels:
            cond["y" if mode == "class" else "label"] = torch.tensor([labels[i % len(labels)] for i in range(args.n)])
            if not classes and not args.nrow:
                nrow = min(args.n, num_classes)
    if prompts:
        # Several prompts cycle over the images: one prompt per column.
        cond["caption"] = [prompts[i % len(prompts)] for i in range(args.n)]
        if len(prompts) > 1 and not args.nrow:
            nrow = min(args.n, len(prompts))
    warn_unknown_words(model, [*prompts, args.negative])
    generator, batches = torch.Generator().manual_seed(args.seed), []
    for start in range(0, args.n, args.batch_size):  # at most --batch-size at once, from the one seed's stream
        part = {key: value[start:start + args.batch_size] for key, value in cond.items()}
        batches.append(model.sample(min(args.batch_size, args.n - start), args.sampler, args.steps, generator,
                                    cond=part or None, uncond=uncond, guidance_scale=args.guidance,
                                    karras=args.karras, disable_progress=False).cpu())
    images = torch.cat(batches)
    record = None if args.no_metadata else {
        "verb": "sample", "prompt": "\n".join(prompts), "prompts": prompts, "classes": classes,
        "negative": args.negative, "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
        "seed": args.seed, "width": images.shape[-1], "height": images.shape[-2], "n": args.n, "nrow": nrow,
        "sigma_ramp": "karras" if args.karras else None, "no_ema": args.no_ema, "index": None,
        **({"batch_size": args.batch_size} if args.n > args.batch_size else {}), **model_identity(args.checkpoint)}
    path = save_png(_grid_image(images.cpu(), nrow), args.output, record)
    print(f"wrote {args.n} samples to {path}")


def _grid_image(images, nrow: int) -> Image.Image:
    """``images`` in [-1, 1] tiled ``nrow`` to a row, as a PIL image (greyscale or RGB)."""
    grid = make_grid(images, nrow=nrow)
    return Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)


def _pipeline_options(args: argparse.Namespace) -> dict:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    options = {"device": select_device(args.device), "dtype": dtypes[getattr(args, "dtype", "fp32")],
               "attention_slice": args.attention_slice or None, "vae_tile": getattr(args, "vae_tile", None) or None}
    if getattr(args, "prediction_type", None):
        options["prediction_type"] = args.prediction_type
    if getattr(args, "config", None):
        options["config"] = args.config
    options.update({key: getattr(args, key) for key in ("loras", "embeddings") if getattr(args, key, None)})
    return options


def _model_path(args: argparse.Namespace) -> str:
    """--model, else the verb's bundled model (models/...), looked for here and in the source tree."""
    if args.model is not None:
        return args.model
    default = DEFAULT_MODELS[args.command]
    for candidate in (Path(default), _REPO_ROOT / default):
        if candidate.exists():
            return str(candidate)
    name = Path(default).name
    raise ValueError(f"no --model given, and the bundled model {default} is missing (it ships in the source tree's "
                     f"models/, which an install from a wheel does not have): give --model PATH, or train it with "
                     f"`latentdiff train configs/ldm-{name}.yaml` (after configs/kl-f4-scenes.yaml, its first "
                     f"stage) and pass --model runs/ldm-{name}")


def _check_generation_args(args: argparse.Namespace) -> None:
    """Checks that need no model: they fail before a large checkpoint is read."""
    get_sampler(args.sampler)
    checked.check_image_output(args)
    checked.recheck_numbers(args)  # values a PNG's record or a --prompts line set did not pass argparse's types
    if getattr(args, "vae_tile", None) and args.vae_tile < 4:
        raise ValueError("--vae-tile is in latent pixels and must be at least 4")
    variation_of(args.subseed, args.subseed_strength)
    args.model = _model_path(args)


def _load_for_generation(args: argparse.Namespace, native_only: str | None = None):
    """The pipeline for --model, checked against the prompt; ``native_only`` names a verb that runs only on models
    trained here."""
    pipe = load_pipeline(args.model, **_pipeline_options(args))
    native = isinstance(pipe, LatentDiffusionPipeline)
    if native_only and not native:
        raise ValueError(f"{native_only} runs on latentdiff models (run folders of `latentdiff train`); {args.model} "
                         "is a Stable Diffusion model")
    why = pipe.describe_conditioning() if native else "its UNet has no cross-attention"
    if args.prompt and not pipe.has_text_conditioning:
        raise ValueError(f"{args.model} has no text conditioning ({why}); leave out the prompt")
    if args.negative and not pipe.has_text_conditioning:
        raise ValueError(f"{args.model} has no text conditioning ({why}); --negative does not apply")
    _set_clip_skip(args, pipe)
    return pipe


def _set_clip_skip(args: argparse.Namespace, pipe) -> None:
    """--clip-skip on a Stable Diffusion model's text encoder; a native model's own text encoder has no such choice."""
    clip_skip = getattr(args, "clip_skip", None)
    if clip_skip is None:
        return
    if isinstance(pipe, LatentDiffusionPipeline) or not pipe.has_text_conditioning:
        raise ValueError(f"--clip-skip applies to Stable Diffusion models with a CLIP text encoder; {args.model} "
                         "has none")
    pipe.clip_skip = clip_skip


def _guidance(args: argparse.Namespace, pipe) -> float:
    return pipe.default_guidance if args.guidance is None else args.guidance


def _read_image(path: str, multiple: int, what: str, mask: bool = False):
    """An image file as a (1, C, H, W) tensor in [0, 1], resized down to sides that are multiples of ``multiple``
    (with a note on stderr) when they are not."""
    image = to_image_tensor(path, channels=1 if mask else 3)
    resized = resize_to_multiple(image, multiple, resample="nearest" if mask else "bicubic")
    if resized.shape != image.shape:
        print(f"latentdiff: note: resized {what} {path} from {image.shape[-1]}x{image.shape[-2]} to "
              f"{resized.shape[-1]}x{resized.shape[-2]} (sides must be multiples of {multiple} for this model)",
              file=sys.stderr)
    return resized


def _read_input(pipe, path: str, what: str, mask: bool = False):
    """An input image for ``pipe``: resized to fit a Stable Diffusion model (with a note); as it is for a native
    model, which checks it against its one training size."""
    if isinstance(pipe, LatentDiffusionPipeline):
        checked.check_native_size(pipe, *image_file_size(path, what), what)  # from the header, before decoding
        return to_image_tensor(path, channels=1 if mask else pipe.image_channels)
    return _read_image(path, pipe.size_multiple, what, mask=mask)


def _save_images(images, output: str, separate: bool, record: dict | None = None,
                 pick: int | None = None) -> list[Path]:
    """Write the images (one file, ``--separate`` files or a grid; ``pick``: only that image, for ``--from-png`` of
    one ``--separate`` file), each carrying its own ``record`` of parameters unless it is None (--no-metadata)."""
    out = Path(output)
    if pick is not None:
        return [save_png(to_pil_images(images[pick:pick + 1])[0], out, None if record is None else
                         dict(record, index=pick))]
    count = images.shape[0]
    records = [None] * count if record is None else image_records(record, count, separate)
    if count == 1 or separate:
        paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]
        return [save_png(image, path, rec) for image, path, rec in zip(to_pil_images(images), paths, records,
                                                                       strict=True)]
    return [save_png(_grid_image(images * 2 - 1, math.ceil(math.sqrt(count))), out, records[0])]


def _generation_record(args: argparse.Namespace, pipe, images, inputs: dict[str, str | None]) -> dict | None:
    """Every argument a re-run needs (the PNG's ``latentdiff`` chunk), or None with --no-metadata."""
    if args.no_metadata:
        return None
    record = {"verb": args.command, "prompt": args.prompt, "negative": args.negative, "steps": args.steps,
              "sampler": args.sampler, "guidance": _guidance(args, pipe), "guidance_rescale": args.guidance_rescale,
              "seed": args.seed, "width": images.shape[-1], "height": images.shape[-2], "n": args.n,
              "inputs": input_hashes(inputs), **model_identity(args.model)}
    record.update({name: getattr(args, name) for name in _VERB_OPTIONS if hasattr(args, name)})
    if getattr(args, "deep_cache", None):  # an approximation: recorded only when used
        record["deep_cache"] = args.deep_cache
    if getattr(args, "tome", None):  # token merging, an approximation too: recorded only when used
        record["tome"] = args.tome
    if args.n > args.batch_size:  # recorded only when it splits the run: the later batches depend on it
        record["batch_size"] = args.batch_size
    if getattr(args, "clip_skip", None) is not None:  # recorded only when given, as LoRAs and embeddings
        record["clip_skip"] = args.clip_skip
    if variation_of(args.subseed, args.subseed_strength):  # A1111 writes a variation only when there is one
        record.update(subseed=args.subseed, subseed_strength=args.subseed_strength)
    if getattr(args, "loras", None):
        record["loras"] = [{"file": Path(path).name, "scale": scale, "sha256": file_sha256(path)}
                           for path, scale in args.loras]
    if getattr(args, "embeddings", None):
        record["embeddings"] = [{"file": Path(path).name, "sha256": file_sha256(path)} for path in args.embeddings]
    return record


def _report(paths: list[Path], n: int) -> None:
    where = paths[0] if len(paths) == 1 else f"{paths[0]} ... {paths[-1]}"
    print(f"wrote {n} image{'s' if n > 1 else ''} to {where}")


def _common(args: argparse.Namespace, pipe) -> dict:
    """The sampling options every task takes, and the noise-level options of a Stable Diffusion model."""
    common = {"num_images": args.n, "steps": args.steps, "sampler": args.sampler,
              "guidance_scale": _guidance(args, pipe), "generator": args.seed, "progress": True,
              "variation": variation_of(args.subseed, args.subseed_strength)}
    if args.guidance_rescale:
        # CFG rescale is an option of the sampling core (``sampling.denoise``), reached through sampler_options.
        common["sampler_options"] = {"guidance_rescale": args.guidance_rescale}
    if args.deep_cache:  # the pipelines run the sampling inside latentdiff.diffusion.deepcache.deep_cache
        common.setdefault("sampler_options", {})["deep_cache"] = args.deep_cache
    if args.tome:  # and inside latentdiff.diffusion.tome.token_merging
        common.setdefault("sampler_options", {})["tome"] = args.tome
    levels = {"spacing": getattr(args, "spacing", None), "sigma_ramp": getattr(args, "sigma_ramp", None)}
    if any(levels.values()) or resolve_sampler(args.sampler)[1]:
        if isinstance(pipe, LatentDiffusionPipeline):
            raise ValueError("--spacing, --karras, --exponential and Karras sampler names apply to Stable Diffusion "
                             "models; a model trained here samples its own schedule (trailing)")
        common.update(levels)
    return common


def _generate(args: argparse.Namespace) -> None:
    if args.prompts_file:  # many prompts, the model loaded once (latentdiff.cli.prompts)
        run_prompts_file(args, _check_generation_args, _load_for_generation, _text_to_image)
        return
    pick = apply_png_parameters(args) if args.from_png else None
    _check_generation_args(args)
    _text_to_image(args, _load_for_generation(args), pick)


def _text_to_image(args: argparse.Namespace, pipe, pick: int | None = None) -> None:
    checked.check_requested_size(pipe, args.width, args.height, isinstance(pipe, LatentDiffusionPipeline))
    run = checked.in_batches(args.batch_size, pipe.text_to_image)
    result = run(args.prompt, args.negative, height=args.height, width=args.width, **_common(args, pipe))
    record = _generation_record(args, pipe, result.images, {})
    _report(_save_images(result.images, args.output, args.separate and pick is None, record, pick),
            1 if pick is not None else args.n)


def _img2img(args: argparse.Namespace) -> None:
    pick = apply_png_parameters(args) if args.from_png else None
    _check_generation_args(args)
    image_file_size(args.init, "init image")  # a missing, unreadable or huge file fails before the model loads
    pipe = _load_for_generation(args)
    image = _read_input(pipe, args.init, "init image")
    run = checked.in_batches(args.batch_size, pipe.image_to_image)
    result = run(image, args.prompt, args.negative, strength=args.strength, **_common(args, pipe))
    record = _generation_record(args, pipe, result.images, {"init": args.init})
    _report(_save_images(result.images, args.output, args.separate and pick is None, record, pick),
            1 if pick is not None else args.n)


def _inpaint(args: argparse.Namespace) -> None:
    pick = apply_png_parameters(args) if args.from_png else None
    _check_generation_args(args)
    image, mask = image_file_size(args.image), image_file_size(args.mask, "mask")  # headers: nothing decoded yet
    if image != mask:
        raise ValueError(f"the mask {args.mask} is {mask[0]}x{mask[1]} but the image {args.image} is "
                         f"{image[0]}x{image[1]}; they must be the same size")
    pipe = _load_for_generation(args)
    image = _read_input(pipe, args.image, "image")
    mask = _read_input(pipe, args.mask, "mask", mask=True)
    extra = {"mask_decoder": False} if args.no_mask_decoder and getattr(pipe, "has_mask_decoder", False) else {}
    run = checked.in_batches(args.batch_size, pipe.inpaint)
    result = run(image, mask, args.prompt, args.negative, strength=args.strength,
                 keep_unmasked=args.keep_unmasked, **extra, **_common(args, pipe))
    record = _generation_record(args, pipe, result.images, {"image": args.image, "mask": args.mask})
    _report(_save_images(result.images, args.output, args.separate and pick is None, record, pick),
            1 if pick is not None else args.n)


def _seg2img(args: argparse.Namespace) -> None:
    _check_generation_args(args)
    class_map = read_class_map(args.map)  # a missing or non-index image fails before the model loads
    pipe = _load_for_generation(args, native_only="seg2img")
    run = checked.in_batches(args.batch_size, pipe.segmentation_to_image)
    result = run(class_map, args.prompt, args.negative, **_common(args, pipe))
    record = _generation_record(args, pipe, result.images, {"map": args.map})
    _report(_save_images(result.images, args.output, args.separate, record), args.n)


def _upscale(args: argparse.Namespace) -> None:
    _check_generation_args(args)
    image_file_size(args.lowres, "low-res image")
    pipe = _load_for_generation(args, native_only="upscale")
    lowres = _read_input(pipe, args.lowres, "low-res image")
    run = checked.in_batches(args.batch_size, pipe.upscale)  # -n images, --batch-size at a time
    result = run(lowres, args.prompt, args.negative, **_common(args, pipe))
    record = _generation_record(args, pipe, result.images, {"lowres": args.lowres})
    _report(_save_images(result.images, args.output, args.separate, record), args.n)


def _lora_argument(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (FILE, SCALE), the scale 1 when none is given (the last colon: paths may hold one)."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def _add_lora_and_embedding_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", dest="loras", action="append", type=_lora_argument, metavar="FILE[:SCALE]",
                   help="a LoRA file (kohya/A1111 or diffusers/PEFT .safetensors) fused into the model at SCALE "
                        "(default 1); repeat for several")
    p.add_argument("--embedding", dest="embeddings", action="append", metavar="FILE",
                   help="a textual-inversion embedding (A1111 .pt/.safetensors, whose file name is the word to use "
                        "in the prompt, or diffusers' learned_embeds.safetensors); repeat for several")


def _add_generation_options(p: argparse.ArgumentParser, sampler_names: str, size: bool = True,
                            stable_diffusion: bool = True) -> None:
    verb = p.prog.split()[-1]
    p.add_argument("-n", type=checked.image_count, default=1,
                   help="images per prompt (default 1; several are written as a grid)")
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt (default: the empty prompt)")
    p.add_argument("--guidance", type=checked.non_negative_float, default=None,
                   help="classifier-free guidance scale (1: off; default 7.5 for Stable Diffusion, and a native "
                        "model's sample_guidance from its training config)")
    p.add_argument("--guidance-rescale", type=checked.probability, default=0.0, metavar="PHI",
                   help="CFG rescale (Lin et al. 2023) in [0, 1]: match the guided prediction's spread to the "
                        "conditional one's, as diffusers' guidance_rescale (0.7 in the paper; default 0: off)")
    p.add_argument("--steps", type=checked.step_count, default=25, help="sampler steps (default 25)")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of: {sampler_names} (default dpmpp_2m)")
    p.add_argument("--deep-cache", type=checked.positive_int, default=None, metavar="N",
                   help="DeepCache: run the whole UNet every N-th step and only its outermost blocks in between, "
                        "on the deep features kept from the last full step (faster, approximate; N=3 is "
                        "DeepCache's usual setting; default: off, the exact model)")
    p.add_argument("--tome", type=checked.tome_ratio, default=None, metavar="RATIO",
                   help="token merging (ToMe for SD): merge RATIO of the tokens of the highest-resolution "
                        "transformers into similar ones around their self-attention, in [0, 1) (faster, "
                        "approximate; 0.5 is tomesd's default; default: off, the exact model)")
    p.add_argument("--seed", type=checked.seed, default=0,
                   help="the same seed gives the same image on any device (default 0)")
    p.add_argument("--subseed", type=checked.seed, default=None, metavar="N",
                   help="variation seed, as A1111's: image i's starting noise moves towards that of seed N + i")
    p.add_argument("--subseed-strength", type=checked.probability, default=0.0, metavar="S",
                   help="how far, in [0, 1] (A1111's slerp; 0: the --seed image exactly, the default)")
    if stable_diffusion:
        p.add_argument("--spacing", choices=SPACINGS, default=None,
                       help="timestep spacing (default: the model's scheduler config, else diffusers' default for "
                            "the sampler: linspace for Euler, Heun, DPM++, UniPC; leading for DDIM, PLMS, DDPM)")
        ramp = p.add_mutually_exclusive_group()
        ramp.add_argument("--karras", dest="sigma_ramp", action="store_const", const="karras",
                          help="Karras et al. noise levels (Euler, Heun, DPM++, UniPC)")
        ramp.add_argument("--exponential", dest="sigma_ramp", action="store_const", const="exponential",
                          help="noise levels evenly spaced in log sigma (Euler, Heun, DPM++, UniPC)")
    what = ("a native run folder (`latentdiff train`), checkpoint folder or model.safetensors, or Stable Diffusion "
            "weights: a .safetensors/.ckpt single file or a diffusers folder") if stable_diffusion else (
            "a native run folder (`latentdiff train`), checkpoint folder or model.safetensors")
    p.add_argument("--model", metavar="PATH", help=f"{what} (default: {DEFAULT_MODELS[verb]})")
    if size:
        p.add_argument("--height", type=checked.positive_int, default=None,
                       help="pixels (default: the model's training size)")
        p.add_argument("--width", type=checked.positive_int, default=None,
                       help="pixels (default: the model's training size)")
    if stable_diffusion:
        p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                       help="override what the UNet predicts (an original SD 2.x-768-v file cannot tell)")
        p.add_argument("--config", metavar="FILE", default=None,
                       help="the original YAML of a single-file model (default: the model's stem with .yaml, if it "
                            "exists)")
        _add_lora_and_embedding_options(p)
        p.add_argument("--clip-skip", type=checked.positive_int, default=None, metavar="N",
                       help="take the text encoder's output N - 1 layers before its last, as A1111's Clip skip "
                            "(1: the usual output; Stable Diffusion models only)")
    p.add_argument("--device", default="auto")
    checked.add_allow_nonfinite(p)
    if stable_diffusion:
        p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="Stable Diffusion weights' precision (bf16 runs on the CPU; default fp32)")
    checked.add_batch_size(p)
    p.add_argument("--attention-slice", type=checked.non_negative_int, default=None, metavar="Q",
                   help="attend Q queries at a time to save memory (default: all at once)")
    if stable_diffusion:
        p.add_argument("--vae-tile", type=checked.positive_int, default=None, metavar="T",
                       help="decode in overlapping tiles of T latent pixels to save memory (default: whole, or tiles "
                            "where a whole decode would not fit in the memory available)")
    p.add_argument("--separate", action="store_true", help="with -n > 1, one file per image (OUT-0.png, ...)")
    p.add_argument("--no-metadata", action="store_true",
                   help="write no generation parameters into the PNGs (default: A1111's 'parameters' text chunk and "
                        "a 'latentdiff' JSON chunk)")
    p.add_argument("-o", "--output", default="out.png",
                   help="PNG to write (default out.png; with --prompts a folder or a name pattern, see there)")


def _add_sample_parser(sub: argparse._SubParsersAction, sampler_names: str) -> None:
    p = sub.add_parser("sample", help="draw images from a diffusion checkpoint into a PNG grid",
                       description=f"Sample images from a diffusion checkpoint. Samplers: {sampler_names}. The "
                                   "same --seed gives the same images on any device.")
    p.add_argument("checkpoint", help="model.safetensors, a checkpoint folder or a run folder")
    p.add_argument("-n", type=checked.image_count, default=16, help="number of images (default 16)")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of: {sampler_names} (default dpmpp_2m)")
    p.add_argument("--steps", type=checked.step_count, default=20, help="sampler steps (default 20)")
    p.add_argument("--seed", type=checked.seed, default=0)
    p.add_argument("--guidance", type=checked.non_negative_float, default=1.0,
                   help="classifier-free guidance scale for class and text models (1: none)")
    p.add_argument("--class", dest="classes", type=checked.non_negative_int, nargs="+", action="extend", metavar="C",
                   help="class label(s) for a class model, cycled over the images (default: one class per column)")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="caption for a text model; repeat for several, cycled over the images (one per column)")
    p.add_argument("--negative", default=None, metavar="TEXT",
                   help="negative prompt for a text model's guidance (default: the empty caption)")
    p.add_argument("--karras", action="store_true", help="Karras et al. noise levels instead of the schedule's own")
    p.add_argument("--nrow", type=checked.non_negative_int, default=0,
                   help="images per grid row (default: about sqrt(n))")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-ema", action="store_true", help="the raw training weights (from train_state.pt)")
    checked.add_batch_size(p)
    checked.add_allow_nonfinite(p)
    p.add_argument("--no-metadata", action="store_true", help="write no generation parameters into the PNG")
    p.add_argument("-o", "--output", type=checked.image_output, default="samples.png",
                   help="PNG to write (default samples.png)")
    p.set_defaults(func=_sample)


def _add_verb(sub: argparse._SubParsersAction, name: str, func, help: str, description: str,
              inputs: tuple[tuple[str, str], ...], prompt_help: str = "the prompt") -> argparse.ArgumentParser:
    """A generating verb's parser with its positional inputs (name, help) and the optional prompt; the caller adds
    the verb's own options, then ``_add_generation_options``."""
    p = sub.add_parser(name, help=help, description=description)
    for input_name, input_help in inputs:
        p.add_argument(input_name, metavar=input_name.upper(), help=input_help)
    p.add_argument("prompt", metavar="PROMPT", nargs="?", default="", help=prompt_help)
    p.set_defaults(func=func)
    return p


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sampler_names = ", ".join(SAMPLERS) + " (or AUTOMATIC1111's: " + ", ".join(f'"{a}"' for a in SAMPLER_ALIASES) + ")"
    _add_sample_parser(sub, sampler_names)
    p = _add_verb(sub, "generate", _generate, "text-to-image with a native text model or Stable Diffusion",
                  f"Generate images from a prompt with a text-conditioned model trained here (a run folder of "
                  f"`latentdiff train`, e.g. configs/ldm-scenes-txt2img.yaml) or with Stable Diffusion (v1.x, v2.x). "
                  f"Samplers: {sampler_names}. With Stable Diffusion weights, sampler, seed and prompt, the images "
                  "are those of diffusers' StableDiffusionPipeline; with a native model, those of `latentdiff sample "
                  "--prompt`.", (), "the prompt (leave out for a model without text)")
    _add_generation_options(p, sampler_names)
    add_from_png_option(p)
    p.add_argument("--prompts", dest="prompts_file", metavar="FILE", default=None,
                   help="one prompt per line, or JSON Lines (.jsonl) with per-line options; the model is loaded once "
                        "and each line writes its PNG, named from -o: a pattern ('out/{index:04d}.png'; {line}, "
                        "{seed}), a folder, or NAME.png -> NAME-0000.png, ...")

    p = _add_verb(sub, "img2img", _img2img, "redraw an image guided by a prompt (SDEdit)",
                  "Noise INIT to --strength of the way and denoise it with the prompt, as diffusers' "
                  "StableDiffusionImg2ImgPipeline. A native model encodes INIT with its first stage's posterior mean; "
                  "INIT must have the model's image size.", (("init", "the starting image"),))
    p.add_argument("--strength", type=checked.strength, default=0.6,
                   help="how much to change: 0 keeps INIT, 1 redraws it entirely (default 0.6)")
    _add_generation_options(p, sampler_names, size=False)
    add_from_png_option(p, " (give INIT again: a PNG does not hold it)")

    p = _add_verb(sub, "inpaint", _inpaint, "repaint the white part of a mask guided by a prompt",
                  "Repaint where MASK is white and keep the rest, as diffusers' StableDiffusionInpaintPipeline: with "
                  "an inpainting model (a 9-channel SD UNet, or a native model trained with conditioner.image: "
                  "inpaint) or any text-to-image model (the kept region is re-imposed at every step, and pasted back "
                  "in latents at the end). A first stage with a mask-conditioned decoder (the bundled models') "
                  "decodes with the kept pixels.",
                  (("image", "the image"), ("mask", "same size as IMAGE; white = repaint, black = keep")))
    p.add_argument("--strength", type=checked.strength, default=1.0,
                   help="1 repaints the masked region from noise; less keeps some of it (default 1)")
    p.add_argument("--keep-unmasked", action="store_true",
                   help="paste the original pixels back outside the mask (the autoencoder alters them slightly)")
    p.add_argument("--no-mask-decoder", action="store_true",
                   help="decode with the plain decoder even if the model's first stage has a mask-conditioned "
                        "inpainting decoder (which sees the kept pixels; the default when there is one)")
    _add_generation_options(p, sampler_names, size=False)
    add_from_png_option(p, " (give IMAGE and MASK again: a PNG does not hold them)")

    native_verbs = (
        ("seg2img", _seg2img, "an image whose layout follows a class map (semantic synthesis)",
         "Generate images from a class map with a native model trained with class-map conditioning "
         "(configs/ldm-scenes-seg2img.yaml). MAP is a PNG whose pixel values are class indices: a palette PNG (the "
         "palette index is the class; colours are only for viewing) or a greyscale one (the grey value is the "
         "class), of the model's image size, with classes below the model's num_map_classes. For the Fashion-MNIST "
         "scenes: 0 background, 1 + the Fashion-MNIST class on the items.", (("map", "the class map PNG"),)),
        ("upscale", _upscale, "super-resolution of a low-res image",
         "Upscale LOWRES with a native model trained with low-res conditioning (configs/ldm-scenes-upscale.yaml): "
         "LOWRES must have the model's lowres_size, the output has its image size.",
         (("lowres", "the low-res image"),)),
    )
    for name, func, help_line, description, inputs in native_verbs:
        p = _add_verb(sub, name, func, help_line, description, inputs, "a prompt, for a model that also takes text")
        _add_generation_options(p, sampler_names, size=False, stable_diffusion=False)
