"""Our attention kernel for x86-64 CPUs with AVX-512 (``cpu_attention.c``): exact, on by default where it applies.

PyTorch's ``scaled_dot_product_attention`` on a CPU runs Stable Diffusion's self-attention (4096 tokens in heads of
40 at 512 px) at 100-120 GFLOP/s in fp32 and in bf16 alike on the 2-core AVX-512 machine: its bf16 path gains
nothing from the processor's bf16 dot products. The kernel in ``cpu_attention.c`` takes blocks of 48 queries
through the keys 128 at a time with the softmax taken online, the scores in fp32, the products in ``vdpbf16ps``
(bf16) or fused multiply-adds (fp32), and writes the heads straight into the (batch, tokens, heads x dim) layout
the projections read, without the transposes around SDPA: 0.43x SDPA's time there in bf16, 0.70x in fp32
(``benchmarks/cpu_kernels.py --parts attention``; docs/performance.md).

It is compiled on first use with the C compiler on the path (``$CC``, else ``cc``/``gcc``/``clang``) into
``$LATENTDIFF_CACHE`` (default ``~/.cache/latentdiff``)``/kernels``, written under a temporary name and renamed, so
concurrent processes are safe; a later process loads the built file. Where it cannot run, ``attention`` calls SDPA
as before: no AVX-512 (or, for bf16, no AVX-512 BF16); another OS or architecture; no compiler; a mask; gradients;
``torch.compile``; fp16; odd head widths, above 256 in bf16 or above 128 in fp32; calls under ``MIN_WORK``, where
starting its threads costs more than it saves. ``LATENTDIFF_ATTENTION=sdpa`` in the environment, or
``attention_kernel(False)`` (a context manager), sends every call to SDPA.

Exactness: fp32 outputs differ from SDPA's by float rounding (relative ~1e-6); bf16 outputs round the probabilities
to bf16 before the product with the values, as SDPA's flash kernel does, and agree with the exact result as closely
as SDPA's own bf16 output does (``tests/test_cpu_attention.py``).
"""

from __future__ import annotations

import ctypes
import logging
import os
from contextlib import AbstractContextManager
from contextvars import ContextVar
from pathlib import Path

import torch

from latentdiff.nn.ckernels import AVX512 as _FP32_OK
from latentdiff.nn.ckernels import AVX512_BF16 as _BF16_OK
from latentdiff.nn.ckernels import COMMON_FLAGS, load_once, switched
from latentdiff.nn.ckernels import build as _build
from latentdiff.nn.ckernels import compiler as _compiler

_SOURCE = Path(__file__).with_name("cpu_attention.c")
_FLAGS = [*COMMON_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
_SETTING = os.environ.get("LATENTDIFF_ATTENTION", "kernel").strip().lower()
if _SETTING not in ("kernel", "sdpa"):
    raise ImportError(f"LATENTDIFF_ATTENTION must be kernel (our CPU attention kernel where it applies) or sdpa "
                      f"(PyTorch's scaled_dot_product_attention everywhere), not {_SETTING!r}")
_ENABLED: ContextVar[bool] = ContextVar("latentdiff_attention_kernel", default=_SETTING == "kernel")
# Below this many multiply-adds per call (batch x heads x queries x keys x dim), SDPA: starting the kernel's threads
# and packing the keys cost more than they save (the bundled 32 px models' attention stays there).
MIN_WORK = 1 << 26
# In fp32 heads wider than this go to SDPA: at SD's 256-token, 160-wide self-attention the kernel took 1.01-1.21x
# SDPA's time (most likely its fp32 keys and values outgrowing the first-level cache), in bf16 0.53-0.64x.
FP32_MAX_WIDTH = 128
MAX_WIDTH = 256  # the widest head the kernel takes (MAX_D in cpu_attention.c)
logger = logging.getLogger(__name__)
_library: list[ctypes.CDLL | None] = []  # the loaded kernel (or None: cannot be had here), once looked for
_STRIDES = ctypes.c_int64 * 8  # batch and row strides of q, k, v and the output


def attention_kernel(enabled: bool) -> AbstractContextManager[None]:
    """Within the block, ``attention`` uses our CPU kernel where it applies (True) or always SDPA (False)."""
    return switched(_ENABLED, enabled)


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.latentdiff_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6 + [ctypes.POINTER(ctypes.c_int64), ctypes.c_float,
                                                                 ctypes.c_int]


def _load() -> ctypes.CDLL | None:
    """The compiled kernel, built if this machine has no copy yet; None (with one warning) where it cannot be had.
    Looked for once per process."""
    return load_once(_library, _SOURCE, _FLAGS, _compiler, _declare, _build, logger, "the CPU attention kernel",
                     "attention runs through PyTorch's scaled_dot_product_attention, slower "
                     "(LATENTDIFF_ATTENTION=sdpa silences this)")


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> bool:
    """Whether ``attend`` would run these (B, L, H*D) tensors (it compiles the kernel on the first yes)."""
    if torch.compiler.is_compiling() or not _ENABLED.get():
        return False
    if q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype) or q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return False
    if not (_FP32_OK if q.dtype == torch.float32 else q.dtype == torch.bfloat16 and _BF16_OK):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    b, lq, inner = q.shape
    if inner % heads or k.shape != (b, k.shape[1], inner) or v.shape != k.shape:
        return False
    d = inner // heads
    widest = MAX_WIDTH if q.dtype == torch.bfloat16 else FP32_MAX_WIDTH
    if d % 2 or d > widest or b * inner * lq * k.shape[1] < MIN_WORK:
        return False
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        return False
    return _load() is not None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention of ``q`` (B, Lq, H*D) over ``k``/``v`` (B, Lk, H*D), scale 1/sqrt(D); returns (B, Lq, H*D).
    Only where ``applies`` said yes."""
    lib = _load()
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    out = torch.empty(b, lq, inner, dtype=q.dtype)
    strides = _STRIDES(q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
                       out.stride(1))
    with torch.profiler.record_function("latentdiff::cpu_attention"):  # its name in a profile
        status = lib.latentdiff_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                          int(q.dtype == torch.bfloat16), b, lq, lk, heads, d, strides, d ** -0.5,
                                          torch.get_num_threads())
    if status == 2:
        raise MemoryError(f"the CPU attention kernel could not allocate its buffers ({b} x {heads} heads, "
                          f"{lk} keys of {d})")
    if status != 0:
        raise ValueError(f"the CPU attention kernel refused its arguments: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"{heads} heads")
    return out
