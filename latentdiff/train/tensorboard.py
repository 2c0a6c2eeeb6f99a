"""TensorBoard logging beside the CSV/JSONL log (``train.tensorboard``): the log rows' values (losses, learning
rate, throughput) as scalars and the sample grids as images, in ``RUN/tensorboard``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

try:  # optional: pip install tensorboard
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

MISSING = "train.tensorboard needs the tensorboard package: pip install tensorboard"


def check_tensorboard(enabled: bool) -> None:
    if enabled and SummaryWriter is None:
        raise ValueError(MISSING)


class TensorBoardLog:
    """Writes to ``run_dir/tensorboard``; one run's sessions append to the same event folder."""

    def __init__(self, run_dir: Path) -> None:
        check_tensorboard(True)
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG the trainer wrote (a sample grid), as an image at ``step``."""
        pixels = np.asarray(Image.open(path).convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
