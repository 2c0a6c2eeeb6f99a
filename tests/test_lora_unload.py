"""``unload_lora``: LoRAs loaded with ``load_lora`` come out again bit for bit, in float32, float16 and bfloat16,
last in first out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_lora_loading import _pairs
from test_sd_pipeline import UNET, tiny_components

from latentdiff.formats.lora import LoRAWeights, apply_lora_to_components, load_lora, unload_lora, write_lora


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("lora_unload")
    comps = tiny_components(UNET, seed=0)
    shapes = {k[:-len(".weight")]: v.shape for k, v in {**comps.unet, **comps.text_encoder}.items()
              if k.endswith(".weight")}
    attn = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    first = LoRAWeights(_pairs(shapes, [attn, "input_blocks.1.0.in_layers.2"], rank=4, alpha=2.0, seed=1),
                        _pairs(shapes, ["text_model.encoder.layers.0.self_attn.q_proj"], rank=2, alpha=2.0, seed=2))
    second = LoRAWeights(_pairs(shapes, [attn], rank=2, alpha=1.0, seed=3))  # the same layer as the first
    return comps, [write_lora(first, UNET, root / "first.safetensors", "kohya"),
                   write_lora(second, UNET, root / "second.safetensors", "peft")]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unload_restores_the_weights_bit_for_bit(setup, dtype) -> None:
    comps, (first, second) = setup
    comps = comps.to(dtype)
    one, first_handle = load_lora(comps, first, 0.7)
    assert _same(one.unet, apply_lora_to_components(comps, first, 0.7).unet)
    two, second_handle = load_lora(one, second, -1.3)
    changed = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(two.unet[changed], comps.unet[changed])
    with pytest.raises(ValueError, match="unload the LoRAs loaded after it first"):
        unload_lora(two, first_handle)
    back = unload_lora(unload_lora(two, second_handle), first_handle)
    assert _same(back.unet, comps.unet) and _same(back.text_encoder, comps.text_encoder)
    assert _same(back.vae, comps.vae)


def test_unload_leaves_the_loaded_copy_alone(setup) -> None:
    comps, (first, _) = setup
    loaded, handle = load_lora(comps, first)
    snapshot = {k: v.clone() for k, v in loaded.unet.items()}
    unload_lora(loaded, handle)
    assert _same(loaded.unet, snapshot)
    assert isinstance(handle.path, str) and Path(handle.path).name == "first.safetensors"
