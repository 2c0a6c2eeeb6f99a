"""Training; ``TASKS`` maps a config's ``task`` to its experiment schema and its trainer (hooks on ``Trainer``)."""

from __future__ import annotations

from typing import Any

from latentdiff.train.autoencoder import AutoencoderExperiment, AutoencoderTrainer
from latentdiff.train.diffusion import DiffusionExperiment, DiffusionTrainer
from latentdiff.train.dreambooth import DreamBoothExperiment, DreamBoothTrainer
from latentdiff.train.textual_inversion import TextualInversionExperiment, TextualInversionTrainer
from latentdiff.train.trainer import Trainer

TASKS: dict[str, tuple[type, type[Trainer]]] = {
    "autoencoder": (AutoencoderExperiment, AutoencoderTrainer),
    "diffusion": (DiffusionExperiment, DiffusionTrainer),
    "dreambooth": (DreamBoothExperiment, DreamBoothTrainer),
    "textual_inversion": (TextualInversionExperiment, TextualInversionTrainer),
}


def resolve_task(config: dict[str, Any]) -> tuple[type, type[Trainer]]:
    task = config.get("task", "autoencoder")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} in the config; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[task]
