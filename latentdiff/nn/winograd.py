"""3x3 convolutions by Winograd's F(4x4, 3x3) for fp32 inference on CPUs: a quarter of the multiplications, on by
default where it pays.

A 3x3 convolution (stride 1, padding 1) of 4x4 output tiles is 36 matrix products between transformed 6x6 input
patches and transformed weights (Lavin & Gray 2016), where the direct convolution does 144 multiply-adds per output
channel pair and tile. ``winograd.c`` holds the transforms (compiled on first use, like the attention kernel, by
``latentdiff.nn.ckernels``); the 36 products are one ``torch.bmm``. Weights are transformed at every call, so no
second copy of them is held; the tiles go in bands and the output channels in blocks, so no buffer exceeds
``BUDGET`` bytes, and the three buffers are kept per thread (see ``_buffer``). The input is read in any strides and
the output written in the input's memory format (oneDNN runs our models channels-last; mixing layouts costs copies).

Where it runs: float32 (in bf16 the products would have to be fp32 to keep bf16's accuracy, which made them slower
than oneDNN's bf16 convolution on the 2-core AVX-512 machine), inference (no gradient), a CPU, the C compiler
on the path, a 3x3 kernel with stride 1, padding 1, dilation 1 and no groups, at least ``MIN_CHANNELS`` input and
output channels, ``MIN_TILES`` tiles and ``MIN_WORK`` multiply-adds (below them the transforms cost more than they
save: ``benchmarks/cpu_kernels.py --parts winograd``). ``LATENTDIFF_WINOGRAD=0`` or ``winograd_kernels(False)`` (a
context manager) switch it off.

Exactness: the same sums, reassociated; on SD's shapes the error against an fp64 convolution is 8e-6 to 1e-5 of the
largest output, against 2-3e-6 for oneDNN's direct convolution (``benchmarks/cpu_kernels.py --parts winograd``;
``tests/test_winograd.py`` bounds it at 2e-5), within the 1e-4 that issue 15 allows an exact speed-up in fp32.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from contextlib import AbstractContextManager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

from latentdiff.nn.ckernels import COMMON_FLAGS, load_once, switched, vector_flags
from latentdiff.nn.ckernels import build as _build
from latentdiff.nn.ckernels import compiler as _compiler

_SOURCE = Path(__file__).with_name("winograd.c")
_FLAGS = [*COMMON_FLAGS, *vector_flags()]
_SETTING = os.environ.get("LATENTDIFF_WINOGRAD", "1").strip().lower()
if _SETTING not in ("0", "1"):
    raise ImportError(f"LATENTDIFF_WINOGRAD must be 1 (Winograd's F(4x4, 3x3) for fp32 3x3 convolutions where it "
                      f"pays) or 0 (oneDNN's direct convolution everywhere), not {_SETTING!r}")
_ENABLED: ContextVar[bool] = ContextVar("latentdiff_winograd", default=_SETTING == "1")
BUDGET = 32 << 20  # bytes: the largest buffer (weights, input tiles or products) one call allocates
MIN_CHANNELS = 128  # input and output channels, each
MIN_TILES = 128  # 4x4 output tiles in the batch
MIN_WORK = 1 << 31  # multiply-adds of the direct convolution
logger = logging.getLogger(__name__)
_library: list[ctypes.CDLL | None] = []  # the loaded transforms (or None: cannot be had here), once looked for
_VOID = ctypes.c_void_p
_STRIDES = ctypes.c_int64 * 4
_workspace = threading.local()  # each thread's buffers (see _buffer)


def winograd_kernels(enabled: bool) -> AbstractContextManager[None]:
    """Within the block, fp32 3x3 convolutions take Winograd's F(4x4, 3x3) where it pays (True) or never (False)."""
    return switched(_ENABLED, enabled)


def _declare(lib: ctypes.CDLL) -> None:
    i = ctypes.c_int
    strides = ctypes.POINTER(ctypes.c_int64)
    lib.latentdiff_winograd_weight.argtypes = [_VOID, i, i, i, i, _VOID, i]
    lib.latentdiff_winograd_input.argtypes = [_VOID, strides, i, i, i, i, i, i, _VOID, i]
    lib.latentdiff_winograd_output.argtypes = [_VOID, _VOID, i, i, i, i, i, i, i, i, _VOID, strides, i]
    for fn in (lib.latentdiff_winograd_weight, lib.latentdiff_winograd_input, lib.latentdiff_winograd_output):
        fn.restype = i


def _load() -> ctypes.CDLL | None:
    """The compiled transforms, built if this machine has no copy yet; None (with one warning) where they cannot be had.
    Looked for once per process."""
    return load_once(_library, _SOURCE, _FLAGS, _compiler, _declare, _build, logger, "the Winograd transforms",
                     "3x3 convolutions run without Winograd's transforms, slower "
                     "(LATENTDIFF_WINOGRAD=0 silences this)")


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``convolve`` would run this layer on ``x`` (it compiles the transforms on the first yes). The caller
    has checked the rest of an inference call on a CPU (no gradient, plain tensors, no autocast or tracing)."""
    if not _ENABLED.get() or torch.compiler.is_compiling() or x.dtype is not torch.float32 or x.dim() != 4:
        return False
    if (tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (1, 1) or conv.padding != (1, 1)
            or tuple(conv.dilation) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"):
        return False
    n, c, h, w = x.shape
    k = conv.out_channels
    if min(c, k) < MIN_CHANNELS or n * ((h + 3) // 4) * ((w + 3) // 4) < MIN_TILES or n * h * w * c * k * 9 < MIN_WORK:
        return False
    return _load() is not None


def _buffer(name: str, numel: int) -> torch.Tensor:
    """This thread's buffer ``name`` (fp32) of at least ``numel`` elements, kept between calls: allocating them at
    every call left the C heap holding ~0.5 GB of freed blocks after a 512 px VAE decode (fragmentation). At most
    three of ``BUDGET`` bytes per thread that ran a Winograd convolution."""
    held = getattr(_workspace, name, None)
    if held is None or held.numel() < numel:
        setattr(_workspace, name, None)  # the old one goes first
        held = torch.empty(numel, dtype=torch.float32)
        setattr(_workspace, name, held)
    return held[:numel]


def _call(status: int, what: str) -> None:
    if status == 2:
        raise MemoryError(f"the Winograd {what} transform could not allocate its row buffers")
    if status != 0:
        raise ValueError(f"the Winograd {what} transform refused its arguments")


def convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3x3 convolution (stride 1, padding 1) of ``x`` (N, C, H, W) by ``weight`` (K, C, 3, 3), plus ``bias``;
    only where ``applies`` said yes."""
    lib = _load()
    strides = _STRIDES(*x.stride())  # contiguous or channels-last alike: read in place
    weight = weight.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    n, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = (h + 3) // 4, (w + 3) // 4
    threads = torch.get_num_threads()
    # the output in the input's memory format, as oneDNN's convolution gives it: a channels-last network (oneDNN
    # picks that layout for convolutions whose weights are ambiguous, as the VAE's 1x1 first one) stays one
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    y = torch.empty(n, k, h, w, dtype=x.dtype, memory_format=layout)
    out_strides = _STRIDES(*y.stride())
    # output channels per block and tile rows per band, so that no buffer exceeds BUDGET (at least 16 / 1)
    k_block = min(k, max(16, BUDGET // (36 * 4 * c) // 16 * 16))
    rows = max(1, BUDGET // (36 * 4 * max(c, k_block) * tw))
    bands = [(g, min(n * th, g + rows)) for g in range(0, n * th, rows)]
    weights = _buffer("weights", 36 * k_block * c)
    tiles = _buffer("tiles", 36 * c * min(n * th, rows) * tw)
    products = _buffer("products", 36 * k_block * min(n * th, rows) * tw)
    with torch.profiler.record_function("latentdiff::winograd"):  # its name in a profile
        for k0 in range(0, k, k_block):
            k1 = min(k, k0 + k_block)
            u = weights[:36 * (k1 - k0) * c].view(36, k1 - k0, c)
            _call(lib.latentdiff_winograd_weight(weight.data_ptr(), k, c, k0, k1, u.data_ptr(), threads), "weight")
            for g0, g1 in bands:
                t = (g1 - g0) * tw
                v = tiles[:36 * c * t].view(36, c, t)
                if k0 == 0 or len(bands) > 1:
                    _call(lib.latentdiff_winograd_input(x.data_ptr(), strides, n, c, h, w, g0, g1, v.data_ptr(),
                                                        threads), "input")
                m = products[:36 * (k1 - k0) * t].view(36, k1 - k0, t)
                torch.bmm(u, v, out=m)
                _call(lib.latentdiff_winograd_output(m.data_ptr(), None if bias is None else bias.data_ptr(), n, k, h,
                                                     w, k0, k1, g0, g1, y.data_ptr(), out_strides, threads), "output")
    return y
