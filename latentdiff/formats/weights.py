"""One weights file as a dict of tensors (``.safetensors``, or a pickle read without running code), the check of a
state dict against a model's shapes, and the clean-up before writing one.

A pickled checkpoint (``.ckpt``, ``.pt``, ``.bin``) is read only with ``torch.load(weights_only=True)``: a pickle
that would need to run code is refused with a line that says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from latentdiff.io.atomic import atomic_path
from latentdiff.io.errors import CheckpointError
from latentdiff.io.state import check_weights, torch_load_weights_only

# Old PyTorch Lightning checkpoints (SD v1.x .ckpt files) use this class as a dictionary key; it is mapped to an
# inert stand-in so that torch.load(weights_only=True) can read them without importing Lightning.
_LIGHTNING_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",)


class _InertLightningClass:
    """Stands in for a PyTorch Lightning class named in an old checkpoint; it does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` (old Lightning checkpoints' one class mapped to an inert stand-in),
    with a clear refusal when the pickle wants to run code."""
    return torch_load_weights_only(path, [(_InertLightningClass, name) for name in _LIGHTNING_GLOBALS])


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a loaded .ckpt (Lightning nests it under ``state_dict``)."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dictionary of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
    return tensors


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of one weights file: ``.safetensors``, or a pickled ``.ckpt``/``.pt``/``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            weights = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e
        check_weights(weights, path)
        return weights, metadata
    weights = _unwrap(safe_torch_load(path), path)
    check_weights(weights, path)
    return weights, {}


def show_keys(keys: list[str], limit: int = 6) -> str:
    """The first ``limit`` keys and how many there are, for an error message."""
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else f" ({len(keys)})")


def check_state_dict(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise a ``CheckpointError`` naming missing, unexpected and mis-shaped keys (a few of each, and counts)."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {expected[k]}"
              for k in sorted(set(expected) & set(weights)) if tuple(weights[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        parts = [f"{label}: {show_keys(keys, 4 if label == 'shape mismatches' else 6)}" for label, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"the weights do not fit the {what}; " + "; ".join(parts))


def plain_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing memory with another (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()  # slices of one tensor (q, k, v of a fused qkv) share it
            if storage in seen:
                tensor = tensor.clone()
            else:
                seen.add(storage)
        out[key] = tensor
    return out


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (``plain_tensors``) to a temporary name beside ``path``, then rename it (nothing
    half-written is left)."""
    with atomic_path(path) as temp:
        save_file(plain_tensors(tensors), str(temp), metadata={"format": "pt", **metadata})
    return path
