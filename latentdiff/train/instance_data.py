"""What DreamBooth and textual inversion read: a folder of a few images of one subject, captions optional.

``PromptedFolder`` holds every image under a folder (recursively, the image folders' rules, no train/test split: a
subject's 3-20 photos all train), each with its caption (``IMAGE.txt`` beside it, or a ``metadata.jsonl`` /
``metadata.csv`` row, as a captioned folder's) or, without one, the run's prompt ("a photo of sks dog"). Items are
``{"image": (C, H, W) in [-1, 1], "caption": str, "label": -1}`` at ``data.image_size``, resized as ``data.resize``
says.

``prompt_sample_inputs`` gives such a run's sample grid its fixed inputs: prompts rather than a split's captions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from latentdiff.data import DataConfig
from latentdiff.data.captioned import FolderCaptions
from latentdiff.data.datasets import IMAGE_EXTENSIONS, ImageDataset, load_image_file, scan_image_folder
from latentdiff.diffusion.model import LatentDiffusion
from latentdiff.io.atomic import write_text


class PromptedFolder(ImageDataset):
    """Every image under ``root`` (the first ``limit`` in sorted order; 0: all) with its caption or ``prompt`` (see
    the module docstring); ``what`` names the folder in errors (``data.path``, ``dreambooth.class_images``)."""

    def __init__(self, cfg: DataConfig, root: str | Path, prompt: str, what: str, limit: int = 0) -> None:
        root = Path(root).expanduser()
        super().__init__(cfg, "train", str(root))
        if not root.is_dir():
            raise ValueError(f"{what} {str(root)!r} is not a folder of images")
        self.files = scan_image_folder(root)[:limit or None]
        if not self.files:
            raise ValueError(f"{what} {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched "
                             "recursively)")
        captions = FolderCaptions(root, self.files)
        self.captions = [captions.caption(path) or prompt for path in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._finish(load_image_file(self.files[index])), "caption": self.captions[index], "label": -1}


def count_images(folder: str | Path) -> int:
    """How many images ``folder`` holds (0 when it does not exist)."""
    folder = Path(folder).expanduser()
    return len(scan_image_folder(folder)) if folder.is_dir() else 0


def prompt_sample_inputs(model: LatentDiffusion, prompts: Sequence[str], run_dir: Path) -> dict[str, torch.Tensor]:
    """The conditioner's inputs for ``prompts`` (one per grid image), written to ``samples/captions.txt`` too."""
    if model.cond_stage_model is None:
        raise ValueError("this run needs a text-conditioned model (a text encoder to take its prompts)")
    write_text(run_dir / "samples" / "captions.txt", "\n".join(prompts) + "\n")
    return model.cond_stage_model.prepare({"caption": list(prompts)})


__all__ = ["PromptedFolder", "count_images", "prompt_sample_inputs"]
