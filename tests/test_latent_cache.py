"""The sharded latent cache: parts in dataset order, an interrupted build resumed, a changed key rebuilt, items
read back exactly, and a frozen text encoder's cached states conditioning as its ids do."""

import json

import pytest
import torch
from test_embedders import TINY_CLIP
from torch import nn
from torch.utils.data import Dataset

from latentdiff.conditioning.conditioner import Conditioner, ConditionerConfig
from latentdiff.conditioning.embedders.clip_text import CLIPEncoderConfig
from latentdiff.train import latent_cache
from latentdiff.train.latent_cache import LatentCacheDataset, build_latent_cache, read_latent_cache


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
    index = json.loads((folder / "index.json").read_text())
    return LatentCacheDataset([folder / p["file"] for p in index["parts"]], [p["items"] for p in index["parts"]])


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
