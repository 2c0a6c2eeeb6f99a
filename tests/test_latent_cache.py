"""The sharded latent cache: parts in dataset order, an interrupted build resumed, a changed key rebuilt, items
read back exactly, and a frozen text encoder's cached states conditioning as its ids do."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_captioned import TINY, make_captioned_folder
from test_embedders import TINY_CLIP
from torch import nn
from torch.utils.data import Dataset

from latentdiff.cli import main
from latentdiff.conditioning.conditioner import Conditioner, ConditionerConfig
from latentdiff.conditioning.embedders.clip_text import CLIPEncoderConfig
from latentdiff.data import CaptionedFolderDataset, DataConfig
from latentdiff.train import latent_cache
from latentdiff.train.latent_cache import LatentCacheDataset, build_latent_cache, read_latent_cache
from latentdiff.train.loop import DistEnv, TrainConfig, make_loader


class Images(Dataset):
    def __init__(self, n: int) -> None:
        self.images = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": index}


class HalvingStage(nn.Module):
    """A stand-in first stage: every other pixel, halved."""

    pixel_space = False
    cond_stage_model = None

    def first_stage_parameters(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2] * 0.5


def cached(folder) -> LatentCacheDataset:
    return LatentCacheDataset.from_index(folder, json.loads((folder / "index.json").read_text()))


def test_an_interrupted_build_resumes_after_its_last_part_and_reads_back_exactly(tmp_path, monkeypatch):
    data, model = Images(10), HalvingStage()
    build_latent_cache(model, data, tmp_path / "whole" / "latent_cache", "key", torch.device("cpu"), part_items=4,
                       progress=False)
    whole = read_latent_cache(tmp_path / "whole")
    assert torch.equal(whole["params"], data.images[:, :, ::2, ::2] * 0.5)
    assert whole["labels"].tolist() == list(range(10))

    folder = tmp_path / "part" / "latent_cache"
    encoded, original = [], latent_cache._encode_batch

    def interrupted(model, batch, device):
        if len(encoded) == 2:
            raise KeyboardInterrupt
        encoded.append(batch["label"].tolist())
        return original(model, batch, device)

    monkeypatch.setattr(latent_cache, "_encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(model, data, folder, "key", torch.device("cpu"), part_items=4, progress=False)
    assert [p["items"] for p in json.loads((folder / "index.json").read_text())["parts"]] == [4, 4]
    encoded.clear()
    monkeypatch.setattr(latent_cache, "_encode_batch", original)
    build_latent_cache(model, data, folder, "key", torch.device("cpu"), part_items=4, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", *(f"part-{i:06d}.safetensors" for i in range(3))]
    items = cached(folder)
    assert len(items) == 10 and items[9]["label"] == 9
    assert all(torch.equal(items[i]["params"], whole["params"][i]) for i in range(10))

    monkeypatch.setattr(latent_cache, "_encode_batch", interrupted)  # another key: everything is encoded again
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(model, data, folder, "another key", torch.device("cpu"), part_items=4, progress=False)
    assert encoded == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(list(folder.glob("part-*"))) == 2
    with pytest.raises(ValueError, match="divide into encoding batches"):
        build_latent_cache(model, data, folder, "key", torch.device("cpu"), part_items=300)


def test_cached_frozen_text_states_condition_as_the_ids_do():
    conditioner = Conditioner(ConditionerConfig([CLIPEncoderConfig(model=TINY_CLIP, dropout=0.5)]), image_size=16,
                              image_channels=3, latent_channels=4, latent_size=8)
    embedder = conditioner.embedder("caption")
    assert not any(p.requires_grad for p in embedder.parameters())  # frozen: the cache holds its states
    prepared = conditioner.prepare({"caption": ["a red bag", "a blue boot on the left", "", "the bag"]})
    states, _ = embedder.transformer.encode_ids(prepared["input_ids"])
    from_cache = conditioner.prepare({"input_ids": prepared["input_ids"], "caption.states": states})
    assert set(from_cache) == {"input_ids", "caption.states"}
    drop = torch.zeros(4, len(conditioner.config.dropout_columns), dtype=torch.bool)
    drop[[1, 3], conditioner.dropout_column("caption")] = True
    expected = conditioner(prepared, drop)["context"]
    torch.testing.assert_close(conditioner(from_cache, drop)["context"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1])


def test_a_bucketed_cache_resumes_its_build_and_draws_the_batches_and_latents_of_an_uncached_run(tmp_path,
                                                                                                 monkeypatch):
    folder = make_captioned_folder(tmp_path / "mine", count=11, sizes=((16, 16), (32, 16), (16, 32)))
    data = CaptionedFolderDataset(DataConfig(path=str(folder), channels=3, image_size=16, buckets=True,
                                             bucket_step=8), "train")
    assert sorted(data.item_buckets.count(b) for b in set(data.item_buckets)) == [3, 4, 4]
    cache, model = tmp_path / "cache", HalvingStage()
    calls, original = [], latent_cache._encode_batch

    def interrupted(model, batch, device):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(len(batch["label"]))
        return original(model, batch, device)

    monkeypatch.setattr(latent_cache, "_encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(model, data, cache, "key", torch.device("cpu"), part_items=3, progress=False)
    monkeypatch.setattr(latent_cache, "_encode_batch", original)
    build_latent_cache(model, data, cache, "key", torch.device("cpu"), part_items=3, progress=False)
    index = json.loads((cache / "index.json").read_text())
    assert index["item_buckets"] == data.item_buckets
    # bucket by bucket, each bucket's last part cut short; the resumed build went on after the third part
    buckets = sorted(set(data.item_buckets))
    sizes = [data.item_buckets.count(b) for b in buckets]
    expected = [(b, n) for b, size in zip(buckets, sizes, strict=True) for n in [3] * (size // 3) + [size % 3] if n]
    assert [(p["bucket"], p["items"]) for p in index["parts"]] == expected
    assert calls == [n for _, n in expected[:3]] and len(expected) == 5

    items, cfg, env = cached(cache), TrainConfig(batch_size=3, seed=5), DistEnv()
    plain, from_cache = make_loader(data, cfg, env, 0), make_loader(items, cfg, env, 0)
    batches = [next(plain) for _ in range(9)]  # more than two epochs of 4 batches
    assert {tuple(b["image"].shape[2:]) for b in batches} == {data.bucket_sizes[b] for b in buckets}
    for batch in batches:
        assert torch.equal(next(from_cache)["params"], model.first_stage_parameters(batch["image"]))
    resumed = make_loader(items, cfg, env, 6)
    for batch in batches[6:]:
        assert torch.equal(next(resumed)["params"], model.first_stage_parameters(batch["image"]))


def test_a_bucketed_cached_run_resumes_bit_identically(tmp_path, scenes_first_stage):
    folder = make_captioned_folder(tmp_path / "mine", count=9, sizes=((16, 16), (32, 16), (16, 32)))

    def train(out, steps):  # lr_decay=none: the cosine decay would follow each run's own train.steps
        return main(["train", "configs/ldm-scenes-txt2img.yaml", *TINY, f"data.path={folder}", "data.buckets=true",
                     "data.bucket_step=8", "train.lr_decay=none", f"train.steps={steps}", f"train.out_dir={out}",
                     f"model.first_stage={scenes_first_stage}"])

    def weights(out):
        return load_file(str(out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "model.safetensors"))

    assert train(tmp_path / "full", 4) == 0 and train(tmp_path / "part", 2) == 0
    assert len({p["bucket"] for p in read_index(tmp_path / "part")["parts"]}) == 3
    assert main(["train", "--resume", str(tmp_path / "part"), "train.steps=4"]) == 0
    full, part = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert full.keys() == part.keys() and all(torch.equal(full[k], part[k]) for k in full)


def read_index(run_dir):
    return json.loads((run_dir / "latent_cache" / "index.json").read_text())
