"""The latent cache: a diffusion run's training set encoded once by its frozen first stage.

With a frozen first stage, encoding the same images every epoch is wasted work, so with
``cache_latents`` the training set is encoded once into ``<out_dir>/latent_cache.safetensors``: the KL
posterior's parameters (each step still samples z ~ q(z|x) with the step's generator), the quantised latents
of a VQ model, or the images themselves (as uint8, exactly) in pixel space, with the labels. The file carries a
key made of the first-stage checkpoint (resolved path, size, mtime) and the data config, and is reused on
resume or restart only when the key matches. Caching freezes the data: random flips are then applied once,
not per epoch.

With a conditioner the cache also holds what ``Conditioner.prepare`` makes of each item: token ids (captions are
tokenised once), class maps (uint8), low-res images, and for inpainting the images themselves (uint8: an 8-bit
copy, like the files real inpainting inputs come from; the masks are drawn per step, so the masked image is
encoded each step). A frozen text encoder (MiniLM) is run each step on the cached ids rather than cached: its
outputs would be ~100 KB per caption.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from latentdiff.config import to_dict
from latentdiff.data import DataConfig
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.io.checkpoint import resolve_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.train.loop import DistEnv

logger = logging.getLogger(__name__)

CACHE_NAME = "latent_cache.safetensors"
CACHE_VERSION = 1


def latent_cache_key(model: LatentDiffusionConfig, data: DataConfig) -> str:
    """Describes what a cache was made from: the first-stage file (path, size, mtime), its kind and the data."""
    first = model.first_stage
    source: dict[str, Any] = {"first_stage": ""}
    if first:
        try:
            file = resolve_checkpoint(first).resolve()
            st = file.stat()
            source = {"first_stage": str(file), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        except CheckpointError:
            source = {"first_stage": str(first), "missing": True}
    fs = model.first_stage_config
    kind = "pixel" if model.pixel_space else (fs.regularizer if fs is not None else "unknown")
    key: dict[str, Any] = {"version": CACHE_VERSION, "kind": kind, **source, "data": to_dict(data)}
    if model.conditioner is not None:  # only then: the keys of existing caches stay what they were
        key["conditioner"] = model.conditioner.cache_signature()
    return json.dumps(key, sort_keys=True)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(127.5).sub_(1.0)  # the same ops as data.transforms.to_tensor: bit-identical


class LatentCacheDataset(Dataset):
    """Items ``{"params": first-stage parameters, "label": int, **conditioning inputs}`` from an in-memory cache.

    ``extras`` are ``Conditioner.prepare``'s tensors per item (token ids, class maps, low-res images, images);
    uint8 images come back in [-1, 1] and uint8 class maps as int64.
    """

    def __init__(self, params: torch.Tensor, labels: torch.Tensor,
                 extras: dict[str, torch.Tensor] | None = None) -> None:
        self.params, self.labels = params, labels
        self.pixels_uint8 = params.dtype == torch.uint8
        self.extras = dict(extras or {})
        for name, values in self.extras.items():
            if len(values) != len(params):
                raise ValueError(f"latent cache: {name!r} has {len(values)} items, params {len(params)}")

    def __len__(self) -> int:
        return len(self.params)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.params[index]
        if self.pixels_uint8:
            p = _from_uint8(p)
        item: dict[str, Any] = {"params": p, "label": int(self.labels[index])}
        for name, values in self.extras.items():
            value = values[index]
            if value.dtype == torch.uint8:
                value = _from_uint8(value) if name in ("image", "lowres") else value.long()
            item[name] = value
        return item


def _cacheable_inputs(model: LatentDiffusion, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The conditioner's prepared inputs of a batch, in their compact cache form (labels are cached apart)."""
    if model.cond_stage_model is None:
        return {}
    prepared = model.cond_stage_model.prepare(batch)
    prepared.pop("label", None)
    if "image" in prepared:
        prepared["image"] = _to_uint8(prepared["image"])
    if "class_map" in prepared and model.config.conditioner.num_map_classes <= 256:
        prepared["class_map"] = prepared["class_map"].to(torch.uint8)
    return {k: v.cpu() for k, v in prepared.items()}


@torch.no_grad()
def encode_dataset(model: LatentDiffusion, dataset: Dataset, device: torch.device, batch_size: int = 256,
                   num_workers: int = 0,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """First-stage parameters (see ``LatentDiffusion.first_stage_parameters``), labels and the conditioner's
    cacheable inputs (``Conditioner.prepare``; empty without a conditioner) of every item."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    params, labels, extras = [], [], {}
    for batch in tqdm(loader, desc="encode latents", disable=not progress, dynamic_ncols=True):
        x = batch["image"].to(device)
        p = model.first_stage_parameters(x).float().cpu()
        if model.pixel_space:
            p = _to_uint8(p)
        params.append(p)
        labels.append(torch.as_tensor(batch["label"], dtype=torch.long))
        for name, value in _cacheable_inputs(model, batch).items():
            extras.setdefault(name, []).append(value)
    return torch.cat(params), torch.cat(labels), {name: torch.cat(values) for name, values in extras.items()}


def _cache_matches(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("cache_key") == key
    except Exception:  # a damaged cache is rebuilt, whatever safetensors raises for it
        return False


def load_or_build_latent_cache(model: LatentDiffusion, dataset: Dataset, data: DataConfig, run_dir: Path,
                               env: DistEnv, num_workers: int = 0) -> LatentCacheDataset:
    """Reuse ``run_dir/latent_cache.safetensors`` if its key matches (``data`` is the config ``dataset`` was
    built from), else encode ``dataset`` (rank 0) and write it."""
    path = run_dir / CACHE_NAME
    key = latent_cache_key(model.config, data)
    if env.is_main:
        if _cache_matches(path, key):
            logger.info("reusing the latent cache %s", path)
        else:
            if path.exists():
                logger.info("the latent cache %s was made from another first stage or data: re-encoding", path)
            params, labels, extras = encode_dataset(model, dataset, env.device, num_workers=num_workers)
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tensors = {"params": params.contiguous(), "labels": labels}
            tensors.update({f"cond.{name}": value.contiguous() for name, value in extras.items()})
            save_file(tensors, str(tmp), metadata={"cache_key": key})
            os.replace(tmp, path)
            logger.info("wrote the latent cache %s (%d items, %s per item)", path, len(params), tuple(params.shape[1:]))
    if env.distributed:
        dist.barrier()
    tensors = load_file(str(path))
    extras = {name[len("cond."):]: value for name, value in tensors.items() if name.startswith("cond.")}
    return LatentCacheDataset(tensors["params"], tensors["labels"], extras)


