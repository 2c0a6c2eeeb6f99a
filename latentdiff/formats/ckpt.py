"""A pickled checkpoint (format "ckpt": ``.ckpt``, ``.pt``, ``.pth``, ``.bin``), read only; never written.

The pickle is read with ``torch.load(weights_only=True)`` (``latentdiff.formats.weights.safe_torch_load``): one
that would need to run code is refused, and old PyTorch Lightning files load without Lightning. Its tensors are
then in the original layout (``latentdiff.formats.stable_diffusion.split_original``) or, for a diffusers
``.bin``, in diffusers' names, read with the ``config.json`` beside it as a component. Which of the two is only
known once the pickle is loaded: a pickle has no header to read names from.
"""

from __future__ import annotations

from pathlib import Path

from latentdiff.formats import diffusers_component
from latentdiff.formats.components import CheckpointFormat, ReadOptions, StableDiffusionComponents
from latentdiff.formats.original_config import find_original_config
from latentdiff.formats.stable_diffusion import split_original
from latentdiff.formats.weights import read_state_dict

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def detect(path: Path) -> bool:
    """A file with a pickle's suffix."""
    return path.is_file() and path.suffix in PICKLE_SUFFIXES


def read(path: Path, options: ReadOptions) -> StableDiffusionComponents:
    """The components of a pickled single file (original layout), or of a diffusers-named one's folder."""
    state_dict, _ = read_state_dict(path)
    if diffusers_component.is_diffusers_named(state_dict):
        return diffusers_component.read(path, options)
    return split_original(state_dict, ema=options.ema, text_encoder=options.text_encoder,
                          text_encoder_converter=options.text_encoder_converter, strict=options.strict,
                          original=find_original_config(path, options.config))


FORMAT = CheckpointFormat("ckpt", "a pickled single file (.ckpt, .pt, .pth, .bin), read without running code",
                          detect, read)
