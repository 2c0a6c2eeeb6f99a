"""Measure the bundled Fashion-MNIST-scenes models (text-to-image, seg2img, inpainting, super-resolution).

Every number in docs/scenes.md comes from this script; each run appends one JSON line to ``--out``
(default docs/scenes-eval.jsonl) and prints a table. Images are generated from held-out test scenes
(``fmnist_scenes`` split "test": items from the Fashion-MNIST t10k file, only the 72 colour-class pairs seen in
training; split "test_heldout": every scene holds one of the 8 held-out pairs). A prompt holds when the
:class:`~latentdiff.eval.prompt_accuracy.PromptChecker` (classifier + colour + position checks) says every attribute
of it does; the same checker on the real scenes gives the ceiling ("real" rows).

    python benchmarks/scenes_eval.py real                    # the checker on real test scenes (the ceiling)
    python benchmarks/scenes_eval.py txt2img --n 1000        # seen and unseen combinations, FD, s/image
    python benchmarks/scenes_eval.py txt2img --n 300 --deep-cache 3   # the same with DeepCache (approximate)
    python benchmarks/scenes_eval.py txt2img --n 300 --tome 0.5       # the same with token merging (approximate)
    python benchmarks/scenes_eval.py guidance --n 300        # the guidance-scale curve (docs/scenes-guidance.png)
    python benchmarks/scenes_eval.py seg2img --n 1000        # class fidelity to the map
    python benchmarks/scenes_eval.py inpaint --n 500         # unmasked PSNR, filled-region prompt accuracy
    python benchmarks/scenes_eval.py upscale --n 1000        # PSNR and FD against bicubic upsampling

Run with one thread (``OMP_NUM_THREADS=1``) for the seconds-per-image figures; they are process CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSIFIER = ROOT / "models" / "fashion-classifier.safetensors"
MODELS = {"txt2img": ROOT / "models" / "scenes-txt2img", "seg2img": ROOT / "models" / "scenes-seg2img",
          "inpaint": ROOT / "models" / "scenes-inpaint", "upscale": ROOT / "models" / "scenes-upscale"}
FD_SIZE = 112  # EfficientNet-Lite0 input size for the Frechet distance (as docs/f-sweep.md)


def scenes(split: str, n: int, start: int = 0) -> dict:
    """The first ``n`` scenes of ``split`` (from ``start``), collated."""
    from torch.utils.data import default_collate

    from latentdiff.data.scenes import FashionScenes

    data = FashionScenes(split, image_size=32)
    return default_collate([data[i] for i in range(start, start + n)])


def checker():
    from latentdiff.eval.prompt_accuracy import PromptChecker, load_classifier

    if not CLASSIFIER.is_file():
        raise SystemExit(f"{CLASSIFIER} is missing: python -c \"from latentdiff.eval.prompt_accuracy import "
                         f"train_classifier; train_classifier('{CLASSIFIER.relative_to(ROOT)}')\"")
    return PromptChecker(load_classifier(CLASSIFIER))


def accuracy(images: torch.Tensor, batch: dict, check) -> dict:
    """Prompt accuracy overall, by number of items, and on held-out pairs. ``images`` in [-1, 1]."""
    from latentdiff.data.scenes import decode_attributes
    from latentdiff.eval.prompt_accuracy import prompt_accuracy

    attrs = decode_attributes(batch["attributes"])
    out = {"all": prompt_accuracy(images, attrs, check)}
    for k in (1, 2):
        rows = [i for i in range(len(attrs)) if len(attrs[i]) == k]
        if rows:
            out[f"{k}_item"] = prompt_accuracy(images[rows], [attrs[i] for i in rows], check)
    if bool(batch["is_heldout"].any()):
        # The held-out item's own attribute check (the other item of a two-item scene is any pair).
        checks = check.check(images, attrs)
        held = [row[j].ok for i, row in enumerate(checks) for j in range(len(row)) if batch["is_heldout"][i, j]]
        out["heldout_attribute_accuracy"] = sum(held) / max(len(held), 1)
    return out


def reference_stats():
    """EfficientNet features of 5000 real "test" scenes (indices 5000-9999, disjoint from the prompts used)."""
    import numpy as np

    from latentdiff.eval.metrics import EfficientNetFrechetDistance, FeatureStatistics

    path = ROOT / "runs" / "scenes-eval" / f"fd_reference_{FD_SIZE}px.npz"
    if path.exists():
        data = np.load(path)
        return FeatureStatistics.from_state_dict({k: data[k] for k in data.files})
    fd = EfficientNetFrechetDistance(image_size=FD_SIZE)
    stats = FeatureStatistics()
    for start in range(5000, 10000, 500):
        stats.update(fd.features(scenes("test", 500, start)["image"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: np.asarray(v) for k, v in stats.state_dict().items()})
    return stats


def frechet(images: torch.Tensor) -> float:
    from latentdiff.eval.metrics import EfficientNetFrechetDistance, FeatureStatistics

    fd = EfficientNetFrechetDistance(image_size=FD_SIZE)
    stats = FeatureStatistics()
    for chunk in images.split(500):
        stats.update(fd.features(chunk))
    return float(EfficientNetFrechetDistance.compute(reference_stats(), stats))


def pipeline(path: Path, args: argparse.Namespace | None = None):
    from latentdiff.pipelines.native import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_checkpoint(path)
    if args is not None and getattr(args, "guidance", None) is None:
        args.guidance = pipe.default_guidance  # recorded with the results
    return pipe


def generate(fn, n: int, batch_size: int, **kwargs) -> tuple[torch.Tensor, float]:
    """Call ``fn(start, stop)`` over ``n`` items in batches: (images in [-1, 1], CPU seconds per image)."""
    out, seconds = [], 0.0
    for start in range(0, n, batch_size):
        t0 = time.process_time()
        images = fn(start, min(n, start + batch_size), **kwargs)
        seconds += time.process_time() - t0
        out.append(images * 2 - 1)
    return torch.cat(out), seconds / n


def record(args: argparse.Namespace, task: str, result: dict) -> None:
    row = {"task": task, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(),
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
           **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


def _fmt(acc: dict) -> str:
    return (f"prompt {acc['prompt_accuracy']:.3f} | class {acc['class_accuracy']:.3f} | colour "
            f"{acc['colour_accuracy']:.3f} | position {acc['position_accuracy']:.3f} (n={acc['num_prompts']})")


# ------------------------------------------------------------------------------------------------------- tasks


def real(args: argparse.Namespace) -> None:
    check = checker()
    result = {}
    for split in ("test", "test_heldout"):
        batch = scenes(split, args.n, args.start)
        result[split] = accuracy(batch["image"], batch, check)
        print(split, {k: _fmt(v) for k, v in result[split].items() if isinstance(v, dict)})
    record(args, "real", result)


def _txt2img_images(pipe, batch: dict, args: argparse.Namespace, guidance: float) -> tuple[torch.Tensor, float]:
    captions = list(batch["caption"])

    def fn(start: int, stop: int) -> torch.Tensor:
        options = {"deep_cache": args.deep_cache} if args.deep_cache else {}
        if args.tome:
            options["tome"] = args.tome
        return pipe.text_to_image(captions[start:stop], steps=args.steps, sampler=args.sampler,
                                  guidance_scale=guidance, generator=args.seed + start, progress=False,
                                  sampler_options=options or None).images

    return generate(fn, len(captions), args.batch_size)


def txt2img(args: argparse.Namespace) -> None:
    check, pipe = checker(), pipeline(args.model, args)
    result = {}
    for split in ("test", "test_heldout"):
        batch = scenes(split, args.n, args.start)
        images, seconds = _txt2img_images(pipe, batch, args, args.guidance)
        result[split] = accuracy(images, batch, check)
        result[split]["seconds_per_image"] = seconds
        if split == "test":
            result[split]["frechet_distance"] = frechet(images)
            _grid(images[:32], Path(args.grid))
        print(split, {k: _fmt(v) for k, v in result[split].items() if isinstance(v, dict)})
    record(args, "txt2img", result)


def guidance(args: argparse.Namespace) -> None:
    check, pipe = checker(), pipeline(args.model, args)
    seen, unseen = scenes("test", args.n, args.start), scenes("test_heldout", args.n, args.start)
    rows = []
    for scale in args.scales:
        images, seconds = _txt2img_images(pipe, seen, args, scale)
        acc = accuracy(images, seen, check)
        held_images, _ = _txt2img_images(pipe, unseen, args, scale)
        held = accuracy(held_images, unseen, check)
        row = {"guidance": scale, "one_item": acc["1_item"]["prompt_accuracy"],
               "two_items": acc["2_item"]["prompt_accuracy"], "unseen": held["all"]["prompt_accuracy"],
               "unseen_heldout_attribute": held["heldout_attribute_accuracy"], "frechet_distance": frechet(images),
               "seconds_per_image": seconds}
        print(row, flush=True)
        rows.append(row)
    record(args, "guidance", {"curve": rows})
    _plot_guidance(rows, Path(args.plot))


def seg2img(args: argparse.Namespace) -> None:
    from latentdiff.data.scenes import decode_attributes

    check, pipe = checker(), pipeline(args.model, args)
    batch = scenes("test", args.n, args.start)
    maps = batch["class_map"]

    def fn(start: int, stop: int) -> torch.Tensor:
        return pipe.segmentation_to_image(maps[start:stop], steps=args.steps, sampler=args.sampler,
                                          guidance_scale=args.guidance, generator=args.seed + start,
                                          progress=False).images

    images, seconds = generate(fn, args.n, args.batch_size)
    checks = check.check(images, decode_attributes(batch["attributes"]))
    items = [c for row in checks for c in row]
    # The map fixes each item's class and silhouette, not its colour: fidelity is the classifier agreeing with
    # the map's class on the item's box.
    result = {"class_fidelity": sum(c.class_ok for c in items) / len(items), "num_items": len(items),
              "position_accuracy": sum(c.position_ok for c in items) / len(items),
              "real_class_accuracy": _real_class_accuracy(batch, check),
              "frechet_distance": frechet(images), "seconds_per_image": seconds}
    _grid(images[:32], Path(args.grid))
    record(args, "seg2img", result)


def _real_class_accuracy(batch: dict, check) -> float:
    from latentdiff.data.scenes import decode_attributes

    items = [c for row in check.check(batch["image"], decode_attributes(batch["attributes"])) for c in row]
    return sum(c.class_ok for c in items) / len(items)


def inpaint(args: argparse.Namespace) -> None:
    """Repaint one item's box of two-item test scenes, prompted with the full caption."""
    from latentdiff.data.scenes import SceneLayout, decode_attributes
    from latentdiff.eval.metrics import psnr

    check, pipe = checker(), pipeline(args.model, args)
    pool = scenes("test", args.n * 3, args.start)
    rows = [i for i in range(len(pool["caption"])) if int(pool["num_items"][i]) == 2][: args.n]
    batch = {k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows]) for k, v in pool.items()}
    attrs = decode_attributes(batch["attributes"])
    layout = SceneLayout(32)
    gen = torch.Generator().manual_seed(args.seed)
    which = torch.randint(0, 2, (len(rows),), generator=gen)
    masks = torch.stack([layout.box_mask(attrs[i][int(which[i])].position).float() for i in range(len(rows))])
    pixels = (batch["image"] + 1) / 2
    captions = list(batch["caption"])

    def fn(start: int, stop: int) -> torch.Tensor:
        return pipe.inpaint(pixels[start:stop], masks[start:stop, None], captions[start:stop], steps=args.steps,
                            sampler=args.sampler, guidance_scale=args.guidance, generator=args.seed + start,
                            keep_unmasked=args.keep_unmasked, mask_decoder=not args.no_mask_decoder,
                            progress=False).images

    images, seconds = generate(fn, len(rows), args.batch_size)
    keep = (1 - masks)[:, None].expand_as(images)

    def region_mse(x: torch.Tensor) -> torch.Tensor:
        """Per image, the mean squared error (images in [-1, 1]) over the kept region."""
        return ((x - batch["image"]) ** 2 * keep).sum((1, 2, 3)) / keep.sum((1, 2, 3))

    mse = region_mse(images)
    unmasked_psnr = 10 * torch.log10(4.0 / mse)  # inf where the region came back exactly (--keep-unmasked)
    pooled = float(mse.mean())
    checks = check.check(images, attrs)
    filled = [checks[i][int(which[i])] for i in range(len(rows))]
    # The autoencoder alone on the same region: the floor the unmasked region is measured against (the plain
    # decoder's; and the mask decoder's, given the same masks, when the first stage has one).
    latents = pipe.encode_images(pixels)

    def region_psnr(recon: torch.Tensor) -> float:  # recon in [0, 1], as the pipeline decodes
        return float((10 * torch.log10(4.0 / region_mse(recon * 2 - 1).clamp_min(1e-10))).mean())

    floors = {"autoencoder_unmasked_psnr_mean_db": region_psnr(pipe.decode_latents(latents))}
    if pipe.has_mask_decoder:
        floors["mask_decoder_unmasked_psnr_mean_db"] = region_psnr(pipe.decode_latents(latents, pixels,
                                                                                      masks[:, None]))
    result = {"unmasked_psnr_mean_db": float(unmasked_psnr.mean()),
              "unmasked_psnr_min_db": float(unmasked_psnr.min()),
              "unmasked_psnr_pooled_db": 10 * math.log10(4.0 / pooled) if pooled > 0 else math.inf,
              **floors, "mask_decoder": pipe.has_mask_decoder and not args.no_mask_decoder,
              "whole_image_psnr_db": float(psnr(images, batch["image"]).mean()),
              "filled_attribute_accuracy": sum(c.ok for c in filled) / len(filled),
              "filled_class_accuracy": sum(c.class_ok for c in filled) / len(filled),
              "filled_colour_accuracy": sum(c.colour_ok for c in filled) / len(filled),
              "filled_position_accuracy": sum(c.position_ok for c in filled) / len(filled),
              "num_images": len(rows), "seconds_per_image": seconds, "model": str(args.model)}
    _grid(torch.cat([batch["image"][:16], images[:16]]), Path(args.grid))
    record(args, "inpaint", result)


def upscale(args: argparse.Namespace) -> None:
    from latentdiff.eval.metrics import psnr

    pipe = pipeline(args.model, args)
    batch = scenes("test", args.n, args.start)
    hr = batch["image"]
    s = pipe.lowres_size
    lowres = F.interpolate(hr, size=(s, s), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    bicubic = F.interpolate(lowres, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)

    def fn(start: int, stop: int) -> torch.Tensor:
        return pipe.upscale((lowres[start:stop] + 1) / 2, steps=args.steps, sampler=args.sampler,
                            guidance_scale=args.guidance, generator=args.seed + start, progress=False).images

    images, seconds = generate(fn, args.n, args.batch_size)
    recon = pipe.decode_latents(pipe.encode_images((hr + 1) / 2)) * 2 - 1
    result = {"model_psnr_db": float(psnr(images, hr).mean()), "bicubic_psnr_db": float(psnr(bicubic, hr).mean()),
              "autoencoder_psnr_db": float(psnr(recon, hr).mean()),
              "model_frechet_distance": frechet(images), "bicubic_frechet_distance": frechet(bicubic),
              "real_frechet_distance": frechet(hr), "num_images": args.n, "seconds_per_image": seconds}
    _grid(torch.cat([bicubic[:8], images[:8], hr[:8]]), Path(args.grid))
    record(args, "upscale", result)


# ------------------------------------------------------------------------------------------------------ pictures


def _grid(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    from latentdiff.data.transforms import save_image_grid

    save_image_grid(images.clamp(-1, 1), path, nrow=columns)


def _plot_guidance(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["guidance"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("one_item", "seen pairs, one item"), ("two_items", "seen pairs, two items"),
                       ("unseen", "scenes with a held-out pair"),
                       ("unseen_heldout_attribute", "the held-out item itself")):
        a.plot(scales, [r[key] for r in rows], marker="o", label=label)
    a.set_xlabel("guidance scale")
    a.set_ylabel("prompt accuracy")
    a.set_ylim(0, 1)
    a.grid(alpha=0.3)
    a.legend()
    b.plot(scales, [r["frechet_distance"] for r in rows], marker="o", color="k")
    b.set_xlabel("guidance scale")
    b.set_ylabel(f"Frechet distance (EfficientNet-Lite0, {FD_SIZE} px)")
    b.grid(alpha=0.3)
    fig.suptitle("Bundled text-to-image model (models/scenes-txt2img) against the guidance scale")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    defaults = {"real": None, "txt2img": "txt2img", "guidance": "txt2img", "seg2img": "seg2img",
                "inpaint": "inpaint", "upscale": "upscale"}
    for name, model in defaults.items():
        p = sub.add_parser(name)
        p.add_argument("--n", type=int, default=1000)
        p.add_argument("--out", default=str(ROOT / "docs" / "scenes-eval.jsonl"))
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--start", type=int, default=0,
                       help="first test scene (e.g. 2000: a validation slice to pick settings on, disjoint from the "
                            "reported first 1000 and from the FD reference scenes 5000-9999)")
        if model is not None:
            p.add_argument("--model", type=Path, default=MODELS[model])
            p.add_argument("--steps", type=int, default=25)  # the CLI verbs' default
            p.add_argument("--sampler", default="dpmpp_2m")
            p.add_argument("--guidance", type=float, default=None,
                           help="default: the model's own (sample_guidance), as the CLI verbs use")
            p.add_argument("--batch-size", type=int, default=100)
            p.add_argument("--deep-cache", type=int, default=None, metavar="N",
                           help="txt2img/guidance: DeepCache, the whole UNet every N-th step (default: off)")
            p.add_argument("--tome", type=float, default=None, metavar="RATIO",
                           help="txt2img/guidance: token merging (ToMe for SD) at RATIO (default: off)")
            p.add_argument("--grid", default=str(ROOT / "runs" / "scenes-eval" / f"{name}.png"))
        if name == "inpaint":
            p.add_argument("--keep-unmasked", action="store_true", help="paste the input back outside the mask")
            p.add_argument("--no-mask-decoder", action="store_true",
                           help="decode with the plain decoder even if the first stage has a mask decoder")
        if name == "guidance":
            p.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
            p.add_argument("--plot", default=str(ROOT / "docs" / "scenes-guidance.png"))
        p.set_defaults(func=globals()[name])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
