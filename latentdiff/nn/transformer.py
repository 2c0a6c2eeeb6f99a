"""The transformer layers of the Stable Diffusion UNet: cross-attention to the text, GEGLU feed-forward.

Layer and parameter names (``attn1``/``attn2``, ``to_q``/``to_k``/``to_v``/``to_out.0``, ``norm1..3``,
``ff.net.0.proj``/``ff.net.2``, ``proj_in``/``proj_out``) are those of CompVis ``ldm/modules/attention.py``
so Stable Diffusion v1/v2 checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from latentdiff.nn.attention import attention
from latentdiff.nn.layers import Normalize
from latentdiff.nn.onednn import Conv2d, Linear
from latentdiff.nn.tome import TokenMerge


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (B, L, query_dim) to ``context`` (B, Lc, context_dim), or to itself.

    Without a ``context`` it is self-attention, which is why ``context_dim`` defaults to ``query_dim``.
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if not context_dim else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.query_dim, self.context_dim = query_dim, context_dim
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` is a boolean (B, Lc) key mask: True keeps a context token, False ignores it."""
        context = x if context is None else context
        if context.shape[-1] != self.context_dim:
            raise ValueError(f"context has {context.shape[-1]} features per token, this attention layer "
                             f"expects {self.context_dim}")
        kept_none = None
        if mask is not None:
            if mask.shape != context.shape[:2]:
                raise ValueError(f"mask must have shape (batch, tokens) = {tuple(context.shape[:2])}, "
                                 f"got {tuple(mask.shape)}")
            mask = mask.to(torch.bool)
            # A sample that keeps no token at all has no defined softmax; backends disagree (NaN or 0),
            # so such samples attend to everything here and get a zero attention output below: the
            # same answer on every device.
            kept_none = ~mask.any(dim=1)
            if kept_none.any():
                mask = mask | kept_none[:, None]
            else:
                kept_none = None
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask)
        if kept_none is not None:
            out = out.masked_fill(kept_none[:, None, None], 0.0)
        return self.to_out(out)


class GEGLU(nn.Module):
    """A GELU-gated linear unit: one projection to twice the width, half of it gating the other half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU (or Linear + GELU) to ``mult * dim``, dropout, Linear back to ``dim_out``."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the context, GEGLU feed-forward.

    Without a context the second attention attends to the tokens themselves (a model trained without
    conditioning still has the layer, and its weights, in that case).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, use_checkpoint: bool = False) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, tokens: TokenMerge | None = None) -> torch.Tensor:
        """``tokens``: a token merge (``latentdiff.nn.tome``) the sub-layers it names run under (None: all tokens)."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, context, context_mask, tokens,
                                                     use_reentrant=False)
        return self._forward(x, context, context_mask, tokens)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None,
                 tokens: TokenMerge | None = None) -> torch.Tensor:
        context_mask = context_mask if context is not None else None
        if tokens is None:
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x), context, context_mask)
            return x + self.ff(self.norm3(x))
        x = x + tokens.around("self_attention", self.attn1, self.norm1(x))
        x = x + tokens.around("cross_attention", self.attn2, self.norm2(x), context, context_mask)
        return x + tokens.around("mlp", self.ff, self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, project in, ``depth`` blocks, project out, residual.

    The projections are 1x1 convolutions (SD v1) or, with ``use_linear``, Linear layers applied after the
    reshape to tokens (SD v2); the two hold the same numbers in differently shaped tensors. ``proj_out``
    starts at zero, so a freshly built block is the identity.
    """

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None, use_linear: bool = False, use_checkpoint: bool = False) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.in_channels, self.use_linear = in_channels, use_linear
        # CompVis normalises here with the first stage's GroupNorm (eps 1e-6), not the UNet's GroupNorm32.
        self.norm = Normalize(in_channels)
        if use_linear:
            self.proj_in = Linear(in_channels, inner_dim)
        else:
            self.proj_in = Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, dropout, context_dim, use_checkpoint=use_checkpoint)
            for _ in range(depth)
        )
        if use_linear:
            self.proj_out = Linear(inner_dim, in_channels)
        else:
            self.proj_out = Conv2d(inner_dim, in_channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        # Inside ``latentdiff.diffusion.tome.token_merging`` each block's sub-layers run on merged tokens.
        merging = self.__dict__.get("_token_merging")
        for block in self.transformer_blocks:
            x = block(x, context, context_mask, None if merging is None else merging.plan(x, h, w))
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + residual
