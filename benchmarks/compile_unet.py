"""``torch.compile`` on SD v1.5's UNet: compile time, speed against our eager forward, and output difference.

The UNet is built as ``benchmarks/sd_vs_diffusers.py`` builds it (SD v1.5's shape, seeded random weights); one
step is the classifier-free-guidance batch (2 x 4 x s/8 x s/8, 2 x 77 x 768 context) under ``torch.no_grad()``.
For each (size, dtype): the eager forward (our default kernels: oneDNN with packed convolution weights on a CPU)
best of ``--repeats`` after a warm-up, then ``torch.compile(unet, mode=...)`` with inductor's ``freezing`` (weights
folded in as constants, convolution weights pre-packed), its first call (the compile time), the best of
``--repeats`` compiled calls, and the eager forward again (the machine drifts: the ratio uses the better eager
figure). Each configuration runs in a fresh process, so that compiled code and caches do not carry over (inductor's
on-disk cache is pointed at a fresh folder, so the compile time is a cold one).

    python benchmarks/compile_unet.py --sizes 256 --dtype fp32 bf16          # about 6 minutes on 2 cores
    python benchmarks/compile_unet.py --sizes 512 --dtype bf16 --mode max-autotune
    python benchmarks/compile_unet.py --device cuda --dtype fp16 bf16 --sizes 512   # a GPU machine
    python benchmarks/compile_unet.py --tiny --sizes 64 --repeats 1           # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from sd_vs_diffusers import _inputs, build_ours, configs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def worker(spec: dict) -> dict:
    """One configuration in this process: eager, compile, compiled, eager again."""
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), DTYPES[spec["dtype"]]
    inductor_config.freezing = spec["freezing"]
    unet = build_ours("unet", spec["tiny"]).to(device, dtype)
    latent = spec["size"] // 8
    context_dim = configs(spec["tiny"])[0].context_dim
    x = _inputs((2, 4, latent, latent), dtype, 0).to(device)
    t = torch.tensor([500.0, 500.0], device=device)
    context = _inputs((2, 77, context_dim), dtype, 1).to(device)
    out: dict = {}
    with torch.no_grad():
        timed(lambda: unet(x, t, context=context), device)
        eager = [timed(lambda: unet(x, t, context=context), device) for _ in range(spec["repeats"])]
        reference = unet(x, t, context=context).float()
        compiled = torch.compile(unet, mode=None if spec["mode"] == "default" else spec["mode"])
        out["compile_s"] = timed(lambda: compiled(x, t, context=context), device)
        out["compiled_s"] = min(timed(lambda: compiled(x, t, context=context), device)
                                for _ in range(spec["repeats"]))
        got = compiled(x, t, context=context).float()
        eager += [timed(lambda: unet(x, t, context=context), device) for _ in range(spec["repeats"])]
    out["eager_s"] = min(eager)
    out["rel_diff"] = float((got - reference).abs().max() / reference.abs().max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--mode", choices=["default", "max-autotune", "reduce-overhead"], default="default")
    parser.add_argument("--no-freezing", dest="freezing", action="store_false", help="leave inductor's freezing off")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a small SD-structured UNet (a smoke run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"torch {torch.__version__}, {args.device}, {args.threads} threads, mode {args.mode}, "
          f"freezing {args.freezing}, best of {args.repeats}\n")
    print("| UNet step | eager s | compile (first call) s | compiled s | compiled / eager | rel. diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        for dtype in args.dtype:
            spec = {"size": size, "dtype": dtype, "mode": args.mode, "freezing": args.freezing, "tiny": args.tiny,
                    "device": args.device, "threads": args.threads, "repeats": args.repeats}
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                      capture_output=True, text=True, cwd=Path(__file__).parent)
            if done.returncode != 0:
                raise SystemExit(f"{size} px {dtype} failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {size} px {dtype} | {r['eager_s']:.3f} | {r['compile_s']:.1f} | {r['compiled_s']:.3f} | "
                  f"{r['compiled_s'] / r['eager_s']:.2f} | {r['rel_diff']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
