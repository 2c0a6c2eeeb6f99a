"""The kernel measurements behind latentdiff/nn/onednn.py and docs/performance.md's "tried and not kept" list.

Best of 5 (after one warm-up) for each of SD v1.5's shapes at 512 px (batch 2):

- convolutions: ``F.conv2d`` against oneDNN on a weight packed once (``latentdiff.nn.onednn.Conv2d``'s path);
- linears: ``F.linear`` (MKL) against oneDNN on the weight as it is, and on a packed weight;
- attention: PyTorch's SDPA against per-head ``torch.mm`` products over query chunks of 128 (softmax between) and
  against our kernel (``latentdiff.nn.cpu_attention``), from and to the (batch, tokens, heads x width) layout the
  projections use, with each one's error relative to an fp64 SDPA; SD v1.5's self-attention at its three attention
  levels and in its middle block, and its cross-attention over 77 text tokens;
- int8 dynamic quantisation of one linear (``torch.ao.quantization.quantize_dynamic``) against fp32, with its error;
- Winograd (``latentdiff.nn.winograd``): 3x3 convolutions of SD v1.5's UNet (batch 2) and VAE decoder (batch 1)
  through F(4x4, 3x3) against oneDNN's direct convolution on a packed weight, each one's error relative to an fp64
  convolution, and whether ``Conv2d`` takes Winograd there by default. In bf16 the Winograd column is the fp32
  transforms and products on the bf16 values (converted in and out), what keeping bf16's accuracy would take.

    python benchmarks/cpu_kernels.py              # fp32 and bf16, a few minutes on 2 cores
    python benchmarks/cpu_kernels.py --dtype fp32
    python benchmarks/cpu_kernels.py --dtype bf16 --parts conv linear
    python benchmarks/cpu_kernels.py --parts attention
    python benchmarks/cpu_kernels.py --parts winograd --dtype fp32
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch.ao.quantization import quantize_dynamic

from latentdiff.nn import cpu_attention, winograd
from latentdiff.nn.onednn import Conv2d

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONVS = [(320, 64, 3), (640, 32, 3), (1280, 16, 3), (1280, 8, 3), (320, 64, 1), (640, 32, 1), (1280, 16, 1),
         (1280, 8, 1)]  # channels, side, kernel
LINEARS = [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320), (2048, 640, 5120), (4096, 4096, 4096)]
ATTENTION = [(4096, 4096, 8, 40), (1024, 1024, 8, 80), (256, 256, 8, 160), (4096, 77, 8, 40),
             (1024, 77, 8, 80), (256, 77, 8, 160), (64, 64, 8, 160)]  # queries, keys, heads, width (the last two:
# below cpu_attention.MIN_WORK, where attention() calls SDPA; the kernel is timed by calling it directly)
WINOGRAD = [(2, 320, 320, 64), (2, 640, 640, 32), (2, 1280, 640, 32), (2, 1280, 1280, 32), (2, 1280, 1280, 16),
            (1, 512, 512, 64), (1, 512, 512, 128), (1, 256, 256, 256), (1, 128, 128, 512)]  # batch, in, out, side


def best(fn, *args, repeats: int = 5, **kwargs) -> float:
    """Seconds of the fastest of ``repeats`` calls ``fn(*args, **kwargs)``, after one warm-up call."""
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def convolutions(dtype: torch.dtype) -> None:
    print("\n| conv (batch 2) | F.conv2d GFLOP/s | oneDNN packed GFLOP/s | rel. diff |\n|---|---:|---:|---:|")
    for channels, side, k in CONVS:
        x = torch.randn(2, channels, side, side).to(dtype)
        w, b = (0.02 * torch.randn(channels, channels, k, k)).to(dtype), torch.randn(channels).to(dtype)
        pad = [k // 2, k // 2]
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), pad, [1, 1], [1, 1], 1, list(x.shape))
        ours = (torch.ops.mkldnn._convolution_pointwise, x, packed, b, pad, [1, 1], [1, 1], 1, "none", [], "")
        gflop = 2 * 2 * side * side * channels * channels * k * k / 1e9
        plain_s = best(F.conv2d, x, w, b, padding=k // 2)
        print(f"| {k}x{k}, {channels} ch, {side}x{side} | {gflop / plain_s:.0f} | {gflop / best(*ours):.0f} | "
              f"{rel(ours[0](*ours[1:]), F.conv2d(x.float(), w.float(), b.float(), padding=k // 2)):.1e} |")


def linears(dtype: torch.dtype) -> None:
    print("\n| linear M x K x N | F.linear GFLOP/s | oneDNN GFLOP/s | oneDNN packed GFLOP/s |\n|---|---:|---:|---:|")
    for m, k, n in LINEARS:
        x, w = torch.randn(m, k).to(dtype), (0.05 * torch.randn(n, k)).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        gflop = 2 * m * k * n / 1e9
        onednn = torch.ops.mkldnn._linear_pointwise
        rates = [gflop / best(F.linear, x, w), gflop / best(onednn, x, w, None, "none", [], ""),
                 gflop / best(onednn, x, packed, None, "none", [], "")]
        print(f"| {m} x {k} x {n} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def tokens_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    return tokens_first(F.scaled_dot_product_attention(*(heads_first(x, heads) for x in (q, k, v))))


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, chunk: int = 128) -> torch.Tensor:
    q, k, v = (heads_first(x, heads) for x in (q, k, v))
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            qs, kt, vs = q[b, h] * scale, k[b, h].t(), v[b, h]
            for i in range(0, q.shape[2], chunk):
                torch.mm(torch.softmax(torch.mm(qs[i:i + chunk], kt), -1), vs, out=out[b, h, i:i + chunk])
    return tokens_first(out)


def attention(dtype: torch.dtype) -> None:
    ours_ok = cpu_attention.applies(*(torch.zeros(1, 4096, 256, dtype=dtype) for _ in range(3)), 8)
    print("\n| attention (batch 2) | SDPA GFLOP/s (rel. error) | chunked mm GFLOP/s (rel. error) | ours GFLOP/s "
          "(rel. error) | **ours / SDPA time** |\n|---|---:|---:|---:|---:|")
    for queries, keys, heads, width in ATTENTION:
        q, k, v = (torch.randn(2, n, heads * width).to(dtype) for n in (queries, keys, keys))
        exact = sdpa(q.double(), k.double(), v.double(), heads)
        gflop = 2 * heads * queries * keys * width * 4 / 1e9
        sdpa_s = best(sdpa, q, k, v, heads, repeats=3)
        mm_s = best(chunked_attention, q, k, v, heads, repeats=3)
        row = (f"| {queries} x {keys} tokens, {heads} heads of {width} | {gflop / sdpa_s:.0f} "
               f"({rel(sdpa(q, k, v, heads), exact):.0e}) | {gflop / mm_s:.0f} "
               f"({rel(chunked_attention(q, k, v, heads), exact):.0e}) |")
        if ours_ok:
            ours_s = best(cpu_attention.attend, q, k, v, heads, repeats=3)
            row += (f" {gflop / ours_s:.0f} ({rel(cpu_attention.attend(q, k, v, heads), exact):.0e}) | "
                    f"**{ours_s / sdpa_s:.2f}** |")
        else:
            row += " (not available here) | |"
        print(row)


def int8() -> None:
    linear = torch.nn.Sequential(torch.nn.Linear(320, 2560)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantised = quantize_dynamic(linear, {torch.nn.Linear}, dtype=torch.qint8)
    x = torch.randn(8192, 320)
    fp32_s, int8_s = best(linear, x), best(quantised, x)
    print(f"\nint8 dynamic, 8192 x 320 x 2560: fp32 nn.Linear {fp32_s * 1e3:.0f} ms, int8 {int8_s * 1e3:.0f} ms "
          f"({fp32_s / int8_s:.2f}x), rel. error {rel(quantised(x), linear(x)):.1e}")


def winograd_convolutions(dtype: torch.dtype) -> None:
    print("\n| 3x3 conv | direct (oneDNN, packed) ms (rel. error) | Winograd ms (rel. error) | **Winograd / direct** "
          "| taken by default |\n|---|---:|---:|---:|---|")
    if winograd._load() is None:
        print("| (no C compiler here: Winograd's transforms cannot be built) | | | | |")
        return
    for n, c, k, side in WINOGRAD:
        x = torch.randn(n, c, side, side).to(dtype)
        conv = Conv2d(c, k, 3, padding=1).requires_grad_(False)
        w, b = (conv.weight / 3).to(dtype), conv.bias.to(dtype)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        direct = (torch.ops.mkldnn._convolution_pointwise, x, packed, b, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        if dtype is torch.float32:
            wino = (winograd.convolve, x, w, b)
        else:  # the fp32 transforms and products on bf16 values, converted in and out
            wino = (lambda *a: winograd.convolve(*(t.float() for t in a)).to(dtype), x, w, b)
        exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
        direct_s, wino_s = best(*direct, repeats=3), best(*wino, repeats=3)
        default = winograd.applies(conv, x.float()) and dtype is torch.float32
        print(f"| {n} x {c} -> {k} ch, {side}x{side} | {direct_s * 1e3:.1f} ({rel(direct[0](*direct[1:]), exact):.0e}) "
              f"| {wino_s * 1e3:.1f} ({rel(wino[0](*wino[1:]), exact):.0e}) | **{wino_s / direct_s:.2f}** | "
              f"{'yes' if default else 'no'} |")


PARTS = {"conv": convolutions, "linear": linears, "attention": attention, "int8": int8,
         "winograd": winograd_convolutions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.inference_mode():
        for name in DTYPES if args.dtype == "both" else [args.dtype]:
            print(f"\n## {name}, {args.threads} threads, torch {torch.__version__}")
            for part in args.parts:
                if part != "int8":
                    PARTS[part](DTYPES[name])
        if "int8" in args.parts:
            int8()


if __name__ == "__main__":
    main()
