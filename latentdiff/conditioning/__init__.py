"""Conditioning: text encoders and tokenizers, class/segmentation/image embedders, the conditioner."""

import importlib.util
from pathlib import Path


def package_folders(name: str) -> tuple[bool, list[str]]:
    """(whether package ``name`` is installed, the folders it lives in), found with ``find_spec`` and without
    running the package's ``__init__`` (open_clip's needs torchvision; the packaged models need nothing)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return False, []
    folders = list(spec.submodule_search_locations or [])
    if spec.origin:
        folders.append(str(Path(spec.origin).parent))
    return True, folders
