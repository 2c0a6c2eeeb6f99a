"""The latent-space claim of the LDM paper, in miniature: unconditional diffusion on Fashion-MNIST 32x32 at
downsampling factors f = 1 (pixel space), 2, 4 and 8, each trained for the same CPU time, scored by the
Frechet distance (EfficientNet-Lite0 features) of samples against the test set as training goes on.

Every step is a `latentdiff` command; this script only runs them with the sweep's settings and collects
numbers. Stages (run in order; each prints what it runs):

    python benchmarks/f_sweep.py first-stages            # KL autoencoders f = 2, 4, 8 (same recipe)
    python benchmarks/f_sweep.py train --cpu-minutes 10  # 4 diffusion runs side by side, 1 thread each
    python benchmarks/f_sweep.py eval --samples 2000     # FD (DDIM 10 steps) of each checkpoint -> results.jsonl
    python benchmarks/f_sweep.py plot                    # docs/f-sweep.png and a table
    python benchmarks/f_sweep.py samplers --f 4          # samplers side by side on one model

"Same CPU time" is the process's CPU time (`train.time_limit_clock=cpu`, one thread per run), not wall time,
so runs that share the machine with other work still get the same amount of computation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("runs/sweep")
FACTORS = (1, 2, 4, 8)

# The first stages: the KL-f4 Fashion-MNIST recipe without the GAN (the sweep is about the diffusion model),
# the same number of steps for every f. Latent channels grow as the side shrinks: f2 16x16x2, f4 8x8x4, f8 4x4x8.
FIRST_STAGES = {
    2: ["model.ch_mult=1,2", "model.z_channels=2", "model.embed_dim=2"],
    4: ["model.ch_mult=1,2,2", "model.z_channels=4", "model.embed_dim=4"],
    8: ["model.ch_mult=1,2,2,2", "model.z_channels=8", "model.embed_dim=8"],
}
FIRST_STAGE_COMMON = ["loss.disc_weight=0", "loss.perceptual_min_size=32", "train.steps=2000", "train.threads=1",
                      "train.sample_every=1000", "train.ckpt_every=1000", "train.time_limit_minutes=0"]

# The diffusion UNets: the same width and depth at every f; levels and attention adapted to the latent side.
UNETS = {
    1: ["model.unet.channel_mult=1,2,2", "model.unet.attention_resolutions=4"],    # 32 -> 16 -> 8, attn at 8
    2: ["model.unet.channel_mult=1,2,2", "model.unet.attention_resolutions=2,4"],  # 16 -> 8 -> 4, attn 8 and 4
    4: ["model.unet.channel_mult=1,2", "model.unet.attention_resolutions=2"],      # 8 -> 4, attn at 4
    8: ["model.unet.channel_mult=1,2", "model.unet.attention_resolutions=1,2"],    # 4 -> 2, attn 4 and 2
}
DIFFUSION_COMMON = ["model.unet.model_channels=32", "model.unet.num_res_blocks=2", "model.unet.dropout=0.0",
                    "train.batch_size=64", "train.lr=2e-4", "train.lr_decay=none", "train.warmup_steps=200",
                    "train.threads=1", "train.time_limit_clock=cpu", "train.keep_checkpoints=0",
                    "train.steps=1000000", "train.sample_every=1000000", "ema_decay=0.999", "data.limit=20000"]
# The first 20,000 training images (encoding all 60,000 costs more CPU than a run trains for).
# Checkpoints at about every 2.5 CPU minutes: measured seconds per step (batch 64, 1 thread) on the 2-core box.
SECONDS_PER_STEP = {1: 3.3, 2: 1.55, 4: 0.35, 8: 0.26}


def run(cmd: list[str], log: Path | None = None, wait: bool = True) -> subprocess.Popen | int:
    print("$", " ".join(cmd) + (f" > {log}" if log else ""), flush=True)
    if log is None:
        return subprocess.call(cmd)
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc.wait() if wait else proc


def first_stages(args: argparse.Namespace) -> None:
    procs = []
    for f in args.f:
        out = ROOT / f"kl-f{f}"
        cmd = ["latentdiff", "train", "configs/kl-f4-fmnist.yaml", f"train.out_dir={out}", *FIRST_STAGES[f],
               *FIRST_STAGE_COMMON]
        procs.append(run(cmd, ROOT / "logs" / f"kl-f{f}.log", wait=False))
    codes = [p.wait() for p in procs]
    for f in args.f:
        run(["latentdiff", "eval-autoencoder", str(ROOT / f"kl-f{f}"), "--limit", "2000"])
    sys.exit(max(codes))


def train(args: argparse.Namespace) -> None:
    procs = []
    for f in args.f:
        out = ROOT / f"ldm-f{f}"
        every = max(1, round(args.cpu_minutes * 60 / args.checkpoints / SECONDS_PER_STEP[f]))
        if f == 1:
            cmd = ["latentdiff", "train", "configs/ddpm-fmnist-pixel.yaml"]
        else:
            cmd = ["latentdiff", "train", "configs/ldm-fmnist-uncond.yaml", f"model.first_stage={ROOT / f'kl-f{f}'}",
                   f"model.unet.in_channels={FIRST_STAGES[f][1].split('=')[1]}",
                   f"model.unet.out_channels={FIRST_STAGES[f][1].split('=')[1]}"]
        cmd += [*UNETS[f], *DIFFUSION_COMMON, f"train.out_dir={out}", f"train.time_limit_minutes={args.cpu_minutes}",
                f"train.ckpt_every={every}", f"train.log_every={max(1, every // 5)}"]
        procs.append(run(cmd, ROOT / "logs" / f"ldm-f{f}.log", wait=False))
    sys.exit(max(p.wait() for p in procs))


# ---------------------------------------------------------------------------------------------------- evaluation


def reference_statistics(size: int):
    """EfficientNet-Lite0 feature statistics of the whole Fashion-MNIST test set (10,000 images), cached."""
    import numpy as np
    import torch

    from latentdiff.data import DataConfig, build_dataset
    from latentdiff.eval.metrics import EfficientNetFrechetDistance, FeatureStatistics

    path = ROOT / f"fd_reference_{size}px.npz"
    if path.exists():
        data = np.load(path)
        return FeatureStatistics.from_state_dict({k: data[k] for k in data.files})
    test = build_dataset(DataConfig(name="fashion_mnist", image_size=32, channels=1, resize="pad"), "test")
    fd = EfficientNetFrechetDistance(image_size=size)
    stats = FeatureStatistics()
    for start in range(0, len(test), 500):
        stats.update(fd.features(torch.stack([test[i]["image"] for i in range(start, min(len(test), start + 500))])))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: np.asarray(v) for k, v in stats.state_dict().items()})
    return stats


def cpu_seconds_at(run_dir: Path, step: int) -> float:
    """The run's CPU seconds at ``step``, interpolated from the log."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    points = [(0, 0.0)] + [(r["step"], r["cpu_seconds"]) for r in rows if r.get("cpu_seconds") is not None]
    for (s0, c0), (s1, c1) in zip(points, points[1:], strict=False):
        if s0 <= step <= s1:
            return c0 + (c1 - c0) * (step - s0) / max(1, s1 - s0)
    s_last, c_last = points[-1]
    return c_last * step / max(1, s_last)


def sample_fd(checkpoint: Path, n: int, sampler: str, steps: int, size: int, seed: int = 0,
              batch: int = 250) -> tuple[float, float]:
    """(FD of ``n`` samples against the test set, seconds of sampling per image on this process)."""
    import torch

    from latentdiff.eval.metrics import EfficientNetFrechetDistance, FeatureStatistics
    from latentdiff.formats.native import load_latent_diffusion

    model = load_latent_diffusion(checkpoint).eval()
    fd = EfficientNetFrechetDistance(image_size=size)
    generator = torch.Generator().manual_seed(seed)
    stats, seconds = FeatureStatistics(), 0.0
    for start in range(0, n, batch):
        t0 = time.process_time()
        with torch.no_grad():
            images = model.sample(min(batch, n - start), sampler, steps, generator).clamp(-1, 1)
        seconds += time.process_time() - t0
        stats.update(fd.features(images))
    return EfficientNetFrechetDistance.compute(reference_statistics(size), stats), seconds / n


def evaluate(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    results = ROOT / "results.jsonl"
    done = set()
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done.add((r["f"], r["step"], r["sampler"], r["sampler_steps"], r["samples"], r["fd_size"]))
    reference_statistics(args.size)
    for f in args.f:
        run_dir = ROOT / f"ldm-f{f}"
        ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
        if args.every > 1:  # every k-th checkpoint, always the last
            ckpts = ckpts[::-1][::args.every][::-1]
        for ckpt in ckpts:
            step = int(ckpt.name.split("_")[1])
            key = (f, step, args.sampler, args.steps, args.samples, args.size)
            if key in done:
                continue
            value, per_image = sample_fd(ckpt, args.samples, args.sampler, args.steps, args.size)
            row = {"f": f, "step": step, "cpu_minutes": round(cpu_seconds_at(run_dir, step) / 60, 2),
                   "fd": round(value, 3), "sampler": args.sampler, "sampler_steps": args.steps,
                   "samples": args.samples, "fd_size": args.size, "sample_cpu_s_per_image": round(per_image, 5)}
            print(json.dumps(row), flush=True)
            with results.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (ROOT / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["sampler"] == args.sampler and r["sampler_steps"] == args.steps]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    print("| f | latent | CPU min | steps | FD |\n|---|---|---|---|---|")
    for f in FACTORS:
        mine = sorted((r for r in rows if r["f"] == f), key=lambda r: r["step"])
        if not mine:
            continue
        ax.plot([r["cpu_minutes"] for r in mine], [r["fd"] for r in mine], marker="o",
                label=f"f = {f}" + (" (pixels)" if f == 1 else ""))
        for r in mine:
            side = 32 // f
            latent = "32x32x1" if f == 1 else f"{side}x{side}x{FIRST_STAGES[f][1].split('=')[1]}"
            print(f"| {f} | {latent} | {r['cpu_minutes']:.1f} | {r['step']} | {r['fd']:.1f} |")
    ax.set_xlabel("training CPU minutes (1 thread)")
    ax.set_ylabel(f"Frechet distance (EfficientNet-Lite0, {rows[0]['fd_size']} px)")
    ax.set_yscale("log")
    ax.set_title(f"Fashion-MNIST 32x32, {rows[0]['samples']} samples, {args.sampler} {args.steps} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


SAMPLER_TABLE = [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("plms", 20), ("euler", 20), ("dpmpp_2m", 20),
                 ("dpmpp_2m", 10)]


def samplers(args: argparse.Namespace) -> None:
    """FD and CPU seconds per image of each sampler on one model; ``--only ddpm:1000`` runs one row (so rows
    can run in parallel processes), ``--table`` prints the rows collected in runs/sweep/samplers.jsonl."""
    import torch

    torch.set_num_threads(args.threads)
    out = ROOT / "samplers.jsonl"
    if not args.table:
        run_dir = ROOT / f"ldm-f{args.f[0]}"
        ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        rows = [(name, int(steps)) for name, steps in (o.split(":") for o in args.only)] if args.only else SAMPLER_TABLE
        for name, steps in rows:
            value, per_image = sample_fd(ckpt, args.samples, name, steps, args.size)
            row = {"f": args.f[0], "checkpoint": str(ckpt), "sampler": name, "steps": steps,
                   "samples": args.samples, "fd": round(value, 3), "fd_size": args.size,
                   "cpu_s_per_image": round(per_image, 5)}
            print(json.dumps(row), flush=True)
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    order = {key: i for i, key in enumerate(SAMPLER_TABLE)}
    rows.sort(key=lambda r: order.get((r["sampler"], r["steps"]), len(order)))
    print("| model | sampler | steps | samples | FD | CPU s / image (1 thread) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| f={r['f']} {Path(r['checkpoint']).name} | {r['sampler']} | {r['steps']} | {r['samples']} | "
              f"{r['fd']:.1f} | {r['cpu_s_per_image']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("first-stages")
    p.add_argument("--f", type=int, nargs="+", default=[2, 4, 8])
    p.set_defaults(func=first_stages)
    p = sub.add_parser("train")
    p.add_argument("--f", type=int, nargs="+", default=list(FACTORS))
    p.add_argument("--cpu-minutes", type=float, default=10.0)
    p.add_argument("--checkpoints", type=int, default=4)
    p.set_defaults(func=train)
    for name, func in (("eval", evaluate), ("samplers", samplers)):
        p = sub.add_parser(name)
        p.add_argument("--f", type=int, nargs="+", default=list(FACTORS) if name == "eval" else [4])
        p.add_argument("--samples", type=int, default=2000)
        p.add_argument("--size", type=int, default=112, help="FD input size (EfficientNet-Lite0 at SIZE x SIZE)")
        p.add_argument("--threads", type=int, default=1)
        if name == "samplers":
            p.add_argument("--only", nargs="+", default=[], metavar="NAME:STEPS", help="run only these rows")
            p.add_argument("--table", action="store_true", help="only print the collected rows")
        if name == "eval":
            p.add_argument("--sampler", default="ddim")
            p.add_argument("--steps", type=int, default=10)
            p.add_argument("--every", type=int, default=1, help="evaluate every k-th checkpoint (and the last)")
        p.set_defaults(func=func)
    p = sub.add_parser("plot")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="docs/f-sweep.png")
    p.set_defaults(func=plot)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
