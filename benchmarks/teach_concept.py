"""Teach the bundled text-to-image model a layout it has never seen: items in the corners of the canvas.

The bundled ``models/scenes-txt2img`` knows five positions (centre, left, right, top, bottom). Every word of "a red
sneaker at the top left" is in its vocabulary, but no training scene ever put an item in a corner, so the phrase is
a new concept built from known words. This script makes the data a user would bring (a folder of ``NNNNNN.png`` +
``NNNNNN.txt``, kohya's convention) and measures the model before and after fine-tuning on it:

    python benchmarks/teach_concept.py data runs/corners-data --n 2000
    latentdiff train configs/finetune-lora-scenes.yaml data.path=runs/corners-data train.out_dir=runs/corners-lora
    python benchmarks/teach_concept.py eval --model models/scenes-txt2img --n 200 --label before
    python benchmarks/teach_concept.py eval --model runs/corners-lora --n 200 --label after

``eval`` reports prompt accuracy on corner prompts (one item at one of the four corners; class, colour and
position each checked by the project's prompt checker) and, for forgetting, on the first ``n`` test scenes' own
prompts (one and two items at the five known positions), as ``benchmarks/scenes_eval.py txt2img`` does.

``--concept pink`` teaches a new colour word instead: "pink" is not in the bundled model's vocabulary (a prompt with
it reads ``[UNK]``), so the fine-tune adds it (``new_words=[pink]``, train/new_words.py). The data is one pink item
(``data.scenes.NEW_COLOURS``) at one of the five known positions, and the same share of replayed scenes; ``eval``
scores pink prompts (one item, every class and position) with the checker's palette widened by pink
(``CheckerConfig.new_colours``), which it also uses for the old prompts:

    python benchmarks/teach_concept.py data runs/pink-data --n 2000 --concept pink
    latentdiff train configs/finetune-lora-scenes.yaml data.path=runs/pink-data new_words=[pink] ...
    python benchmarks/teach_concept.py eval --concept pink --model runs/pink-lora --n 200 --label after

How a corner is checked: the checker knows the five built-in boxes; padding the 32 px image by 16 px on the
corner's two sides puts the corner's 16 px box exactly on the centre box of a 48 px canvas (item size 16), so
the centre check of the padded image is the corner check of the original, with every pixel kept (strays
outside the corner still count against the position).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CORNERS = ("top left", "top right", "bottom left", "bottom right")


def corner_caption(cls: str, colour: str, corner: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {cls} at the {corner}"


def corner_box(corner: str, canvas: int = 32, item: int = 16) -> tuple[int, int]:
    """(top, left) of the item box in ``corner``."""
    return (0 if corner.startswith("top") else canvas - item), (0 if corner.endswith("left") else canvas - item)


def seen_pairs() -> list[tuple[str, str]]:
    """The (colour, class) pairs the bundled model was trained on (the 8 held-out ones excluded)."""
    from latentdiff.data.scenes import CLASS_NAMES, COLOURS, heldout_pairs

    held = set(heldout_pairs())
    return [(colour, cls) for colour in COLOURS for cls in CLASS_NAMES if (colour, cls) not in held]


def render_corner(source: np.ndarray, cls: str, colour: str, corner: str, canvas: int = 32) -> torch.Tensor:
    """A (3, S, S) scene in [-1, 1] with one tinted Fashion-MNIST item in ``corner``."""
    from latentdiff.data.scenes import COLOURS, item_alpha

    item = canvas // 2
    image = torch.zeros(3, canvas, canvas)
    top, left = corner_box(corner, canvas, item)
    image[:, top:top + item, left:left + item] = item_alpha(source, item) * torch.tensor(COLOURS[colour])[:, None, None]
    return image * 2 - 1


def _sources(split: str) -> tuple[np.ndarray, np.ndarray]:
    from latentdiff.data.datasets import FASHION_MNIST_DIR, _load_fashion_mnist

    images, labels = _load_fashion_mnist(FASHION_MNIST_DIR, split)
    # As FashionScenes: nearly blank scans (under 5% of pixels above 0.2 of their maximum) are never used.
    peak = images.reshape(len(images), -1).max(1, keepdims=True).clip(min=1)
    keep = ((images.reshape(len(images), -1) > 0.2 * peak).mean(1) >= 0.05)
    return images[keep], labels[keep]


def _save(image: torch.Tensor, caption: str, out: Path, index: int) -> None:
    pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(out / f"{index:06d}.png")
    (out / f"{index:06d}.txt").write_text(caption + "\n")


def pink_scene(source: np.ndarray, cls: str, position: str) -> tuple[torch.Tensor, str]:
    """A 32 px scene of one pink item at a known position, and its caption."""
    from latentdiff.data.scenes import SceneAttribute, SceneLayout, caption_for, render_scene

    attributes = [SceneAttribute(cls, "pink", position)]
    return render_scene([source], attributes, SceneLayout(32))["image"], caption_for(attributes)


def make_data(args: argparse.Namespace) -> None:
    """``n`` scenes: a fraction ``replay`` of ordinary training scenes (so that the old positions are rehearsed),
    the rest one item in a random corner, from seen (colour, class) pairs and Fashion-MNIST train images."""
    from latentdiff.data.scenes import CLASS_NAMES, FashionScenes

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    images, labels = _sources("train")
    by_class = {c: np.flatnonzero(labels == c) for c in range(len(CLASS_NAMES))}
    from latentdiff.data.scenes import POSITIONS

    pairs, scenes = seen_pairs(), FashionScenes("train", image_size=32)
    corners = 0
    for i in range(args.n):
        if rng.random() < args.replay:
            item = scenes[int(rng.integers(len(scenes)))]
            _save(item["image"], item["caption"], out, i)
            continue
        colour, cls = pairs[int(rng.integers(len(pairs)))]
        corner = CORNERS[int(rng.integers(len(CORNERS)))]
        source = images[int(rng.choice(by_class[CLASS_NAMES.index(cls)]))]
        if args.concept == "pink":
            _save(*pink_scene(source, cls, POSITIONS[int(rng.integers(len(POSITIONS)))]), out, i)
        else:
            _save(render_corner(source, cls, colour, corner), corner_caption(cls, colour, corner), out, i)
        corners += 1
    what = "a pink item" if args.concept == "pink" else "an item in a corner"
    print(f"wrote {args.n} scenes to {out} ({corners} with {what}, {args.n - corners} replayed)")


def check_corners(images: torch.Tensor, prompts: list[tuple[str, str, str]], checker) -> dict:
    """Prompt accuracy of one-item corner prompts (see the module docstring for the padding)."""
    from latentdiff.data.scenes import SceneAttribute
    from latentdiff.eval.prompt_accuracy import CheckerConfig, PromptChecker

    centred = PromptChecker(checker.classifier, CheckerConfig(item_size=images.shape[-1] // 2))
    pad = images.shape[-1] // 2
    rows = []
    for image, (cls, colour, corner) in zip(images, prompts, strict=True):
        top = pad if corner.startswith("top") else 0
        left = pad if corner.endswith("left") else 0
        padded = F.pad(image, (left, pad - left, top, pad - top), value=-1.0)
        rows.append(centred.check(padded[None], [[SceneAttribute(cls, colour, "center")]])[0][0])
    result = {"num_prompts": len(rows)}
    for key, ok in (("class_accuracy", "class_ok"), ("colour_accuracy", "colour_ok"),
                    ("position_accuracy", "position_ok")):
        result[key] = sum(getattr(r, ok) for r in rows) / len(rows)
    result["prompt_accuracy"] = sum(r.class_ok and r.colour_ok and r.position_ok for r in rows) / len(rows)
    for corner in CORNERS:
        mine = [r for r, p in zip(rows, prompts, strict=True) if p[2] == corner]
        result[corner] = sum(r.class_ok and r.colour_ok and r.position_ok for r in mine) / max(len(mine), 1)
    return result


def pink_prompts(n: int) -> list[list]:
    """``n`` one-item pink prompts, every class at every position in turn."""
    from latentdiff.data.scenes import CLASS_NAMES, POSITIONS, SceneAttribute

    classes, positions = len(CLASS_NAMES), len(POSITIONS)
    return [[SceneAttribute(CLASS_NAMES[i % classes], "pink", POSITIONS[i // classes % positions])] for i in range(n)]


def check_pink(images: torch.Tensor, prompts: list[list], check) -> dict:
    """Prompt accuracy of the pink prompts, and which colours the checker saw instead of pink."""
    from collections import Counter

    from latentdiff.eval.prompt_accuracy import prompt_accuracy

    result = prompt_accuracy(images, prompts, check)
    seen = Counter(row[0].predicted_colour for row in check.check(images, prompts))
    return {**{k: v for k, v in result.items() if not isinstance(v, list)}, "colours_seen": dict(seen.most_common())}


def evaluate(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scenes_eval import accuracy, checker, pipeline, scenes

    from latentdiff.data.scenes import CLASS_NAMES, caption_for
    from latentdiff.eval.prompt_accuracy import CheckerConfig, PromptChecker

    check, pipe = checker(), pipeline(Path(args.model))
    if args.concept == "pink":  # the old prompts are judged with the same palette as the pink ones
        check = PromptChecker(check.classifier, CheckerConfig(new_colours=("pink",)))
    rng = np.random.default_rng(args.seed + 1)
    pairs = seen_pairs()
    prompts = [(cls, colour, CORNERS[i % len(CORNERS)])
               for i, (colour, cls) in enumerate(pairs[int(k)] for k in rng.integers(len(pairs), size=args.n))]
    assert all(cls in CLASS_NAMES for cls, _, _ in prompts)
    guidance = pipe.default_guidance if args.guidance is None else args.guidance

    def run(captions: list[str]) -> tuple[torch.Tensor, float]:
        out, t0 = [], time.process_time()
        for start in range(0, len(captions), args.batch_size):
            out.append(pipe.text_to_image(captions[start:start + args.batch_size], steps=args.steps,
                                          guidance_scale=guidance, generator=args.seed + start,
                                          progress=False).images * 2 - 1)
        return torch.cat(out), (time.process_time() - t0) / len(captions)

    if args.concept == "pink":
        pink = pink_prompts(args.n)
        new_images, seconds = run([caption_for(p) for p in pink])
        new = {"pink": check_pink(new_images, pink, check)}
    else:
        new_images, seconds = run([corner_caption(*p) for p in prompts])
        new = {"corners": check_corners(new_images, prompts, check)}
    old = scenes("test", args.n)
    old_images, _ = run(list(old["caption"]))
    old_acc = accuracy(old_images, old, check)
    result = {"label": args.label, "model": args.model, "n": args.n, "steps": args.steps, "guidance": guidance,
              **new,
              "old_prompts": {k: v["prompt_accuracy"] for k, v in old_acc.items() if isinstance(v, dict)},
              "cpu_seconds_per_image": seconds, "threads": torch.get_num_threads()}
    if args.grid:
        from latentdiff.data.transforms import save_image_grid

        save_image_grid(new_images[:32], args.grid, nrow=8)
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


@torch.no_grad()
def roundtrip(args: argparse.Namespace) -> None:
    """The mean colour of an item's bright pixels (alpha > 0.5) drawn in each colour, and after the model's first
    stage (encode, decode): whether the frozen autoencoder can show a colour at all."""
    from latentdiff.data.scenes import COLOURS, NEW_COLOURS, SceneAttribute, SceneLayout, render_scene
    from latentdiff.formats.native import load_latent_diffusion

    model = load_latent_diffusion(args.model)
    images, labels = _sources("test")
    sources = [images[int(np.flatnonzero(labels == c)[0])] for c in range(10)]
    result = {}
    for colour in (*COLOURS, *NEW_COLOURS):
        drawn = torch.stack([render_scene([src], [SceneAttribute("bag", colour, "center")], SceneLayout(32))["image"]
                             for src in sources])
        params = model.first_stage_parameters(drawn)
        decoded = model.first_stage_model.decode(params[:, :model.latent_channels]).clamp(-1, 1)
        bright = (drawn.amax(1, keepdim=True) + 1) / 2 > 0.5
        mean = [[round(float(((x + 1) / 2 * bright).sum((0, 2, 3))[c] / bright.sum()), 2) for c in range(3)]
                for x in (drawn, decoded)]
        result[colour] = {"drawn": mean[0], "first_stage": mean[1]}
    print(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="write the fine-tuning folder (image + .txt caption pairs)")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--replay", type=float, default=0.5, help="fraction of ordinary training scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concept", choices=("corners", "pink"), default="corners")
    p.set_defaults(func=make_data)
    p = sub.add_parser("eval", help="prompt accuracy on corner prompts and on the old test prompts")
    p.add_argument("--model", default=str(ROOT / "models" / "scenes-txt2img"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="")
    p.add_argument("--grid", default="")
    p.add_argument("--out", default="", help="append the JSON result to this file")
    p.add_argument("--concept", choices=("corners", "pink"), default="corners")
    p.set_defaults(func=evaluate)
    p = sub.add_parser("roundtrip", help="each colour's mean RGB drawn and after the model's first stage")
    p.add_argument("--model", default=str(ROOT / "models" / "scenes-txt2img"))
    p.set_defaults(func=roundtrip)
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.func(args)


if __name__ == "__main__":
    main()
