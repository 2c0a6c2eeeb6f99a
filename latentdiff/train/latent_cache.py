"""The latent cache: a diffusion run's training set encoded once by its frozen first stage (and text encoders).

With a frozen first stage, encoding the same images every epoch is wasted work, so with ``cache_latents`` the
training set is encoded once into ``<out_dir>/latent_cache/``: the KL posterior's parameters (each step still
samples z ~ q(z|x) with the step's generator), the quantised latents of a VQ model, or the images themselves (as
uint8, exactly) in pixel space, with the labels. The cache is sharded so that a big dataset neither has to fit in
memory nor be encoded in one go: ``part-000000.safetensors``, ... hold ``CACHE_PART_ITEMS`` items each, in dataset
order, and ``index.json`` lists them with the cache key. Parts are written (temp name + rename) as the encoding
proceeds and the index after each, so an interrupted build resumes after its last part. Training reads items from
the parts through memory maps. The key is made of the first-stage checkpoint (resolved path, size, mtime), the data
config and the conditioner; a cache is reused on resume or restart only when its key matches, else rebuilt (a
single-file ``latent_cache.safetensors`` of earlier versions is left alone and not read). Caching freezes the
data: random flips are then applied once, not per epoch.

Aspect-ratio buckets (``data.buckets``): each item is cached at its bucket's size, so items of different buckets
have latents of different shapes. The cache then holds the items bucket by bucket (buckets in index order, items in
dataset order within each), every part one bucket's items only, and ``index.json`` records each dataset item's
bucket (``item_buckets``) and each part's; an interrupted build resumes after its last part as an unbucketed one
does. The cache dataset maps dataset indices to their place in the parts and hands ``item_buckets`` to the bucket
batch sampler, so a cached run draws the batches, and reads the latents, of an uncached one.

With a conditioner the cache also holds what ``Conditioner.prepare`` makes of each item: token ids (captions are
tokenised once), class maps (uint8), low-res images, and for inpainting the images themselves (uint8: an 8-bit
copy, like the files real inpainting inputs come from; the masks are drawn per step, so the masked image is
encoded each step). A frozen text encoder (MiniLM, CLIP: an embedder with no trainable weights) is run here once
per caption and its hidden states (and attention mask) cached as ``<embedder name>.states`` (float32, about
L x width x 4 bytes per caption: 37 KB for MiniLM with 24 tokens), so that training never runs it; a dropped
caption then takes the empty caption's states, as it would have taken its ids.
"""

from __future__ import annotations

import bisect
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from latentdiff.conditioning.embedders.caption import CaptionEmbedder
from latentdiff.config import to_dict
from latentdiff.data import DataConfig
from latentdiff.diffusion.model import LatentDiffusion, LatentDiffusionConfig
from latentdiff.io.atomic import atomic_path, write_text
from latentdiff.io.checkpoint import resolve_checkpoint
from latentdiff.io.errors import CheckpointError
from latentdiff.train.loop import DistEnv

logger = logging.getLogger(__name__)

CACHE_DIR = "latent_cache"
CACHE_VERSION = 2  # 2: sharded parts with an index (1: one latent_cache.safetensors)
CACHE_PART_ITEMS = 4096  # items per part: a multiple of ENCODE_BATCH, so a resumed build batches as an unbroken one
ENCODE_BATCH = 256


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
    """Items ``{"params": first-stage parameters, "label": int, **conditioning inputs}`` from a cache's parts.

    Each part is a safetensors file of ``params``, ``labels`` and ``cond.<input>`` tensors (``Conditioner.prepare``'s
    token ids, class maps, low-res images, images, frozen text encoders' states), read item by item through a
    memory map that each process opens itself; uint8 images come back in [-1, 1] and uint8 class maps as int64.

    With ``item_buckets`` (dataset item i's bucket; the parts then hold the items bucket by bucket, see the module
    docstring), index i is read from its place in that order and the bucket sampler draws by ``item_buckets``.
    """

    def __init__(self, parts: list[Path], sizes: list[int], item_buckets: list[int] | None = None) -> None:
        self.parts, self.sizes = parts, sizes
        self.starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.item_buckets = item_buckets
        self.rows: list[int] | None = None  # dataset index -> place in the parts (bucketed caches)
        if item_buckets is not None:
            self.rows = [0] * len(item_buckets)
            for place, index in enumerate(cache_order(item_buckets)):
                self.rows[index] = place
        self._open: dict[int, Any] = {}

    @classmethod
    def from_index(cls, folder: Path, index: dict[str, Any]) -> LatentCacheDataset:
        """The cache that ``index`` (its ``index.json``) describes in ``folder``."""
        return cls([folder / part["file"] for part in index["parts"]], [part["items"] for part in index["parts"]],
                   index.get("item_buckets"))

    def __len__(self) -> int:
        return self.starts[-1]

    def _part(self, index: int) -> tuple[Any, int]:
        part = bisect.bisect_right(self.starts, index) - 1
        if part not in self._open:
            self._open[part] = safe_open(str(self.parts[part]), framework="pt")
        return self._open[part], index - self.starts[part]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a latent cache of {len(self)} items")
        part, row = self._part(index if self.rows is None else self.rows[index])
        item: dict[str, Any] = {}
        for name in part.keys():
            value = part.get_slice(name)[row:row + 1][0]
            if name == "labels":
                item["label"] = int(value)
            elif name == "params":
                item["params"] = _from_uint8(value) if value.dtype == torch.uint8 else value
            else:
                name = name[len("cond."):]
                if value.dtype == torch.uint8:
                    value = _from_uint8(value) if name in ("image", "lowres") else value.long()
                item[name] = value
        return item

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # memory maps are per process


def cache_order(item_buckets: list[int]) -> list[int]:
    """The dataset indices in the order a bucketed cache holds them: by bucket, dataset order within one."""
    return sorted(range(len(item_buckets)), key=lambda i: item_buckets[i])


def _segments(dataset: Dataset) -> list[tuple[int | None, list[int]]]:
    """(bucket, dataset indices) of the runs of ``dataset`` that parts are cut from: one run (bucket None) for an
    unbucketed dataset, else one per bucket."""
    item_buckets = getattr(dataset, "item_buckets", None)
    if item_buckets is None:
        return [(None, list(range(len(dataset))))]
    runs: dict[int, list[int]] = {}
    for index in cache_order(item_buckets):
        runs.setdefault(item_buckets[index], []).append(index)
    return list(runs.items())


def _frozen_captions(model: LatentDiffusion) -> list[CaptionEmbedder]:
    """The caption embedders whose text encoder is frozen: their states can be cached."""
    if model.cond_stage_model is None:
        return []
    return [e for e in model.cond_stage_model.embedders
            if isinstance(e, CaptionEmbedder) and not any(p.requires_grad for p in e.parameters())]


def _cacheable_inputs(model: LatentDiffusion, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The conditioner's prepared inputs of a batch, in their compact cache form (labels are cached apart), with
    the frozen text encoders' states."""
    if model.cond_stage_model is None:
        return {}
    prepared = model.cond_stage_model.prepare(batch)
    prepared.pop("label", None)
    if "image" in prepared:
        prepared["image"] = _to_uint8(prepared["image"])
    if "class_map" in prepared and model.config.conditioner.num_map_classes <= 256:
        prepared["class_map"] = prepared["class_map"].to(torch.uint8)
    for embedder in _frozen_captions(model):
        states, mask = embedder.transformer.encode_ids(prepared["input_ids"])
        prepared[embedder.states_key] = states.float()
        if mask is not None:
            prepared[embedder.states_key + "_mask"] = mask
    return {k: v.cpu() for k, v in prepared.items()}


def _encode_batch(model: LatentDiffusion, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """One batch's cache tensors: first-stage parameters (uint8 images in pixel space), labels, cond inputs."""
    p = model.first_stage_parameters(batch["image"].to(device)).float().cpu()
    tensors = {"params": _to_uint8(p) if model.pixel_space else p,
               "labels": torch.as_tensor(batch["label"], dtype=torch.long)}
    tensors.update({f"cond.{name}": value for name, value in _cacheable_inputs(model, batch).items()})
    return tensors


def _read_index(folder: Path, key: str) -> dict[str, Any] | None:
    """The index of a cache made under ``key`` whose listed parts all exist; None otherwise."""
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return None
    if index.get("cache_key") != key or not all((folder / part["file"]).is_file() for part in index["parts"]):
        return None
    return index


class _PartWriter:
    """Collects encoded batches and writes a part of ``part_items`` items whenever enough are there, then the
    index (both atomically), so that the cache on disk is always a usable prefix of the dataset."""

    def __init__(self, folder: Path, index: dict[str, Any], part_items: int) -> None:
        self.folder, self.index, self.part_items = folder, index, part_items
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.bucket: int | None = None  # the bucket of the items being added (bucketed caches)

    def add(self, tensors: dict[str, torch.Tensor], last: bool = False) -> None:
        for name, value in tensors.items():
            self.pending.setdefault(name, []).append(value)
        held = sum(len(v) for v in self.pending.get("params", []))
        while held >= self.part_items or (last and held > 0):
            joined = {name: torch.cat(values) for name, values in self.pending.items()}
            n = min(held, self.part_items)
            self._write({name: value[:n].contiguous() for name, value in joined.items()})
            held -= n
            # Nothing held: nothing kept, so the next bucket's latents of another shape start afresh.
            self.pending = {name: [value[n:]] for name, value in joined.items()} if held else {}

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        name = f"part-{len(self.index['parts']):06d}.safetensors"
        with atomic_path(self.folder / name) as tmp:
            save_file(tensors, str(tmp), metadata={"cache_key": self.index["cache_key"]})
        part = {"file": name, "items": len(tensors["params"])}
        self.index["parts"].append(part if self.bucket is None else {**part, "bucket": self.bucket})
        write_text(self.folder / "index.json", json.dumps(self.index, indent=1) + "\n")


@torch.no_grad()
def build_latent_cache(model: LatentDiffusion, dataset: Dataset, folder: Path, key: str, device: torch.device,
                       num_workers: int = 0, part_items: int = CACHE_PART_ITEMS, progress: bool = True) -> None:
    """Encode ``dataset`` into ``folder``'s parts, continuing after the parts an interrupted build wrote; a bucketed
    dataset (``item_buckets``) bucket by bucket, each bucket's last part cut short."""
    if part_items % ENCODE_BATCH and part_items > ENCODE_BATCH:
        raise ValueError(f"part_items must divide into encoding batches of {ENCODE_BATCH}, got {part_items}")
    folder.mkdir(parents=True, exist_ok=True)
    index = _read_index(folder, key)
    if index is None:
        for stale in folder.glob("part-*.safetensors"):
            stale.unlink()
        index = {"cache_key": key, "items": len(dataset), "part_items": part_items, "parts": []}
        item_buckets = getattr(dataset, "item_buckets", None)
        if item_buckets is not None:
            index["item_buckets"] = [int(b) for b in item_buckets]
    done = sum(part["items"] for part in index["parts"])
    if done:
        logger.info("the latent cache %s has %d of %d items: encoding the rest", folder, done, len(dataset))
    writer = _PartWriter(folder, index, part_items)
    progress_bar = tqdm(total=len(dataset) - done, desc="encode latents", disable=not progress, dynamic_ncols=True)
    start = 0
    for bucket, indices in _segments(dataset):
        # Parts end at part_items or at a bucket's end, so what is done ends a part: a multiple of part_items of
        # this run, and the resumed encoding batches as an unbroken one.
        rest = indices[max(0, done - start):]
        start += len(indices)
        if not rest:
            continue
        writer.bucket = bucket
        loader = DataLoader(Subset(dataset, rest), batch_size=min(ENCODE_BATCH, part_items), shuffle=False,
                            num_workers=num_workers)
        for batch in loader:
            writer.add(_encode_batch(model, batch, device))
            progress_bar.update(len(batch["label"]))
        writer.add({}, last=True)
    progress_bar.close()


def load_or_build_latent_cache(model: LatentDiffusion, dataset: Dataset, data: DataConfig, run_dir: Path,
                               env: DistEnv, num_workers: int = 0,
                               part_items: int = CACHE_PART_ITEMS) -> LatentCacheDataset:
    """Reuse ``run_dir/latent_cache`` if its key matches and it is complete (``data`` is the config ``dataset``
    was built from), else encode what is missing of ``dataset`` (rank 0)."""
    folder = run_dir / CACHE_DIR
    key = latent_cache_key(model.config, data)
    if env.is_main:
        index = _read_index(folder, key)
        if index is not None and sum(part["items"] for part in index["parts"]) == len(dataset):
            logger.info("reusing the latent cache %s", folder)
        else:
            if index is None and (folder / "index.json").exists():
                logger.info("the latent cache %s was made from another first stage or data: re-encoding", folder)
            build_latent_cache(model, dataset, folder, key, env.device, num_workers, part_items)
            logger.info("wrote the latent cache %s (%d items)", folder, len(dataset))
    if env.distributed:
        dist.barrier()
    return LatentCacheDataset.from_index(folder, _read_index(folder, key))


def read_latent_cache(run_dir: Path) -> dict[str, torch.Tensor]:
    """A run's whole latent cache as tensors (``params``, ``labels``, ``cond.*``), its parts joined: for inspection."""
    folder = Path(run_dir) / CACHE_DIR
    index = json.loads((folder / "index.json").read_text())
    joined: dict[str, list[torch.Tensor]] = {}
    for part in index["parts"]:
        with safe_open(str(folder / part["file"]), framework="pt") as f:
            for name in f.keys():
                joined.setdefault(name, []).append(f.get_tensor(name))
    return {name: torch.cat(values) for name, values in joined.items()}
