"""Token merging for a transformer over a feature map (ToMe for SD, Bolya & Hoffman 2023, arXiv:2303.17604).

Many of an image's tokens are near copies of a neighbour (flat regions, repeated texture), so a sub-layer can run on
fewer of them. Bipartite soft matching splits the tokens of an h x w grid into destinations, one per sx x sy cell
(at a random place in the cell, or its top-left corner), and sources, the rest. Each source is paired with the
destination its features are most similar to (cosine similarity); the ``r`` best-matched sources are averaged into
their destinations ("mean" merging), the sub-layer runs on the ``N - r`` tokens left, and unmerging hands each
merged source the output of its destination. Nothing is learned: the merge is computed again for every call.

``TokenMerge`` is one such merge; ``TokenMerging`` holds the settings and the seeded generator that plans one per
call, which a ``SpatialTransformer`` carrying it (``latentdiff.diffusion.tome.token_merging`` puts it there) hands
to its blocks. The random destinations come from a CPU ``torch.Generator`` seeded once, so a run merges the same
tokens every time, on any device. (On a GPU the merge's sums are atomic adds, whose rounding may vary from run to
run unless ``torch.use_deterministic_algorithms(True)``; on the CPU they are bit for bit the same.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def destination_positions(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None) -> torch.Tensor:
    """The (h // sy) * (w // sx) destination tokens of a row-major h x w grid, one per sy x sx cell, cell by cell:
    at a place drawn from ``generator`` (CPU) in each cell, or the cell's top-left corner when it is None. Rows and
    columns beyond the last whole cell hold only sources."""
    cells_y, cells_x = h // sy, w // sx
    if generator is None:
        offset = torch.zeros(cells_y, cells_x, dtype=torch.long)
    else:
        offset = torch.randint(sy * sx, (cells_y, cells_x), generator=generator)
    rows = torch.arange(cells_y)[:, None] * sy + offset // sx
    cols = torch.arange(cells_x)[None, :] * sx + offset % sx
    return (rows * w + cols).flatten()


@dataclass(frozen=True)
class TokenMerge:
    """One merge of a (B, N, C) token set into (B, N - r, C) and its inverse, for each sample of the batch.

    ``kept``: the (B, N - r) positions of the tokens that stay as they are (the unmatched sources, then the
    destinations); ``merged``: the (B, r) positions of the sources merged away; ``into``: (B, r) the index, among
    the kept tokens, of the destination each merged source goes into; ``sizes``: (B, N - r, 1) how many tokens each
    kept one stands for (1 + the sources merged into it).
    """

    tokens: int
    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor
    sizes: torch.Tensor
    self_attention: bool = True
    cross_attention: bool = False
    mlp: bool = False

    @property
    def removed(self) -> int:
        return self.merged.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N - r, C): each destination averaged with the sources merged into it."""
        c = x.shape[-1]
        kept = x.gather(1, self.kept[..., None].expand(-1, -1, c))
        moving = x.gather(1, self.merged[..., None].expand(-1, -1, c))
        # A sum and a division: scatter_reduce(reduce="mean") gives the same numbers, three times slower on the CPU.
        return kept.scatter_add(1, self.into[..., None].expand(-1, -1, c), moving) / self.sizes.to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, C) -> (B, N, C): every kept token's output in its place, each merged source given the output
        of its destination."""
        b, _, c = y.shape
        out = y.new_empty(b, self.tokens, c)
        out.scatter_(1, self.kept[..., None].expand(-1, -1, c), y)
        out.scatter_(1, self.merged[..., None].expand(-1, -1, c), y.gather(1, self.into[..., None].expand(-1, -1, c)))
        return out

    def around(self, which: str, layer, x: torch.Tensor, *args) -> torch.Tensor:
        """``layer(x, *args)``, on the merged tokens when this merge applies to the sub-layer ``which``
        ("self_attention", "cross_attention" or "mlp")."""
        if not getattr(self, which):
            return layer(x, *args)
        return self.unmerge(layer(self.merge(x), *args))


def bipartite_soft_matching(metric: torch.Tensor, destinations: torch.Tensor, r: int, **sublayers: bool
                            ) -> TokenMerge:
    """The merge of ``r`` tokens of ``metric`` (B, N, C): sources paired with their most similar destination
    (cosine similarity, one destination per source), the ``r`` best pairs merged. ``destinations`` are token
    positions (as ``destination_positions`` gives them); ``r`` is capped at the number of sources. ``sublayers``
    are ``TokenMerge``'s flags."""
    b, n, _ = metric.shape
    device = metric.device
    is_destination = torch.zeros(n, dtype=torch.bool)
    is_destination[destinations] = True
    sources = torch.arange(n)[~is_destination].to(device)
    destinations = destinations.to(device)
    r = min(r, sources.numel())
    with torch.no_grad():
        # Each source's best destination needs only the destinations normalised; its cosine, the score that ranks
        # the pairs, divides by its own norm afterwards (cheaper than normalising every source's features).
        src = metric[:, sources]
        dot, partner = (src @ F.normalize(metric[:, destinations], dim=-1).transpose(1, 2)).max(dim=-1)
        best = dot / src.norm(dim=-1).clamp_min(1e-12)
        # Stable, so that ties (identical tokens) are broken the same way on every device.
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    merged, unmatched = sources[order[:, :r]], sources[order[:, r:]]
    into = unmatched.shape[1] + partner.gather(1, order[:, :r])
    kept = torch.cat([unmatched, destinations.expand(b, -1)], dim=1)
    sizes = torch.ones(b, n - r, 1, device=device).scatter_add_(1, into[..., None], torch.ones(b, r, 1, device=device))
    return TokenMerge(n, kept, merged, into, sizes, **sublayers)


@dataclass
class TokenMerging:
    """The settings of token merging, and the generator that draws each call's destinations.

    ``ratio``: the fraction of a grid's tokens merged away (``r = int(N * ratio)``, at most the number of sources:
    ``1 - 1 / (sx * sy)`` of them). ``use_rand``: destinations at a random place in each cell; an odd batch, which
    cannot hold a prompt's conditional and unconditional halves together, uses the top-left corners, as tomesd
    does. ``calls`` and ``removed`` count the merges planned and the tokens they removed.
    """

    ratio: float
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int = 0
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    calls: int = 0
    removed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator("cpu").manual_seed(self.seed)

    def plan(self, x: torch.Tensor, h: int, w: int) -> TokenMerge | None:
        """The merge of ``x`` (B, h * w, C), a row-major h x w grid of tokens; None when it removes no token."""
        r = int(x.shape[1] * self.ratio)
        if r <= 0 or h < self.sy or w < self.sx:
            return None
        random = self.use_rand and x.shape[0] % 2 == 0
        destinations = destination_positions(h, w, self.sx, self.sy, self.generator if random else None)
        merge = bipartite_soft_matching(x, destinations, r, self_attention=self.merge_attn,
                                        cross_attention=self.merge_crossattn, mlp=self.merge_mlp)
        self.calls += 1
        self.removed += merge.removed
        return merge


__all__ = ["TokenMerge", "TokenMerging", "bipartite_soft_matching", "destination_positions"]
