"""Where SD v1.5's UNet step (or its VAE decode) spends its time on this CPU, against what the hardware allows.

Three tables:

1. **Work**: the floating-point operations of one UNet step (batch 2, as with classifier-free guidance), or with
   ``--model vae`` of decoding one latent, by kind: convolutions, linears (the transformers' projections and MLPs),
   attention (the two products per head), counted on the meta device from the layers' real shapes.
2. **Peak**: the best rate this machine reaches on a large dense product (a 4096^3 matrix product, a 3x3
   1280-channel convolution at 16x16 and a 3x3 256-channel one at 256x256 as in the VAE's fine levels, all through
   oneDNN), fp32 and bf16. Work / peak is a lower bound for any implementation that does the same arithmetic.
3. **Profile**: one step of our UNet or one decode of our VAE (random weights, ``latentdiff.nn.onednn``'s kernels
   and ``latentdiff.nn.cpu_attention``'s as shipped, or ``--plain`` for PyTorch's own) under ``torch.profiler``:
   seconds and GFLOP/s per kind.

    python benchmarks/unet_roofline.py --size 512 --dtype fp32     # about a minute on 2 cores
    python benchmarks/unet_roofline.py --size 512 --dtype bf16
    python benchmarks/unet_roofline.py --model vae --size 512 --dtype fp32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentdiff.autoencoder.model import Autoencoder, AutoencoderConfig  # noqa: E402
from latentdiff.config import from_dict, read_yaml  # noqa: E402
from latentdiff.diffusion.unet import UNetConfig, UNetModel  # noqa: E402
from latentdiff.nn import layers, transformer, winograd  # noqa: E402
from latentdiff.nn.attention import attention  # noqa: E402
from latentdiff.nn.cpu_attention import attention_kernel  # noqa: E402
from latentdiff.nn.onednn import onednn_kernels  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VAE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sd-kl-f8.yaml"
KINDS = {  # profiler op names -> kind
    "mkldnn::_convolution_pointwise": "conv", "aten::mkldnn_convolution": "conv",
    "mkldnn::_linear_pointwise": "linear", "aten::addmm": "linear", "aten::mm": "linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention", "aten::bmm": "attention",
    "aten::baddbmm": "attention", "aten::_softmax": "attention", "latentdiff::cpu_attention": "attention",
    "latentdiff::winograd": "conv",  # with everything under it (its products are an aten::bmm)
}
WINOGRAD = "latentdiff::winograd"


def build(model: str) -> nn.Module:
    """SD v1.5's UNet or its VAE (KL, f = 8), on the current default device."""
    if model == "vae":
        return Autoencoder(from_dict(AutoencoderConfig, read_yaml(VAE_CONFIG)["model"]))
    return UNetModel(UNetConfig.sd_v1())


def run(net: nn.Module, size: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """One UNet step on a CFG batch of 2, or one decode of one latent, on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1 if isinstance(net, Autoencoder) else 2, 4, size // 8, size // 8, generator=g)
    if isinstance(net, Autoencoder):
        return net.decode(latent.to(device, dtype))
    ctx = torch.randn(2, 77, 768, generator=g)
    return net(latent.to(device, dtype), torch.tensor([500, 500], device=device), context=ctx.to(device, dtype))


def work(model: str, size: int) -> tuple[dict[str, float], float, tuple[int, int]]:
    """GFLOP of one UNet step (CFG batch) or one VAE decode by kind (2 per multiply-add), the GFLOP of the
    convolutions among them that take Winograd's F(4x4, 3x3) in fp32 (counted as the direct convolution's), and
    (how many convolutions take it, how many are 3x3)."""
    with torch.device("meta"):
        net = build(model)
    flops = {"conv": 0.0, "linear": 0.0, "attention": 0.0}
    through_winograd = [0.0]
    counts = [0, 0]  # taking Winograd, 3x3

    def count(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            done = 2 * out.numel() * module.in_channels // module.groups * kh * kw
            flops["conv"] += done
            counts[1] += module.kernel_size == (3, 3)
            if winograd.applies(module, inputs[0]):  # the shape decides (the caller's checks are for real calls)
                through_winograd[0] += done
                counts[0] += 1
        else:
            flops["linear"] += 2 * out.numel() * module.in_features

    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(count)
    callers = {module: module.attention for module in (transformer, layers)}  # the UNet's and the VAE's

    def counted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 1, mask=None) -> torch.Tensor:
        flops["attention"] += 4 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
        return attention(q, k, v, heads, mask)

    for module in callers:
        module.attention = counted
    try:
        run(net, size, torch.float32, "meta")
    finally:
        for module, original in callers.items():
            module.attention = original
    return {k: v / 1e9 for k, v in flops.items()}, through_winograd[0] / 1e9, (counts[0], counts[1])


def _best(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _conv_rate(channels: int, side: int, batch: int, dtype: torch.dtype, g: torch.Generator) -> float:
    """GFLOP/s of a 3x3 convolution, channels -> channels, on side x side maps, through oneDNN with a packed
    weight."""
    conv = torch.randn(channels, channels, 3, 3, generator=g).to(dtype)
    x = torch.randn(batch, channels, side, side, generator=g).to(dtype)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(conv.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, list(x.shape))
    with torch.inference_mode():
        seconds = _best(lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [1, 1], [1, 1], 1,
                                                                         "none", [], ""), repeats=3)
    return 2 * batch * side * side * channels * channels * 9 / seconds / 1e9


def peak(dtype: torch.dtype) -> dict[str, float]:
    """GFLOP/s of a 4096^3 matrix product and of 3x3 convolutions (1280 channels at 16x16, batch 2; 256 channels at
    256x256, batch 1), oneDNN."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(4096, 4096, generator=g).to(dtype), torch.randn(4096, 4096, generator=g).to(dtype)
    with torch.inference_mode():
        gemm = _best(lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""))
        plain = _best(lambda: F.linear(a, w))
    return {"matmul 4096^3 (oneDNN)": 2 * 4096 ** 3 / gemm / 1e9,
            "matmul 4096^3 (F.linear)": 2 * 4096 ** 3 / plain / 1e9,
            "conv 3x3 1280ch 16x16 (oneDNN, packed)": _conv_rate(1280, 16, 2, dtype, g),
            "conv 3x3 256ch 256x256 (oneDNN, packed)": _conv_rate(256, 256, 1, dtype, g)}


def step_profile(model: str, size: int, dtype: torch.dtype, plain: bool) -> tuple[float, dict[str, float]]:
    """(wall seconds of one step or decode, self-CPU seconds by kind) for our model with random weights."""
    torch.manual_seed(0)
    net = build(model).eval().requires_grad_(False).to(dtype)
    with torch.inference_mode(), onednn_kernels(not plain), attention_kernel(not plain):
        run(net, size, dtype)  # warm-up: packs the convolution weights
        start = time.perf_counter()
        run(net, size, dtype)
        wall = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(net, size, dtype)
    seconds: dict[str, float] = {"conv": 0.0, "linear": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.events():
        seconds[_kind(event)] += event.self_cpu_time_total / 1e6
    return wall, seconds


def _kind(event) -> str:
    """An event's kind: its own name's, or a convolution's for everything inside a Winograd convolution."""
    parent = event
    while parent is not None:
        if parent.name == WINOGRAD:
            return "conv"
        parent = parent.cpu_parent
    return KINDS.get(event.name, "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["unet", "vae"], default="unet",
                        help="a UNet step (batch 2, the default) or a VAE decode (one latent)")
    parser.add_argument("--size", type=int, default=512, help="image side (default 512: a 64x64 latent)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--plain", action="store_true",
                        help="profile PyTorch's plain kernels (LATENTDIFF_ONEDNN=0, LATENTDIFF_ATTENTION=sdpa)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    gflop, winograd_gflop, (taken, three) = work(args.model, args.size)
    total = sum(gflop.values())
    rates = peak(dtype)
    best = max(rates.values())
    what = "VAE decode, 1 latent" if args.model == "vae" else "UNet step, batch 2"
    print(f"SD v1.5 {what}, {args.size} px, {args.dtype}, {args.threads} threads, torch {torch.__version__}")
    print("\n| kind | GFLOP | share |\n|---|---:|---:|")
    for kind, value in gflop.items():
        print(f"| {kind} | {value:.1f} | {value / total:.0%} |")
    print(f"| total | {total:.1f} | |")
    print("\n| dense product | GFLOP/s |\n|---|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} |")
    print(f"\nlower bound at the best rate: {total / best:.2f} s")
    if args.dtype == "fp32" and not args.plain:  # Winograd multiplies a quarter as often
        fewer = total - 0.75 * winograd_gflop
        print(f"convolutions through Winograd's F(4x4, 3x3) (fp32): {taken} of the {three} 3x3 ones, "
              f"{winograd_gflop:.1f} GFLOP of the direct "
              f"arithmetic, done in a quarter of it: {fewer:.1f} GFLOP in all, lower bound {fewer / best:.2f} s")
    wall, seconds = step_profile(args.model, args.size, dtype, args.plain)
    kernels = "plain kernels" if args.plain else "oneDNN, our attention kernel, Winograd in fp32"
    print(f"\nours ({kernels}): {wall:.2f} s wall\n")
    print("| kind | seconds (profiled) | GFLOP/s |\n|---|---:|---:|")
    for kind, value in seconds.items():
        rate = f"{gflop[kind] / value:.0f}" if kind in gflop and value > 0 else ""
        print(f"| {kind} | {value:.2f} | {rate} |")


if __name__ == "__main__":
    main()
