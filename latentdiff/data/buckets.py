"""Aspect-ratio buckets (as kohya's sd-scripts and SDXL train): sizes of about one area, each image's closest bucket,
and a resumable, DDP-shardable batch sampler whose batches never mix buckets.

Bucket sizes (:func:`bucket_sizes`): every ``(height, width)`` with both sides multiples of ``step`` in
``[min_side, max_side]`` and an area of at most ``resolution ** 2``: for each width, the tallest such height (and the
transposed size), plus the square. That is kohya's list; SDXL's hand-made list is the same idea at 1024.

Assignment (:func:`assign_bucket`): the bucket whose aspect ratio is closest to the image's in log scale, so that
2:1 and 1:2 are equally far from 1:1 (kohya compares w / h linearly, which favours wide buckets); ties go to the
first bucket in the sorted list. The image is then resized to cover its bucket and cropped (``data.crop``).

Batches (:class:`BucketBatchSampler`): each epoch, a generator seeded with (seed, epoch) permutes every bucket's
items and cuts them into global batches (``batch_size * world_size``); a bucket's last batch is filled up with the
first items of its own permutation, so no image is left out and no batch mixes sizes. The epoch's global batches
are then shuffled together. Process ``r`` of ``W`` takes every W-th item of each global batch, as
``ResumableBatchSampler`` does: the global order depends only on (seed, global batch size, step), so W processes
with batch B see what one process with batch W * B sees, and a resumed run starts at the exact batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

Size = tuple[int, int]  # (height, width), as SDXL's original_size and torch tensors order them


def bucket_sizes(resolution: int, step: int, min_side: int, max_side: int) -> list[Size]:
    """The ``(height, width)`` buckets of area at most ``resolution ** 2`` with sides multiples of ``step`` in
    ``[min_side, max_side]``, sorted by aspect ratio (height / width, tallest first)."""
    if step < 1 or resolution < step or min_side < 1 or max_side < min_side:
        raise ValueError(f"buckets need 1 <= data.bucket_step <= data.bucket_resolution (0: image_size) and "
                         f"1 <= data.min_bucket_side <= data.max_bucket_side, got resolution {resolution}, step "
                         f"{step}, sides {min_side}..{max_side}")
    area = resolution * resolution
    first = math.ceil(min_side / step) * step
    square = min(max_side, resolution // step * step)
    sizes = {(square, square)} if square >= first else set()
    for width in range(first, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= first:
            sizes.update({(height, width), (width, height)})
    if not sizes:
        raise ValueError(f"no bucket fits: sides {min_side}..{max_side} in steps of {step} at area {resolution}^2")
    return sorted(sizes, key=lambda s: (-s[0] / s[1], s[0]))


def assign_bucket(height: int, width: int, sizes: Sequence[Size]) -> int:
    """Index in ``sizes`` of the bucket whose aspect ratio is closest to ``height / width`` (log scale)."""
    target = math.log(height / width)
    errors = [abs(math.log(h / w) - target) for h, w in sizes]
    return errors.index(min(errors))


class BucketBatchSampler(Sampler[list[int]]):
    """Endless batches drawn within one bucket each, from any global step (see the module docstring).

    ``item_buckets[i]`` is item i's bucket; items of other buckets never share a batch.
    """

    def __init__(self, item_buckets: Sequence[int], batch_size: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if not item_buckets:
            raise ValueError("the bucket sampler needs at least one item")
        self.members: dict[int, list[int]] = {}
        for index, bucket in enumerate(item_buckets):
            self.members.setdefault(int(bucket), []).append(index)
        self.global_batch = batch_size * world_size
        self.seed, self.start_step, self.rank, self.world = seed, start_step, rank, world_size
        self.per_epoch = sum(math.ceil(len(m) / self.global_batch) for m in self.members.values())

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``, in the order they are trained."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        batches = []
        for bucket in sorted(self.members):
            members = self.members[bucket]
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            count = math.ceil(len(order) / self.global_batch)
            # Wrapping around fills the last batch (and a bucket smaller than one batch) from the same bucket.
            filled = [order[i % len(order)] for i in range(count * self.global_batch)]
            batches += [filled[b * self.global_batch:(b + 1) * self.global_batch] for b in range(count)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_step, self.per_epoch)
        while True:
            for batch in self.epoch_batches(epoch)[offset:]:
                yield batch[self.rank::self.world]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a length for progress display
        return self.per_epoch
