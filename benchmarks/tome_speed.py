"""Token merging (ToMe for SD) on SD v1.5's UNet: the time of one step and how far its output moves.

SD v1.5's UNet (``UNetConfig.sd_v1()``) with the seeded random weights of ``sd_vs_diffusers.build_ours("unet")``,
one evaluation of the classifier-free-guidance batch (2 x 4 x s/8 x s/8, 2 x 77 x 768 context) in fp32 under
``torch.inference_mode()``: exact, then inside ``latentdiff.diffusion.tome.token_merging`` at each ratio
(tomesd's other defaults: max_downsample 1, 2 x 2 cells, random destinations, self-attention only). Each setting
is called once to warm up, then ``--repeats`` times, the settings taking turns round by round so that a shared
machine's drift touches them alike; the speed-up divides best times. The difference columns compare the output
with the exact one (the norm of the difference over the exact output's, and the largest difference over the
largest value).

    python benchmarks/tome_speed.py                                  # 512 px, ratios 0.3 0.5, 2 threads
    python benchmarks/tome_speed.py --sizes 256 512 --ratios 0.3 0.5 0.7 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_vs_diffusers import build_ours  # noqa: E402

from latentdiff.diffusion.tome import token_merging  # noqa: E402


def timed(unet, inputs: tuple[torch.Tensor, ...], ratio: float, max_downsample: int) -> tuple[float, torch.Tensor]:
    """(seconds, output) of one UNet call on ``inputs`` (x, t, context), with token merging at ``ratio`` (0: exact)."""
    x, t, context = inputs
    merging = token_merging(unet, ratio=ratio, max_downsample=max_downsample) if ratio else nullcontext()
    with merging:
        start = time.perf_counter()
        out = unet(x, t, context=context)
        return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sides in pixels (default 512)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5],
                   help="token merging ratios besides the exact step (default 0.3 0.5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row, after one warm-up (default 3)")
    p.add_argument("--max-downsample", type=int, default=1, help="token_merging's max_downsample (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    unet = build_ours("unet", False)
    g = torch.Generator().manual_seed(4)
    print(f"SD v1.5 UNet, random weights, batch 2, fp32, {args.threads} threads, best of {args.repeats} after a "
          f"warm-up (the rows of a size alternating), max_downsample {args.max_downsample}; torch "
          f"{torch.__version__}\n")
    print("| size | ratio | step (s, best) | step (s, median) | speed-up (best) | rel. diff (norm) | rel. diff (max) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ratios = [0.0, *args.ratios]
    for size in args.sizes:
        inputs = (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0, 500.0]),
                  torch.randn(2, 77, 768, generator=g))
        times: dict[float, list[float]] = {ratio: [] for ratio in ratios}
        with torch.inference_mode():
            outputs = {ratio: timed(unet, inputs, ratio, args.max_downsample)[1] for ratio in ratios}  # warm-up
            for _ in range(args.repeats):  # round by round, so that the machine's drift touches every row alike
                for ratio in ratios:
                    times[ratio].append(timed(unet, inputs, ratio, args.max_downsample)[0])
        exact = outputs[0.0]
        for ratio in ratios:
            out = outputs[ratio]
            norm = float((out - exact).norm() / exact.norm())
            peak = float((out - exact).abs().max() / exact.abs().max())
            print(f"| {size} | {ratio:g} | {min(times[ratio]):.2f} | {statistics.median(times[ratio]):.2f} | "
                  f"{min(times[0.0]) / min(times[ratio]):.2f}x | {norm:.3f} | {peak:.3f} |", flush=True)


if __name__ == "__main__":
    main()
