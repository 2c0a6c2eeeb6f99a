"""Loading a state dict into a module with one clear error, and the checks every weights file gets when it is read
(finite floats, floating-point parameters); imports nothing of latentdiff but its errors."""

from __future__ import annotations

import contextlib
import contextvars
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiff.io.errors import CheckpointError

# Whether NaN and infinite weights load (``--allow-nonfinite``: to look at a broken model, not to use one).
_ALLOW_NONFINITE = contextvars.ContextVar("allow_nonfinite", default=False)
# Names that are parameters in every model here: never integer tensors.
_PARAMETER_SUFFIXES = (".weight", ".bias")


@contextlib.contextmanager
def nonfinite_weights_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the block, ``check_weights`` lets NaN and infinite weights through (``--allow-nonfinite``)."""
    token = _ALLOW_NONFINITE.set(allowed)
    try:
        yield
    finally:
        _ALLOW_NONFINITE.reset(token)


def check_weights(weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse a weights file (``source`` names it) holding an integer or boolean ``*.weight``/``*.bias`` tensor, or
    (unless ``nonfinite_weights_allowed``) a NaN or infinite value in a floating-point tensor."""
    for key, tensor in weights.items():
        if not tensor.is_floating_point():
            if key.endswith(_PARAMETER_SUFFIXES) and not tensor.is_complex():
                raise CheckpointError(f"{source}: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                      "where a floating-point parameter belongs; refused")
            continue
        if not _ALLOW_NONFINITE.get() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{source}: {key} holds NaN or infinite weights; refused (a diverged or corrupt "
                                  "model; --allow-nonfinite loads it anyway, for debugging)")


def torch_load_weights_only(path: str | Path, allowed_globals: list[Any] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (with ``allowed_globals`` besides torch's own), every
    failure one CheckpointError naming the file: a pickle that would run code says so and is refused."""
    try:
        with torch.serialization.safe_globals(allowed_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
            reason = detail.group(1).strip() if detail else str(e).strip().splitlines()[-1]
            raise CheckpointError(f"{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read "
                                  f"({reason[:120]})") from e
        module, _, name = found.group(1).rpartition(".")
        module = "os" if module in ("posix", "nt") else module or "builtins"  # os.system pickles as posix.system
        raise CheckpointError(
            f"{path} would run code when loaded (pickle global {module}.{name}); refused. Pickled checkpoints are "
            "only read with torch.load(weights_only=True): use a .safetensors copy of it, or re-save its state dict "
            "as plain tensors with a tool you trust") from e
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {reason}); "
                              "truncated or not a checkpoint") from e


def _show(keys: list[str]) -> str:
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_state_strict(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that names every missing, unexpected and mis-shaped key in one clear error, and refuses
    an integer tensor where the module has a floating-point one."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(weights)) if own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {_show(keys)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"the checkpoint does not fit the {what}; " + "; ".join(parts))
    wrong = [k for k in sorted(own) if own[k].is_floating_point() and not weights[k].is_floating_point()]
    if wrong:
        raise CheckpointError(f"the checkpoint does not fit the {what}: {wrong[0]} is "
                              f"{str(weights[wrong[0]].dtype).removeprefix('torch.')} where the model has "
                              f"{str(own[wrong[0]].dtype).removeprefix('torch.')}")
    module.load_state_dict(weights, strict=True)
