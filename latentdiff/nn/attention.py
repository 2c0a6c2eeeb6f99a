"""Multi-head attention through ``scaled_dot_product_attention``, the one attention kernel we call."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int = 1,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attend ``q`` (B, Lq, H*D) over ``k``/``v`` (B, Lk, H*D); returns (B, Lq, H*D).

    ``mask`` is a boolean (B, Lk) key mask, True where a key may be attended to (padding masked out).
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    q = q.view(b, lq, heads, d).transpose(1, 2)
    k = k.view(b, lk, heads, d).transpose(1, 2)
    v = v.view(b, lk, heads, d).transpose(1, 2)
    attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(b, lq, inner)
