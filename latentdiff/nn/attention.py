"""Multi-head attention: our CPU kernel (``cpu_attention``) where it applies, else ``scaled_dot_product_attention``.

On an x86-64 CPU with AVX-512, inference calls without a mask that are large enough (Stable Diffusion's self- and
cross-attention at its finest levels) run through ``latentdiff.nn.cpu_attention``: exact up to float rounding, in
0.43x SDPA's time for SD's 4096-token self-attention in bf16 and 0.70x in fp32 (``benchmarks/cpu_kernels.py
--parts attention``). Everything else (gradients, masks, GPUs, fp16, ``torch.compile``, small problems) calls
PyTorch's SDPA.

``attention_slicing(n)`` makes every call inside its ``with`` block attend ``n`` queries at a time: the result is
the same (each query's softmax is its own), and where a backend materialises the (queries x keys) score matrix,
its peak memory shrinks by the number of slices. That matrix is what dominates the memory of Stable Diffusion's
self-attention at high resolution (4096 x 4096 per head at 512 px, 16384 x 16384 at 1024 px).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from latentdiff.nn import cpu_attention

_QUERY_CHUNK: ContextVar[int | None] = ContextVar("attention_query_chunk", default=None)


@contextmanager
def attention_slicing(query_chunk: int | None) -> Iterator[None]:
    """Within the block, ``attention`` processes at most ``query_chunk`` queries per kernel call (None: all)."""
    if query_chunk is not None and query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive number of queries, got {query_chunk}")
    token = _QUERY_CHUNK.set(query_chunk)
    try:
        yield
    finally:
        _QUERY_CHUNK.reset(token)


def _query_chunk() -> int | None:
    """The setting of ``attention_slicing`` here. Under ``torch.compile`` none: dynamo cannot trace a ``ContextVar``
    (a graph break at every attention), and a compiled graph attends all queries at once."""
    return None if torch.compiler.is_compiling() else _QUERY_CHUNK.get()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 1,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attend ``q`` (B, Lq, H*D) over ``k``/``v`` (B, Lk, H*D); returns (B, Lq, H*D).

    ``mask`` is a boolean (B, Lk) key mask, True where a key may be attended to (padding masked out).
    ``attention_slicing`` does not apply to our CPU kernel, which never holds more than 48 x 128 scores per thread.
    """
    if mask is None and cpu_attention.applies(q, k, v, heads):
        return cpu_attention.attend(q, k, v, heads)
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k = k.view(b, lk, heads, d).transpose(1, 2)
    v = v.view(b, lk, heads, d).transpose(1, 2)
    attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
    chunk = _query_chunk()
    if chunk is None or chunk >= lq:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v, attn_mask=attn_mask)
                         for i in range(0, lq, chunk)], dim=2)
    return out.transpose(1, 2).reshape(b, lq, inner)
