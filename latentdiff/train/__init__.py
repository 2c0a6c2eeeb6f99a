"""Training loops; ``TASKS`` maps a config's ``task`` to its experiment schema and its train function."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentdiff.train.autoencoder import AutoencoderExperiment, train_autoencoder
from latentdiff.train.diffusion import DiffusionExperiment, train_diffusion

TASKS: dict[str, tuple[type, Callable[..., Path]]] = {
    "autoencoder": (AutoencoderExperiment, train_autoencoder),
    "diffusion": (DiffusionExperiment, train_diffusion),
}


def resolve_task(config: dict[str, Any]) -> tuple[type, Callable[..., Path]]:
    task = config.get("task", "autoencoder")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} in the config; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[task]
