"""DeepCache (Ma, Fang & Wang 2023, arXiv:2312.00858): reuse the UNet's deep features between sampling steps.

From one sampling step to the next, the high-level features of a UNet's up path change little. Inside
``deep_cache(unet, interval=3, branch=0)`` one step in ``interval`` runs the whole UNet and keeps the feature map
that enters its last ``branch + 1`` output blocks; the steps between run only the first ``branch + 1`` input blocks
(for their skip connections) and those last output blocks, on the kept feature. On SD v1.5 at 512 px the cached
steps cost about a sixth of a full one for ``branch=0``.

It is an approximation, off by default: the images change (docs/performance.md measures by how much). A "step" is
a run of UNet calls at one timestep: a sampler that evaluates the UNet twice per step (Heun, DPM-Solver++ 2S)
counts each noise level as a step, and guidance that evaluates the conditional and unconditional halves in
separate calls keeps one feature per call of the step (``slot``). A call whose batch does not match its slot's
feature runs in full.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DeepCacheState:
    """What ``deep_cache`` keeps on a UNet: the schedule, the kept features and counts of full and cached calls."""

    interval: int
    branch: int
    step: int = -1
    slot: int = 0
    last_timestep: float | None = None
    features: dict[int, tuple[torch.Size, torch.Tensor]] = field(default_factory=dict)  # slot: (input shape, h)
    full_calls: int = 0
    cached_calls: int = 0

    def begin(self, timesteps: torch.Tensor) -> int:
        """Register a call at ``timesteps``; returns its slot (its position among the calls of this step)."""
        t = float(timesteps.flatten()[0])
        if t != self.last_timestep:
            self.step, self.slot, self.last_timestep = self.step + 1, 0, t
        else:
            self.slot += 1
        return self.slot

    def reuse(self, slot: int, x: torch.Tensor) -> torch.Tensor | None:
        """The kept feature for ``slot`` when this step may reuse it for input ``x``, counted as a cached call
        (None: run the whole UNet)."""
        if self.step % self.interval == 0 or slot not in self.features:
            return None
        shape, feature = self.features[slot]
        if shape != x.shape or feature.dtype != x.dtype:
            return None
        self.cached_calls += 1
        return feature

    def keep(self, slot: int, x: torch.Tensor, feature: torch.Tensor) -> None:
        """Keep ``feature``, computed in full for input ``x``, for the next steps' calls in ``slot``."""
        self.features[slot] = (x.shape, feature)
        self.full_calls += 1


@contextmanager
def deep_cache(unet: nn.Module, interval: int = 3, branch: int = 0) -> Iterator[DeepCacheState]:
    """Within the block, ``unet`` (a ``UNetModel``) runs in full once every ``interval`` steps and reuses its deep
    features in between (see the module docstring); yields the state, whose counts say what ran."""
    blocks = len(getattr(unet, "output_blocks", ()))
    if not blocks:
        raise TypeError(f"deep_cache needs a UNetModel (input and output blocks), got {type(unet).__name__}")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"the DeepCache interval must be a whole number of steps >= 1, got {interval!r}")
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < blocks:
        raise ValueError(f"the DeepCache branch must be a block index from 0 to {blocks - 1}, got {branch!r}")
    if unet.__dict__.get("_deep_cache") is not None:
        raise RuntimeError("this UNet is already inside a deep_cache block")
    state = DeepCacheState(interval, branch)
    unet.__dict__["_deep_cache"] = state
    try:
        yield state
    finally:
        unet.__dict__["_deep_cache"] = None


__all__ = ["DeepCacheState", "deep_cache"]
