"""Token merging for a UNet (ToMe for SD, Bolya & Hoffman 2023, arXiv:2303.17604): its transformers run their
self-attention on fewer tokens.

Inside ``token_merging(unet, ratio=0.5)`` the transformer blocks at the UNet's highest resolution (``max_downsample
= 1``; 2 the next level too, and so on) merge ``ratio`` of their tokens into similar ones before the self-attention
and copy the results back after it (``latentdiff.nn.tome`` says how). Self-attention's cost grows with the square
of the token count, and at SD's highest resolution it is the largest part of a step, so ``ratio=0.5`` takes three
quarters of that work away; cross-attention and the feed-forward are merged too when asked
(``merge_crossattn``, ``merge_mlp``: faster, and further from the exact image). The settings and their defaults
are tomesd's.

It is an approximation, off by default: the images change (docs/performance.md measures by how much). The weights
and the state dict stay as they are; leaving the block leaves the UNet exact. The random destinations come from a
CPU generator seeded with ``seed`` when the block is entered, drawn call by call, so a sampling run gives the same
image every time and on any device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from latentdiff.diffusion.unet import Downsample, ResBlock, UNetModel, Upsample
from latentdiff.nn.tome import TokenMerging
from latentdiff.nn.transformer import SpatialTransformer


def transformer_levels(unet: UNetModel) -> list[tuple[SpatialTransformer, int]]:
    """Every transformer of ``unet`` in the order the forward runs them, with its downsampling factor (1 at the
    input's resolution, 2 one level down, ...)."""
    found, ds = [], 1
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        for layer in block:
            resample = layer.h_upd if isinstance(layer, ResBlock) else layer
            if isinstance(layer, SpatialTransformer):
                found.append((layer, ds))
            elif isinstance(resample, Downsample):
                ds *= 2
            elif isinstance(resample, Upsample):
                ds //= 2
    return found


def _check_settings(ratio: float, max_downsample: int, sx: int, sy: int, seed: int) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"the token merging ratio must be a number in [0, 1), the fraction of tokens merged away; "
                         f"got {ratio!r}")
    for name, value in (("max_downsample", max_downsample), ("sx", sx), ("sy", sy)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"token merging's {name} must be a whole number >= 1, got {value!r}")
    if sx * sy < 2:
        raise ValueError("token merging needs cells of at least two tokens (sx * sy >= 2): one token per cell is "
                         "a destination, the others can be merged")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"token merging's seed must be a whole number, got {seed!r}")


@contextmanager
def token_merging(unet: nn.Module, ratio: float = 0.5, max_downsample: int = 1, sx: int = 2, sy: int = 2,
                  use_rand: bool = True, seed: int = 0, merge_attn: bool = True, merge_crossattn: bool = False,
                  merge_mlp: bool = False) -> Iterator[TokenMerging]:
    """Within the block, the transformers of ``unet`` (a ``UNetModel``) at downsampling factors up to
    ``max_downsample`` merge ``ratio`` of their tokens, in cells of ``sx`` x ``sy`` tokens, around the sub-layers
    chosen (see the module docstring); yields the settings, whose ``calls`` and ``removed`` count the merges and
    the tokens they removed. ``ratio`` 0 is the exact model."""
    if not isinstance(unet, UNetModel):
        raise TypeError(f"token_merging needs a UNetModel, got {type(unet).__name__}")
    _check_settings(ratio, max_downsample, sx, sy, seed)
    levels = transformer_levels(unet)
    if not levels:
        raise ValueError("this UNet has no transformer blocks (its attention is AttentionBlock, "
                         "use_spatial_transformer=False): token merging has nothing to merge; leave it off")
    chosen = [t for t, ds in levels if ds <= max_downsample]
    if not chosen:
        raise ValueError(f"this UNet has no transformer at a downsampling factor <= {max_downsample}: nothing to "
                         "merge (raise max_downsample, or leave token merging off)")
    if any(t.__dict__.get("_token_merging") is not None for t in chosen):
        raise RuntimeError("this UNet is already inside a token_merging block")
    merging = TokenMerging(float(ratio), sx, sy, use_rand, seed, merge_attn, merge_crossattn, merge_mlp)
    for transformer in chosen:
        transformer.__dict__["_token_merging"] = merging
    try:
        yield merging
    finally:
        for transformer in chosen:
            transformer.__dict__["_token_merging"] = None


__all__ = ["token_merging", "transformer_levels"]
