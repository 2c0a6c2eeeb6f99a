"""Checkpoint formats: native safetensors with the config in its metadata and beside it as JSON."""

from latentdiff.io.checkpoint import (
    CheckpointError,
    load_autoencoder,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = ["CheckpointError", "load_autoencoder", "read_checkpoint", "resolve_checkpoint", "save_checkpoint"]
