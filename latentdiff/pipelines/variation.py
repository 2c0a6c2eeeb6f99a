"""Variation seeds, as AUTOMATIC1111's ``Variation seed`` / ``Variation seed strength``: the initial noise moved
along the great circle from the seed's noise towards a second seed's.

A1111 draws image i's noise from seed + i and its variation noise from subseed + i, and starts from
``slerp(strength, noise, subnoise)``: strength 0 is the seed's image, 1 the subseed's noise (the rest of the run,
sampler noise included, still follows the seed), and small strengths give small variations of one picture. Here the
seed's noise is the pipeline's own (one generator for the batch, in the pipeline's order), so strength 0 leaves every
image exactly as without a variation; the variation noise of image i (its index in the batch) is drawn from its own
CPU generator seeded with ``subseed + i``, in float32, as a (C, H, W) draw (with A1111's "RNG source: CPU" that is
the noise A1111 draws).

The interpolation is A1111's ``slerp``: each (C, H, W) noise is normalised along its rows (dim -2, as A1111 calls it
on a (C, H, W) tensor), so every column (c, :, w) moves along its own great circle; where the two noises are
almost parallel (mean cosine above 0.9995) the angle is too small to divide by and a straight line is taken
instead. A1111's own fallback swaps the two ends (``low * val + high * (1 - val)``); this one does not, which only
matters for nearly identical noises, where the two ends are the same anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentdiff.diffusion.process import draw_noise

PARALLEL_COSINE = 0.9995  # A1111's threshold for the straight-line fallback


def slerp(t: float, low: torch.Tensor, high: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Spherical interpolation from ``low`` (t = 0) to ``high`` (t = 1) of the vectors along ``dim``, each pair on
    its own great circle (with the magnitudes interpolated by the same weights); a straight line when the vectors are
    almost parallel on average (mean cosine > 0.9995)."""
    low_unit = low / low.norm(dim=dim, keepdim=True)
    high_unit = high / high.norm(dim=dim, keepdim=True)
    cosine = (low_unit * high_unit).sum(dim, keepdim=True)
    if cosine.mean() > PARALLEL_COSINE:
        return (1 - t) * low + t * high
    omega = torch.acos(cosine.clamp(-1, 1))
    sin_omega = torch.sin(omega)
    return torch.sin((1 - t) * omega) / sin_omega * low + torch.sin(t * omega) / sin_omega * high


@dataclass(frozen=True)
class Variation:
    """A variation of a seed's images: the noise of ``subseed`` (+ the image's index) mixed in at ``strength``
    (0: none, 1: all). ``first``: the index of the call's first image in the whole run (made in batches)."""

    subseed: int
    strength: float
    first: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.strength <= 1:
            raise ValueError(f"the variation strength (--subseed-strength) must be in [0, 1], got {self.strength}")

    def subnoise(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """(N, C, H, W) float32 on the CPU: image i's noise drawn from a CPU generator seeded with
        subseed + first + i."""
        return torch.stack([draw_noise(tuple(shape[1:]),
                                       torch.Generator("cpu").manual_seed(self.subseed + self.first + i))
                            for i in range(shape[0])])

    def apply(self, noise: torch.Tensor) -> torch.Tensor:
        """``noise`` (N, C, H, W) with each image's variation noise mixed in; the very same tensor at strength 0."""
        if self.strength == 0:
            return noise
        sub = self.subnoise(noise.shape).to(noise.device, noise.dtype)
        return torch.stack([slerp(self.strength, n, s) for n, s in zip(noise, sub, strict=True)])


def variation_of(subseed: int | None, strength: float) -> Variation | None:
    """The ``Variation`` of a subseed and strength, None when there is none (no subseed, or strength 0)."""
    if subseed is None and strength:
        raise ValueError("a variation strength (--subseed-strength) needs a variation seed (--subseed N)")
    return None if subseed is None or strength == 0 else Variation(subseed, strength)


__all__ = ["PARALLEL_COSINE", "Variation", "slerp", "variation_of"]
