"""Webdataset shards: patterns, reading and writing (with webdataset itself), make-shards, and the stream's
guarantees: each sample once per epoch across ranks x workers, and exact resume (loader, trainer, 2 gloo ranks)."""

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from latentdiff.cli import main
from latentdiff.data import DataConfig, build_dataset
from latentdiff.data.shards import ShardDataset, ShardStream
from latentdiff.data.webdataset import ShardError, ShardWriter, expand_shards, split_key
from latentdiff.train.loop import DistEnv, TrainConfig, make_loader
from latentdiff.train.trainer import ScheduledOptimizer, Trainer

REPO = Path(__file__).resolve().parents[1]


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 6, 3), value % 256, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_set(folder: Path, sizes: list[int], caption: bool = True) -> str:
    """Shards of the given sizes (uneven on purpose), sample keys s00000, s00001, ... with captions; the pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    key = 0
    for shard, size in enumerate(sizes):
        with tarfile.open(folder / f"data-{shard:06d}.tar", "w") as tar:
            for _ in range(size):
                members = {"png": png(key), **({"txt": f"sample {key}".encode()} if caption else {})}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"s{key:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                key += 1
    return str(folder / f"data-{{000000..{len(sizes) - 1:06d}}}.tar")


def shard_data(pattern: str, **settings) -> ShardDataset:
    return build_dataset(DataConfig(shards=pattern, image_size=6, channels=3, **settings), "train")


# ------------------------------------------------------------------------------------------- format and patterns


def test_patterns_expand_braces_with_padding_globs_folders_and_lists(tmp_path):
    for name in ("data-000008.tar", "data-000009.tar", "data-000010.tar", "x.tar"):
        (tmp_path / name).write_bytes(b"")
    names = [p.name for p in expand_shards(str(tmp_path / "data-{000008..000010}.tar"))]
    assert names == ["data-000008.tar", "data-000009.tar", "data-000010.tar"]
    assert [p.name for p in expand_shards(str(tmp_path / "data-00000{8,9}.tar"))] == names[:2]
    assert [p.name for p in expand_shards(str(tmp_path / "data-*.tar"))] == names
    assert [p.name for p in expand_shards(str(tmp_path))] == [*names, "x.tar"]
    assert [p.name for p in expand_shards(f"{tmp_path / 'x.tar'}::{tmp_path / 'data-000008.tar'}")] == \
        ["x.tar", "data-000008.tar"]
    assert [p.name for p in expand_shards([str(tmp_path / "x.tar")])] == ["x.tar"]
    with pytest.raises(ShardError, match=r"data-000011.tar' does not exist"):
        expand_shards(str(tmp_path / "data-{000010..000011}.tar"))
    with pytest.raises(ShardError, match="no shard matches"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    assert split_key("a/b/000123.seg.png") == ("a/b/000123", "seg.png") and split_key("README") is None


def test_samples_group_by_key_and_skip_those_without_image_or_caption(tmp_path, caplog):
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.png", png(1)), ("a.txt", b"first"), ("a.cls", b"3"), ("b.png", png(2)),
                           ("c.txt", b"no image"), ("d.JPG", b""), ("e.png", png(5)), ("e.txt", b" fifth \n")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = shard_data(str(path))
    assert len(data) == 2 and data.captioned
    assert [data[i]["key"] for i in range(2)] == ["a", "e"]
    assert data[0]["label"] == 3 and data[0]["caption"] == "first" and data.caption(1) == "fifth"
    assert data[1]["label"] == -1 and data[1]["image"].shape == (3, 6, 6)
    assert "skipped 1 samples without an image and 2 without a caption" in caplog.text  # c; b and d (no txt)
    with pytest.raises(IndexError):
        data[2]


def test_a_corrupt_image_or_shard_is_one_clear_error(tmp_path):
    writer = ShardWriter(tmp_path, 10, 2**20)
    writer.write("good", {"png": png(1)})
    writer.write("bad", {"png": b"not a png"})
    writer.finish()
    data = shard_data(str(tmp_path))
    with pytest.raises(ShardError, match=r"data-000000.tar, sample 'bad': cannot decode its png"):
        data[1]
    (tmp_path / "data-000000.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ShardError, match="cannot read the shard"):
        shard_data(str(tmp_path))


def test_webdataset_reads_our_shards_and_we_read_its_shards(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    ours = write_set(tmp_path / "ours", [3, 2])
    read = list(webdataset.WebDataset(ours, shardshuffle=False))
    assert [s["__key__"] for s in read] == [f"s{i:05d}" for i in range(5)]
    assert read[4]["png"] == png(4) and read[4]["txt"] == b"sample 4"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for shard in range(2):
        with webdataset.TarWriter(str(theirs / f"w-{shard:06d}.tar")) as sink:
            for i in range(3):
                key = shard * 3 + i
                sink.write({"__key__": f"k{key:03d}", "png": png(key), "txt": f"their {key}", "cls": key % 2})
    data = shard_data(str(theirs / "w-{000000..000001}.tar"))
    assert [data[i]["key"] for i in range(6)] == [f"k{i:03d}" for i in range(6)]
    assert data[4]["caption"] == "their 4" and data[5]["label"] == 1
    assert torch.equal(data[4]["image"], torch.full((3, 6, 6), 4 / 127.5 - 1))


# --------------------------------------------------------------------------------------------------- make-shards


def test_make_shards_splits_by_count_and_size_and_never_overwrites_unasked(tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(7):
        path = folder / ("sub" if i % 2 else "") / f"im.{i}.png"
        path.write_bytes(png(i * 30))
        if i != 3:
            path.with_suffix(".txt").write_text(f"caption {i}")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "shards"
    assert main(["make-shards", str(folder), str(out), "--max-count", "3"]) == 0
    assert f"data.shards={out}/data-{{000000..000002}}.tar" in capsys.readouterr().out
    data = shard_data(str(out))
    assert len(data) == 6 and data.counts == [3, 2, 1]  # sub/im.3.png has no caption: skipped when reading
    assert main(["make-shards", str(folder), str(out)]) == 2
    assert "already holds 3 shards: give --overwrite" in capsys.readouterr().err
    assert main(["make-shards", str(folder), str(out), "--overwrite", "--max-size", "0.0005"]) == 0
    assert len(list(out.glob("*.tar"))) == 7 and not list(out.glob(".*"))  # one ~700-byte sample per shard
    assert main(["make-shards", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "is not a folder of images" in capsys.readouterr().err


def test_make_shards_reads_captions_as_data_path_does_metadata_first(tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "sub/c.png", "d.png"]):
        (folder / name).write_bytes(png(i * 40))
    (folder / "a.txt").write_text("from the txt\nsecond line")  # the metadata's row wins over it
    (folder / "d.txt").write_text("\n  only the txt  \n")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a pink circle"}\n'
                                           '{"file_name": "sub/c.png", "text": "a red square"}\n')
    out = tmp_path / "shards"
    assert main(["make-shards", str(folder), str(out)]) == 0
    with tarfile.open(out / "data-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    captions = {json.loads(members[name])["file_name"]: members.get(name.replace(".json", ".txt"))
                for name in members if name.endswith(".json")}
    assert captions == {"a.png": b"a pink circle", "b.png": None, "d.png": b"only the txt",
                        "sub/c.png": b"a red square"}
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')  # no text column: one line, nothing written
    assert main(["make-shards", str(folder), str(tmp_path / "other")]) == 2
    assert "metadata.jsonl:1: a metadata row needs the columns file_name and text" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------------------------------------- the stream


def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path):
    data = shard_data(write_set(tmp_path, [7, 1, 12, 4]), shuffle_buffer=5)  # 24 samples, uneven shards
    for world, workers, batch in [(1, 1, 4), (2, 2, 3), (3, 1, 2)]:
        for epoch in range(2):
            keys = [item["key"] for rank in range(world)
                    for stream in range(rank * workers, (rank + 1) * workers)
                    for item in ShardStream(data, batch, 7, 0, rank, world, workers).epoch_items(epoch, stream)]
            assert sorted(keys) == sorted(f"s{i:05d}" for i in range(24)), (world, workers, batch, epoch)
    orders = [[item["key"] for item in ShardStream(data, 4, 7).epoch_items(epoch, 0)] for epoch in range(2)]
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])  # shuffled, differently each epoch
    with pytest.raises(ValueError, match="fewer than one batch of 5 for each of the 6 streams"):
        ShardStream(data, 5, 0, world_size=3, num_workers=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_resumes_at_the_exact_sample(tmp_path, workers):
    data = shard_data(write_set(tmp_path, [5, 9, 3]), shuffle_buffer=4, random_flip=True)  # 17: 2 batches/epoch
    cfg = TrainConfig(batch_size=3, seed=3, num_workers=workers)

    def batches(start: int, steps: int) -> list[tuple[list[str], torch.Tensor]]:
        loader = make_loader(data, cfg, DistEnv(), start)
        return [(b["key"], b["image"]) for b in (next(loader) for _ in range(steps))]

    whole, resumed = batches(0, 9), batches(5, 4)
    for (keys, images), (resumed_keys, resumed_images) in zip(whole[5:], resumed, strict=True):
        assert keys == resumed_keys and torch.equal(images, resumed_images)  # the flips too
    per_epoch = 2 * max(1, workers)
    for epoch in range(2):
        keys = [k for batch, _ in whole[epoch * per_epoch:(epoch + 1) * per_epoch] for k in batch]
        assert len(set(keys)) == len(keys)


class KeyLogTrainer(Trainer):
    """A linear model on the images' means that writes the keys of every batch it trains on to keys.txt."""

    def build(self, resuming: bool) -> None:
        self.model = nn.Linear(3, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.optimizers = {"optimizer": ScheduledOptimizer(self.optimizer, 0.1)}

    def training_data(self):
        return build_dataset(self.exp.data, "train")

    def describe(self) -> str:
        return "a key log"

    def prepare_samples(self) -> None:
        pass

    def train_step(self, batch, step):
        with (self.run_dir / "keys.txt").open("a") as f:
            f.write(f"{step} {' '.join(batch['key'])}\n")
        loss = self.model(batch["image"].mean((2, 3))).square().mean()
        return {"loss": loss.detach()} if self.optimizer_step(loss, self.optimizer, step) else None

    def save_samples(self, path: Path) -> None:
        pass


def test_training_stopped_and_resumed_sees_the_uninterrupted_runs_samples(tmp_path):
    pattern = write_set(tmp_path / "shards", [6, 6, 6])

    @dataclass
    class Keys:
        task: str = "keys"
        data: DataConfig = field(default_factory=lambda: DataConfig(shards=pattern, image_size=6, channels=3,
                                                                    shuffle_buffer=3))
        train: TrainConfig = field(default_factory=TrainConfig)

    def run(out: Path, steps: int, resume: Path | None = None) -> list[str]:
        train = TrainConfig(out_dir=str(out), steps=steps, batch_size=4, num_workers=2, device="cpu", threads=1,
                            ckpt_every=4, log_every=4, sample_every=0)
        KeyLogTrainer(Keys(train=train), resume=resume).run()
        return (out / "keys.txt").read_text().splitlines()

    whole = run(tmp_path / "whole", 11)
    run(tmp_path / "parts", 6)  # stops at step 6; its last checkpoint is step 6
    assert run(tmp_path / "parts", 11, resume=tmp_path / "parts") == whole


RANK_SCRIPT = """
import sys
from latentdiff.data import DataConfig, build_dataset
from latentdiff.train.loop import TrainConfig, make_loader, setup_distributed
env = setup_distributed("cpu")
data = build_dataset(DataConfig(shards=sys.argv[1], image_size=6, channels=3, shuffle_buffer=4), "train")
cfg = TrainConfig(batch_size=2, seed=5, num_workers=2)
for start, steps, name in ((0, 8, "whole"), (3, 5, "resumed")):
    loader = make_loader(data, cfg, env, start)
    with open(f"{sys.argv[2]}/{name}-{env.rank}.txt", "w") as f:
        f.writelines(" ".join(next(loader)["key"]) + "\\n" for _ in range(steps))
"""


def test_two_gloo_ranks_split_each_epoch_without_duplicates_and_resume_exactly(tmp_path):
    pattern = write_set(tmp_path, [9, 7])  # 16 = 2 ranks x 2 workers x batch 2 x 2 steps: 4 steps per epoch
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29531", str(script), pattern, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = {(name, rank): (tmp_path / f"{name}-{rank}.txt").read_text().split("\n")[:-1]
             for name in ("whole", "resumed") for rank in (0, 1)}
    for epoch in range(2):
        keys = [k for rank in (0, 1) for line in steps["whole", rank][epoch * 4:(epoch + 1) * 4] for k in line.split()]
        assert Counter(keys) == Counter(f"s{i:05d}" for i in range(16))
    for rank in (0, 1):
        assert steps["resumed", rank] == steps["whole", rank][3:]
