"""Decode a large latent in overlapping tiles, blended with linear ramps so that no seam shows.

The decoder's memory grows with the image (its convolutions at full resolution, its middle attention quadratically
in the latent's area); decoding tiles bounds it. Each tile is decoded with a margin of context that is cropped
away, so its convolutions see the real neighbourhood rather than zero padding. Tiles overlap by ``overlap`` latent
pixels, and in each overlap the two decoded tiles are cross-faded with weights that ramp linearly from one to the
other, so the result is continuous. The decoder's GroupNorm statistics and middle attention are per tile (as in
diffusers' tiled VAE), so a tiled decode is close to, not equal to, a full one; larger tiles bring it closer.

``automatic_tile`` decides when a pipeline tiles without being asked: only where a whole decode would not fit in the
memory available, so that a long sampling run is not lost to running out of memory at its last step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentdiff.nn.winograd import BUDGET as WINOGRAD_BUDGET


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length`` with at least ``overlap`` in common between neighbours.

    The last tile ends exactly at ``length`` (it may overlap its neighbour by more than ``overlap``).
    """
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap {overlap} for tile {tile}")
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(start: int, size: int, before: int | None, after: int | None) -> torch.Tensor:
    """Weights along one axis of one tile: 1 inside, rising over the overlap with the previous tile (which ends at
    ``before``) and falling over the overlap with the next one (which starts at ``after``)."""
    pos = torch.arange(start, start + size, dtype=torch.float64) + 0.5
    w = torch.ones(size, dtype=torch.float64)
    if before is not None and before > start:
        w = torch.minimum(w, (pos - start) / (before - start))
    if after is not None and after < start + size:
        w = torch.minimum(w, (start + size - pos) / (start + size - after))
    return w.clamp_min(0)


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int = 64, overlap: int = 16,
                 factor: int = 8, context: int = 16) -> torch.Tensor:
    """``decode(z)`` computed tile by tile: (N, C, h, w) latents -> (N, C', h * factor, w * factor).

    ``tile``, ``overlap`` and ``context`` are in latent pixels; ``factor`` is the decoder's upsampling. Each tile is
    decoded with ``context`` more latent pixels around it (where the latent has them), which are cropped away: the
    decoder's convolutions then see real neighbours instead of zero padding, and a tile's pixels are exact for any
    decoder whose receptive field is within ``context`` (SD's reaches about 17 latent pixels, mostly weakly). A
    latent no larger than one tile is decoded in one piece.
    """
    n, _, h, w = z.shape
    if tile < 1 or context < 0:
        raise ValueError(f"tile must be positive and context non-negative, got tile {tile}, context {context}")
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return decode(z)
    out = weight = None
    th, tw, f = min(tile, h), min(tile, w), factor
    for i, top in enumerate(rows):
        # Ramps in output pixels, over the span the tile shares with its neighbour above / below.
        wy = _ramp(top * f, th * f, (rows[i - 1] + th) * f if i else None,
                   rows[i + 1] * f if i + 1 < len(rows) else None)
        y0, y1 = max(0, top - context), min(h, top + th + context)
        for j, left in enumerate(cols):
            wx = _ramp(left * f, tw * f, (cols[j - 1] + tw) * f if j else None,
                       cols[j + 1] * f if j + 1 < len(cols) else None)
            x0, x1 = max(0, left - context), min(w, left + tw + context)
            window = decode(z[:, :, y0:y1, x0:x1])
            piece = window[:, :, (top - y0) * f:(top - y0 + th) * f, (left - x0) * f:(left - x0 + tw) * f]
            if out is None:
                out = torch.zeros(n, piece.shape[1], h * f, w * f, dtype=torch.float32, device=piece.device)
                weight = torch.zeros(1, 1, h * f, w * f, dtype=torch.float32, device=piece.device)
            mask = (wy[:, None] * wx[None, :]).float().to(piece.device)
            ys, xs = slice(top * f, (top + th) * f), slice(left * f, (left + tw) * f)
            out[:, :, ys, xs] += piece.float() * mask
            weight[:, :, ys, xs] += mask
    return out / weight


# An upper estimate of a decode's working memory, in bytes per output pixel and per channel of the decoder's
# full-resolution level: SD's kl-f8 decoder (128 channels there) measured 1008 MB above its weights at 512 x 512 in
# float32 and 656 MB in bfloat16 (benchmarks/sd_vs_diffusers.py --phases vae, docs/sd_vs_diffusers_*.json), that
# is 7.9 and 10.3 bytes per channel, pixel and byte of the dtype; 12 leaves a margin, plus a fixed 64 MB of workspace
# and the buffers fp32 Winograd convolutions keep (latentdiff/nn/winograd.py: three of BUDGET bytes).
DECODE_BYTES_PER_CHANNEL_PIXEL = 12
DECODE_WORKSPACE = (64 << 20) + 3 * WINOGRAD_BUDGET
MEMORY_RESERVE = 1 << 30  # what an automatic decision leaves free for the rest of the process and the system


def decode_bytes(height: int, width: int, channels: int, element_size: int) -> int:
    """The estimated working memory (bytes) of decoding one ``height`` x ``width`` image with a decoder whose
    full-resolution level has ``channels`` channels, in a dtype of ``element_size`` bytes."""
    return DECODE_BYTES_PER_CHANNEL_PIXEL * channels * element_size * height * width + DECODE_WORKSPACE


def automatic_tile(h: int, w: int, factor: int, channels: int, element_size: int, available: int | None
                   ) -> int | None:
    """The tile (latent pixels) to decode an (h, w) latent in, given ``available`` bytes: None where one decode fits
    (or nothing is known of the memory), else the largest multiple of 8 (at least 16) whose window, the tile and a
    quarter tile of context on each side, fits."""
    if available is None:
        return None
    budget = available - MEMORY_RESERVE
    if decode_bytes(h * factor, w * factor, channels, element_size) <= budget:
        return None
    tile = (max(h, w) // 8) * 8
    while tile > 16:
        window = min(tile + 2 * (tile // 4), max(h, w)) * factor
        if decode_bytes(window, window, channels, element_size) <= budget:
            break
        tile -= 8
    return max(tile, 16)


__all__ = ["automatic_tile", "decode_bytes", "decode_tiled", "tile_starts"]
