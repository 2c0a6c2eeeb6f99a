"""Training loops; ``TASKS`` maps a config's ``task`` to its experiment schema and its train function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _autoencoder() -> tuple[type, Callable[..., Path]]:
    from latentdiff.train.autoencoder import AutoencoderExperiment, train_autoencoder

    return AutoencoderExperiment, train_autoencoder


def _diffusion() -> tuple[type, Callable[..., Path]]:
    from latentdiff.train.diffusion import DiffusionExperiment, train_diffusion

    return DiffusionExperiment, train_diffusion


# Loaded lazily so that importing one task does not import every model.
TASKS: dict[str, Callable[[], tuple[type, Callable[..., Path]]]] = {
    "autoencoder": _autoencoder,
    "diffusion": _diffusion,
}


def resolve_task(config: dict[str, Any]) -> tuple[type, Callable[..., Path]]:
    task = config.get("task", "autoencoder")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} in the config; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[task]()
