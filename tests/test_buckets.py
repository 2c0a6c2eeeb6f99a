"""Tests for latentdiff.data.buckets: bucket sizes and assignment (known answers), and the bucket batch sampler:
batches within one bucket, the same global order for 1 and 2 processes, exact resume."""

from __future__ import annotations

import itertools

import pytest

from latentdiff.data.buckets import BucketBatchSampler, assign_bucket, bucket_sizes


def test_bucket_sizes_at_sd_resolution_match_kohyas_list():
    sizes = bucket_sizes(512, 64, 256, 1024)
    # the 17 sizes of kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), as (height, width), tallest first
    assert sizes == [(1024, 256), (960, 256), (896, 256), (832, 256), (768, 320), (704, 320), (640, 384),
                     (576, 448), (512, 512), (448, 576), (384, 640), (320, 704), (320, 768), (256, 832), (256, 896),
                     (256, 960), (256, 1024)]
    assert all(h * w <= 512 * 512 and h % 64 == 0 and w % 64 == 0 for h, w in sizes)


def test_bucket_sizes_refuse_impossible_geometry():
    with pytest.raises(ValueError, match="data.bucket_step"):
        bucket_sizes(32, 64, 32, 64)
    with pytest.raises(ValueError, match="no bucket fits"):
        bucket_sizes(64, 8, 80, 96)


@pytest.mark.parametrize("height, width, bucket", [
    (512, 512, (512, 512)),
    (480, 640, (448, 576)),  # 4:3 landscape: 0.75 is closest to 448/576 = 0.78
    (640, 480, (576, 448)),
    (1080, 1920, (384, 640)),  # 16:9: 0.5625 against 0.6 (384x640) and 0.42 (320x768)
    (100, 1000, (256, 1024)),  # beyond the widest bucket: the widest
    (1000, 10, (1024, 256)),
])
def test_each_image_goes_to_the_bucket_of_closest_aspect_ratio(height, width, bucket):
    sizes = bucket_sizes(512, 64, 256, 1024)
    assert sizes[assign_bucket(height, width, sizes)] == bucket


def test_log_scale_assignment_is_symmetric_where_a_linear_one_is_not():
    sizes = [(2, 1), (1, 1), (1, 2)]  # ratios 2, 1, 0.5
    # sqrt(2):1 is equally far from 2:1 and 1:1 in log scale; tie -> the first listed
    assert assign_bucket(141, 100, sizes) == 1 and assign_bucket(100, 141, sizes) == 1
    assert assign_bucket(150, 100, sizes) == 0 and assign_bucket(100, 150, sizes) == 2


BUCKETS = [0] * 7 + [1] * 3 + [2] * 12 + [3]  # 23 items in four buckets of uneven sizes


def take(sampler, steps):
    return list(itertools.islice(iter(sampler), steps))


def test_batches_never_mix_buckets_and_every_item_is_seen_each_epoch():
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=3)
    assert sampler.per_epoch == 2 + 1 + 3 + 1
    epoch = take(sampler, sampler.per_epoch)
    assert all(len(batch) == 4 and len({BUCKETS[i] for i in batch}) == 1 for batch in epoch)
    assert {i for batch in epoch for i in batch} == set(range(len(BUCKETS)))
    assert epoch != take(BucketBatchSampler(BUCKETS, batch_size=4, seed=3, start_step=sampler.per_epoch),
                         sampler.per_epoch)  # the next epoch is another order


def test_two_processes_see_the_global_batches_of_one_and_resume_exactly():
    steps = 20  # almost three epochs
    single = take(BucketBatchSampler(BUCKETS, batch_size=4, seed=1), steps)
    ranks = [take(BucketBatchSampler(BUCKETS, batch_size=2, seed=1, rank=r, world_size=2), steps) for r in (0, 1)]
    for step in range(steps):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(single[step])
        assert ranks[0][step] == single[step][0::2] and ranks[1][step] == single[step][1::2]
    for start in (5, 7, 13):
        assert take(BucketBatchSampler(BUCKETS, batch_size=4, seed=1, start_step=start), steps - start) == \
            single[start:]
        resumed = take(BucketBatchSampler(BUCKETS, batch_size=2, seed=1, start_step=start, rank=1, world_size=2),
                       steps - start)
        assert resumed == ranks[1][start:]
