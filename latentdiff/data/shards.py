"""Training on webdataset tar shards: a shard set as a dataset, and its seeded, resumable stream for training.

``data.shards`` selects a shard set (a path, brace pattern, glob or folder: ``latentdiff.data.webdataset``); it then
replaces ``data.name``, which only names the data in logs. A shard set has no held-out split: "test" reads the same
samples (give another shard set to evaluate). A sample needs an image member (png, jpg, jpeg, webp, bmp); its
caption is the ``txt`` member and its class the ``cls`` member (-1 without). When some samples have a caption, those
without one are skipped, counted when the set is opened. ``data.limit`` keeps the first samples in listing order.
Items are ``{"image", "label", "key"[, "caption"]}``, ``key`` being the sample's key in its shard.

Opening the set reads every shard's tar headers once (no image data) to count its samples: the counts let the
stream split each epoch evenly. ``ShardDataset`` reads items by index (sequentially is cheap: the latent cache, the
caption vocabulary and the sample grids read it so); training streams it through ``ShardStream``.

The stream, and its guarantees. With T = world size x max(1, num_workers) streams, epoch e orders the shards by a
permutation seeded with (seed, e) and cuts the concatenation of their samples into T equal runs of
L = N // T samples, run t going to stream t (rank r's DataLoader worker j is stream r * W + j). Each stream reads its
run in order (sequential reads, whole shards but for the run's ends) through a shuffle buffer of
``data.shuffle_buffer`` samples seeded with (seed, e, t), and yields K = L // batch whole batches of it. So within an
epoch no sample is seen twice across all ranks and workers, and each is seen once when N is a multiple of
T x batch (otherwise fewer than T x (batch + 1) samples sit that epoch out, different ones each epoch). The order is
a function of (seed, step) alone: step s is rank r's batch from worker s mod W, so a run resumed at step k skips
each stream to its place (replaying the buffer over tar headers, without reading images) and continues with exactly
the samples the uninterrupted run would have seen, flips included (drawn from the stream's generator). This holds
for the same shards, seed, batch size, world size and ``num_workers``; changing one of them changes the order.
"""

from __future__ import annotations

import bisect
import io
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from itertools import count
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from latentdiff.data.datasets import IMAGE_EXTENSIONS, DataConfig, _check_split
from latentdiff.data.image_files import open_checked
from latentdiff.data.transforms import convert_mode, fit_to_size, to_tensor
from latentdiff.data.webdataset import ShardError, TarSample, expand_shards, tar_samples

logger = logging.getLogger(__name__)

T = TypeVar("T")
IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


def _image_member(sample: TarSample) -> str | None:
    return next((ext for ext in IMAGE_MEMBERS if ext in sample.members), None)


class ShardDataset(Dataset):
    """The samples of ``cfg.shards`` by index (see the module docstring); ``counts[i]``: samples used of shard i."""

    num_classes: int | None = None

    def __init__(self, cfg: DataConfig, split: str) -> None:
        _check_split(split)
        self.cfg, self.split, self.name = cfg, split, cfg.shards
        self.flip = cfg.random_flip and split == "train"
        self.paths = expand_shards(cfg.shards)
        kinds = [[(_image_member(s) is not None, "txt" in s.members) for s in tar_samples(p)] for p in self.paths]
        self.captioned = any(image and text for shard in kinds for image, text in shard)
        counts = [sum(image and (text or not self.captioned) for image, text in shard) for shard in kinds]
        without_image = sum(not image for shard in kinds for image, _ in shard)
        without_caption = sum(len(shard) for shard in kinds) - without_image - sum(counts)
        if cfg.limit > 0:
            budget = [max(0, cfg.limit - sum(counts[:i])) for i in range(len(counts))]
            counts = [min(n, left) for n, left in zip(counts, budget, strict=True)]
        self.counts = counts
        self.starts = np.cumsum([0, *counts]).tolist()
        if without_image or without_caption:
            logger.warning("shards %s: skipped %d samples without an image and %d without a caption", cfg.shards,
                           without_image, without_caption)
        if len(self) == 0:
            raise ShardError(f"the shards {cfg.shards!r} hold no usable samples (an image member, and a caption "
                             "where the set has captions)")
        self._cached: tuple[int, list[TarSample]] | None = None  # the last shard read by index

    def _usable(self, sample: TarSample) -> bool:
        return _image_member(sample) is not None and (not self.captioned or "txt" in sample.members)

    def samples(self, shard: int) -> Iterator[TarSample]:
        """The first ``counts[shard]`` usable samples of a shard, from its headers."""
        usable = (s for s in tar_samples(self.paths[shard]) if self._usable(s))
        return (s for _, s in zip(range(self.counts[shard]), usable, strict=False))

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, index: int) -> tuple[int, TarSample]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        shard = bisect.bisect_right(self.starts, index) - 1
        if self._cached is None or self._cached[0] != shard:
            self._cached = (shard, list(self.samples(shard)))
        return shard, self._cached[1][index - self.starts[shard]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, sample = self._locate(index)
        with self.paths[shard].open("rb") as file:
            data = sample.read(file)
        sample.data = None  # the cached listing keeps headers, not images
        return self.decode(sample.key, data, flip=self.flip and bool(torch.rand(()) < 0.5), shard=shard)

    def caption(self, index: int) -> str:
        """The caption of item ``index`` (read without its image)."""
        shard, sample = self._locate(index)
        with self.paths[shard].open("rb") as file:
            file.seek(sample.members["txt"][0])
            return file.read(sample.members["txt"][1]).decode("utf-8").strip()

    def decode(self, key: str, data: dict[str, bytes], flip: bool, shard: int) -> dict[str, Any]:
        """A sample's members -> the item; an image that does not decode is an error naming the shard and key."""
        ext = next(e for e in IMAGE_MEMBERS if e in data)
        try:
            with open_checked(data[ext], f"{self.paths[shard]} sample {key!r}") as img:
                img.load()
                img = ImageOps.exif_transpose(img)
        except Exception as e:  # whatever the decoder raises for a bad image
            raise ShardError(f"shard {self.paths[shard]}, sample {key!r}: cannot decode its {ext} "
                             f"({type(e).__name__}: {e})") from e
        image = to_tensor(fit_to_size(convert_mode(img, self.cfg.channels), self.cfg.image_size, self.cfg.resize))
        item: dict[str, Any] = {"image": image.flip(-1) if flip else image, "key": key,
                                "label": int(data["cls"].decode().strip()) if "cls" in data else -1}
        if self.captioned:
            item["caption"] = data["txt"].decode("utf-8").strip()
        return item

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cached": None}  # workers read their own shards

    def __repr__(self) -> str:
        c = self.cfg
        return (f"ShardDataset(shards={c.shards!r}, shard_files={len(self.paths)}, len={len(self)}, "
                f"captioned={self.captioned}, image_size={c.image_size}, channels={c.channels})")


def buffer_shuffle(samples: Iterator[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Webdataset's shuffle: fill a buffer of ``size``, then emit a random entry for each new one, then drain it."""
    buffer: list[T] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = sample
    while buffer:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


class ShardStream(IterableDataset):
    """Endless items of a ``ShardDataset`` for one rank, from ``start_step`` on (see the module docstring); give it
    to a DataLoader with ``batch_size`` and ``num_workers``."""

    def __init__(self, dataset: ShardDataset, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0) -> None:
        self.dataset, self.batch, self.seed, self.start_step = dataset, batch_size, seed, start_step
        self.rank, self.workers = rank, max(1, num_workers)
        self.streams = world_size * self.workers
        self.run_length = len(dataset) // self.streams
        self.batches_per_epoch = self.run_length // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"the shards hold {len(dataset)} samples, fewer than one batch of {batch_size} for each "
                             f"of the {self.streams} streams (world size x DataLoader workers)")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        first = self.start_step + worker  # this worker's steps: first, first + W, ... (the DataLoader's turns)
        steps_per_epoch = self.batches_per_epoch * self.workers
        stream = self.rank * self.workers + first % self.workers
        first_epoch, within = divmod(first, steps_per_epoch)
        for epoch in count(first_epoch):
            skip = (within // self.workers) * self.batch if epoch == first_epoch else 0
            yield from self.epoch_items(epoch, stream, skip)

    def shard_order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset.paths)).tolist()

    def run(self, epoch: int, stream: int) -> Iterator[tuple[int, TarSample]]:
        """(shard, sample) of stream ``stream``'s run of epoch ``epoch``, in shard order, from headers."""
        start, end, position = stream * self.run_length, (stream + 1) * self.run_length, 0
        for shard in self.shard_order(epoch):
            n = self.dataset.counts[shard]
            if position < end and position + n > start:
                for i, sample in enumerate(self.dataset.samples(shard)):
                    if position + i >= end:
                        break
                    if position + i >= start:
                        yield shard, sample
            position += n

    def epoch_items(self, epoch: int, stream: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """The stream's K x batch items of one epoch, the first ``skip`` left out (not read, nor decoded)."""
        rng = np.random.default_rng([self.seed, epoch, stream])
        wanted, emitted = self.batches_per_epoch * self.batch, 0
        with ExitStack() as stack:
            files: dict[int, io.BufferedReader] = {}

            def entering() -> Iterator[tuple[int, TarSample]]:
                for shard, sample in self.run(epoch, stream):
                    if shard not in files:
                        files[shard] = stack.enter_context(self.dataset.paths[shard].open("rb"))
                    if emitted >= skip:
                        sample.read(files[shard])  # read as the run goes by: sequential I/O
                    yield shard, sample

            for shard, sample in buffer_shuffle(entering(), max(1, self.dataset.cfg.shuffle_buffer), rng):
                if emitted == wanted:
                    return
                flip = self.dataset.flip and bool(rng.random() < 0.5)
                if emitted >= skip:  # a sample that entered the buffer while skipping is read now
                    yield self.dataset.decode(sample.key, sample.read(files[shard]), flip, shard)
                emitted += 1
