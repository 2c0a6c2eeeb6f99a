"""The optimisers a config names (``train.optimizer``): torch's Adam(W), or bitsandbytes' 8-bit one, which keeps
the two moments in 8 bits (a quarter of the memory) on CUDA GPUs."""

from __future__ import annotations

from collections.abc import Iterable

import torch

try:  # optional: GPU-only, a large package
    import bitsandbytes as bnb
except ImportError:
    bnb = None


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, ...], weight_decay: float,
              kind: str, device: torch.device, decoupled: bool = True) -> torch.optim.Optimizer:
    """AdamW (``decoupled``: weight decay applied to the weights, not through the gradient) or Adam, as ``kind``
    says: "adamw" (torch) or "adamw8bit" (bitsandbytes, CUDA only)."""
    if kind == "adamw":
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        return cls(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if kind != "adamw8bit":
        raise ValueError(f"train.optimizer must be adamw or adamw8bit, got {kind!r}")
    if bnb is None:
        raise ValueError("train.optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU")
    if device.type != "cuda":
        raise ValueError(f"train.optimizer adamw8bit needs a CUDA GPU (bitsandbytes); the device is {device.type}")
    cls = bnb.optim.AdamW8bit if decoupled else bnb.optim.Adam8bit
    return cls(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
