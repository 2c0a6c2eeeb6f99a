"""Loading a state dict into a module with one clear error; imports nothing of latentdiff but its errors."""

from __future__ import annotations

import torch
from torch import nn

from latentdiff.io.errors import CheckpointError


def _show(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_state_strict(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that names every missing, unexpected and mis-shaped key in one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(weights)) if own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {_show(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"the checkpoint does not fit the {what}; " + "; ".join(parts))
    module.load_state_dict(weights, strict=True)
