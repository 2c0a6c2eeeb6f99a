"""Tests for the CLIP text encoder and tokenizer: parity with Hugging Face transformers, the OpenCLIP name map."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from latentdiff.conditioning import tokenizer as tokenizer_module
from latentdiff.conditioning.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    causal_attention_mask,
    hf_to_openclip,
    openclip_to_hf,
)
from latentdiff.conditioning.tokenizer import CLIPTokenizer, default_vocab_path, split_words
from latentdiff.io.errors import CheckpointError

transformers = pytest.importorskip("transformers")

TINY = CLIPTextConfig(vocab_size=49408, context_length=77, width=64, layers=3, heads=4, mlp_width=96)
TOL = dict(rtol=1e-5, atol=1e-5)

TRICKY_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "Hello, World! How's it going?? ... (great) [ok] {fine} -- yes; no: maybe/perhaps",
    "café naïve résumé Ångström Straße, and a decomposed cafe\u0301",
    "emoji 🐱‍👤 🚀🔥 and ❤️ 👍🏽",
    "pi is 3.14 and 1,000 people paid $20.50 (50%) on 2024-01-31",
    "I'm, you're, they've, we'll, she'd, it's, don't, O'Neil's",
    "multiple    spaces\tand\nnewlines   \u00a0and a no-break space",
    "UPPERCASE Prompt WITH Mixed CASE",
    "東京タワー 夜景, привет мир, مرحبا, नमस्ते",
    "x_y snake_case @user #tag 'quoted' \"double\" a--b !'s",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a very long prompt " * 30,  # > 77 tokens: truncated
    "",
    "   ",
]


# ---- helpers ----------------------------------------------------------------------------------------------------


def tiny(**overrides: object) -> CLIPTextConfig:
    return dataclasses.replace(TINY, **overrides)


def fill_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded noise in every parameter, LayerNorm scales around 1, so no part of the network is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)
    return model


def ours_and_hf(config: CLIPTextConfig, seed: int = 0) -> tuple[CLIPTextModel, torch.nn.Module]:
    """Our model with random weights, and transformers' CLIPTextModel (eager attention) holding the same ones."""
    ours = fill_(CLIPTextModel(config), seed).eval()
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_hf(), attn_implementation="eager"))
    # transformers 5 drops the "text_model." level in memory (it still reads it from files).
    hf.load_state_dict({k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}, strict=True)
    return ours, hf.eval()


def random_ids(batch: int = 2, length: int = 77, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (batch, length), generator=g)
    ids[:, 0] = 49406
    ids[:, -1] = 49407
    return ids


def openclip_reference(weights: dict[str, torch.Tensor], ids: torch.Tensor, layers_run: int,
                       activation: str) -> torch.Tensor:
    """OpenCLIP's text tower written out from its own weight names, with torch's packed-qkv MultiheadAttention:
    token + positional embedding, ``layers_run`` residual blocks under a causal mask, ``ln_final``.
    """
    width = weights["token_embedding.weight"].shape[1]
    heads = TINY.heads
    x = F.embedding(ids, weights["token_embedding.weight"]) + weights["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    act = (lambda t: t * torch.sigmoid(1.702 * t)) if activation == "quick_gelu" else F.gelu
    for i in range(layers_run):
        w = {k.removeprefix(f"transformer.resblocks.{i}."): v for k, v in weights.items()
             if k.startswith(f"transformer.resblocks.{i}.")}
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": w["attn.in_proj_weight"], "in_proj_bias": w["attn.in_proj_bias"],
                              "out_proj.weight": w["attn.out_proj.weight"], "out_proj.bias": w["attn.out_proj.bias"]})
        h = F.layer_norm(x, (width,), w["ln_1.weight"], w["ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (width,), w["ln_2.weight"], w["ln_2.bias"])
        h = F.linear(act(F.linear(h, w["mlp.c_fc.weight"], w["mlp.c_fc.bias"])), w["mlp.c_proj.weight"],
                     w["mlp.c_proj.bias"])
        x = x + h
    return F.layer_norm(x, (width,), weights["ln_final.weight"], weights["ln_final.bias"])


# ---- text encoder -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_matches_transformers_clip_text_model(activation: str) -> None:
    ours, hf = ours_and_hf(tiny(activation=activation))
    for ids in (random_ids(), random_ids(length=9, seed=1)):  # full context, and a shorter sequence
        with torch.no_grad():
            expected = hf(input_ids=ids).last_hidden_state
            got = ours.encode(ids)
        assert got.shape == (2, ids.shape[1], TINY.width)
        torch.testing.assert_close(got, expected, **TOL)


def test_attention_mask_matches_transformers() -> None:
    ours, hf = ours_and_hf(tiny())
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding, as the tokenizer makes it
    mask[1, 40:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.encode(ids, mask)
        unmasked = ours.encode(ids)
    torch.testing.assert_close(got, expected, **TOL)
    # Causal attention keeps padding out of the real tokens: the mask changes only the padding positions.
    torch.testing.assert_close(got[0, :5], unmasked[0, :5], **TOL)
    assert not torch.allclose(got[0, 5:], unmasked[0, 5:])


def test_fully_masked_rows_stay_finite() -> None:
    allowed = causal_attention_mask(torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]]))
    assert allowed.shape == (2, 1, 4, 4)
    assert allowed.any(dim=-1).all()  # every query sees at least one key (itself, if nothing else)
    assert allowed[0, 0, 3].tolist() == [False, False, True, True]
    ours = fill_(CLIPTextModel(tiny())).eval()
    with torch.no_grad():
        out = ours.encode(random_ids(), torch.zeros(2, 77, dtype=torch.long))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_penultimate_matches_transformers_hidden_states_and_diffusers_truncation(activation: str) -> None:
    config = tiny(activation=activation, output_layer="penultimate")
    ours, hf = ours_and_hf(config)
    ids = random_ids()
    with torch.no_grad():
        got = ours.encode(ids)
        # CompVis FrozenOpenCLIPEmbedder(layer="penultimate"): stop one block early, then the final LayerNorm.
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
        expected = hf.final_layer_norm(hidden[-2])
        # diffusers: the same weights stored as a model one layer shorter, read at its last layer.
        short_config = transformers.CLIPTextConfig(**{**config.to_hf(), "num_hidden_layers": config.layers - 1},
                                                   attn_implementation="eager")
        short = transformers.CLIPTextModel(short_config).eval()
        short_weights = openclip_to_hf(hf_to_openclip(ours.state_dict()), num_layers=config.layers - 1)
        short.load_state_dict({k.removeprefix("text_model."): v for k, v in short_weights.items()}, strict=True)
        from_short = short(input_ids=ids).last_hidden_state
        last = CLIPTextModel(dataclasses.replace(config, output_layer="last"))
        last.load_state_dict(ours.state_dict())
        last_out = last.encode(ids)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(got, from_short, **TOL)
    assert not torch.allclose(got, last_out, atol=1e-3)


def test_openclip_round_trip_is_bit_exact_and_gives_the_same_output() -> None:
    ours = fill_(CLIPTextModel(tiny(activation="gelu")))
    hf_weights = ours.state_dict()
    oc = hf_to_openclip(hf_weights)
    expected_keys = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    for i in range(TINY.layers):
        expected_keys |= {f"transformer.resblocks.{i}.{name}" for name in (
            "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
            "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias")}
    assert set(oc) == expected_keys
    assert oc["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * TINY.width, TINY.width)
    assert torch.equal(oc["transformer.resblocks.0.attn.in_proj_weight"][TINY.width:2 * TINY.width],
                       hf_weights["text_model.encoder.layers.0.self_attn.k_proj.weight"])  # packed q | k | v
    back = openclip_to_hf(oc, num_layers=TINY.layers)
    assert set(back) == set(hf_weights)
    for key, value in hf_weights.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
        assert back[key].is_contiguous()
    assert set(hf_to_openclip(back)) == set(oc)
    assert all(torch.equal(hf_to_openclip(back)[k], v) for k, v in oc.items())

    ids = random_ids()
    for output_layer, layers_run in (("last", TINY.layers), ("penultimate", TINY.layers - 1)):
        model = CLIPTextModel(tiny(activation="gelu", output_layer=output_layer))
        model.load_weights(oc)  # the OpenCLIP layout loads directly
        with torch.no_grad():
            torch.testing.assert_close(model.encode(ids), openclip_reference(oc, ids, layers_run, "gelu"), **TOL)


def test_load_weights_from_stable_diffusion_checkpoints() -> None:
    source = fill_(CLIPTextModel(tiny(activation="gelu", output_layer="penultimate"))).eval()
    ids = random_ids()
    with torch.no_grad():
        expected = source.encode(ids)
    unet = {"model.diffusion_model.out.0.weight": torch.ones(3)}
    # SD v2: OpenCLIP layout under cond_stage_model.model., with the contrastive-head keys CLIP also saves.
    v2 = {"cond_stage_model.model." + k: v for k, v in hf_to_openclip(source.state_dict()).items()}
    v2["cond_stage_model.model.text_projection"] = torch.randn(TINY.width, 32)
    v2["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    # SD v1: Hugging Face names under cond_stage_model.transformer., with the position-id buffer old files carry.
    v1 = {"cond_stage_model.transformer." + k: v for k, v in source.state_dict().items()}
    v1["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    # transformers 5 saves without the text_model. level.
    unprefixed = {k.removeprefix("text_model."): v for k, v in source.state_dict().items()}
    for weights in ({**unet, **v2}, {**unet, **v1}, unprefixed):
        model = CLIPTextModel(source.config)
        model.load_weights(weights)
        with torch.no_grad():
            torch.testing.assert_close(model.encode(ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("prefixed", [False, True])
def test_from_pretrained_reads_a_transformers_folder(tmp_path, prefixed: bool) -> None:
    config = tiny(activation="gelu", mlp_width=100)
    ours, hf = ours_and_hf(config, seed=3)
    folder = tmp_path / "pipeline" / "text_encoder"
    hf.save_pretrained(folder)
    if prefixed:  # the layout of published diffusers folders (transformers < 5)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(folder / "model.safetensors"))
    loaded = CLIPTextModel.from_pretrained(tmp_path / "pipeline")  # a pipeline folder finds text_encoder/
    assert loaded.config == dataclasses.replace(config, layer_norm_eps=hf.config.layer_norm_eps)
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(ids), hf(input_ids=ids).last_hidden_state, **TOL)


def test_config_presets_and_validation() -> None:
    v1, v2 = CLIPTextConfig.sd_v1(), CLIPTextConfig.sd_v2()
    assert (v1.width, v1.layers, v1.heads, v1.intermediate_size, v1.activation, v1.output_layer) == (
        768, 12, 12, 3072, "quick_gelu", "last")
    assert (v2.width, v2.layers, v2.heads, v2.intermediate_size, v2.activation, v2.output_layer) == (
        1024, 24, 16, 4096, "gelu", "penultimate")
    assert v2.layers_run == 23
    assert CLIPTextConfig.from_hf({"text_config": {"hidden_act": "gelu", "num_hidden_layers": 23,
                                                   "hidden_size": 1024, "num_attention_heads": 16,
                                                   "intermediate_size": 4096}}) == CLIPTextConfig(
        width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        tiny(activation="relu")
    with pytest.raises(ValueError, match="output_layer"):
        tiny(output_layer="pooled")
    with pytest.raises(ValueError, match="heads"):
        tiny(heads=5)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_hf({"hidden_act": "gelu_new"})
    model = CLIPTextModel(tiny())
    with pytest.raises(ValueError, match="context length"):
        model.encode(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model.encode(torch.full((1, 5), 49408))


def test_wrong_weights_fail_clearly() -> None:
    model = CLIPTextModel(tiny())
    weights = model.state_dict()
    broken = {k: v for k, v in weights.items() if "layers.2." not in k}
    broken["text_model.encoder.layers.9.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointError, match=r"missing keys: .*layers\.2\..*unexpected keys: .*layers\.9\."):
        model.load_weights(broken)
    wrong_shape = dict(weights, **{"text_model.final_layer_norm.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match="shape mismatches: text_model.final_layer_norm.weight"):
        model.load_weights(wrong_shape)
    oc = hf_to_openclip(weights)
    with pytest.raises(CheckpointError, match="unknown keys: transformer.foo"):
        openclip_to_hf({**oc, "transformer.foo": torch.ones(1)})
    with pytest.raises(CheckpointError, match="missing: transformer.resblocks.1.attn.in_proj_bias"):
        openclip_to_hf({k: v for k, v in oc.items() if k != "transformer.resblocks.1.attn.in_proj_bias"})
    with pytest.raises(CheckpointError, match="3 residual blocks, 4 were asked for"):
        openclip_to_hf(oc, num_layers=4)
    with pytest.raises(CheckpointError, match="unknown keys: bogus"):
        hf_to_openclip({**weights, "bogus": torch.ones(1)})
    dropped = openclip_to_hf({**oc, "visual.conv1.weight": torch.ones(1), "logit_scale": torch.ones(())})
    assert set(dropped) == set(weights)  # the vision tower and the contrastive head are left out, not an error


@pytest.mark.slow
def test_full_size_parameter_counts_match_transformers() -> None:
    for config, expected in ((CLIPTextConfig.sd_v1(), 123_060_480), (CLIPTextConfig.sd_v2(), 352_984_064)):
        with torch.device("meta"):
            ours = CLIPTextModel(config)
            hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config.to_hf()))
        assert sum(p.numel() for p in ours.parameters()) == expected
        assert sum(p.numel() for p in hf.parameters()) == expected
        assert set(ours.state_dict()) == {"text_model." + k for k in hf.state_dict()}


# ---- tokenizer --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer_folder(tmp_path_factory):
    """vocab.json + merges.txt derived from open_clip's merge file the way CLIP derives its vocabulary."""
    lines = gzip.open(default_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in byte_chars):
        byte_chars[b] = chr(256 + n)
    vocab = list(byte_chars.values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def hf_encode(hf, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    out = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


def test_tokenizer_matches_transformers(tokenizer, hf_tokenizer_folder) -> None:
    hf = transformers.CLIPTokenizer.from_pretrained(str(hf_tokenizer_folder))
    ids, mask = tokenizer(TRICKY_PROMPTS)
    expected_ids, expected_mask = hf_encode(hf, TRICKY_PROMPTS)
    assert ids.shape == (len(TRICKY_PROMPTS), 77) and ids.dtype == torch.long
    for row, prompt in enumerate(TRICKY_PROMPTS):
        assert ids[row].tolist() == expected_ids[row].tolist(), prompt
    assert torch.equal(mask, expected_mask)
    assert ids[-2, :3].tolist() == [49406, 49407, 49407] and mask[-2].sum() == 2  # the empty prompt
    assert ids[0, 0] == 49406 and ids[0, mask[0].sum() - 1] == 49407

    # SD v2 / OpenCLIP pads with 0 (the "!" symbol); the same tokenizer folder read by our loader gives the same ids.
    from_folder = CLIPTokenizer(hf_tokenizer_folder, pad_token_id=0)
    ids_v2, mask_v2 = from_folder(TRICKY_PROMPTS)
    assert torch.equal(ids_v2, ids.masked_fill(mask == 0, 0))
    assert torch.equal(mask_v2, mask)
    # transformers with pad_token="!" (diffusers' SD 2 tokenizer) also makes every "!" in the text a special token
    # (id 0 instead of CLIP's "!</w>" 256), so it is compared on prompts without one.
    hf_v2 = transformers.CLIPTokenizer.from_pretrained(str(hf_tokenizer_folder), pad_token="!")
    no_bang = [p for p in TRICKY_PROMPTS if "!" not in p]
    assert torch.equal(from_folder(no_bang).input_ids, hf_encode(hf_v2, no_bang)[0])
    assert "open_clip" not in sys.modules  # the merge file was found without importing the package


def test_word_splitting_matches_clip_regex(tokenizer) -> None:
    regex = pytest.importorskip("regex")
    pattern = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                            r"[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    extra = ["<|endoftext|> inside!<|startoftext|>", "it''s 'll'd '", "ﬁ ＦＵＬＬ x²³ ½ Ⅻ", "\u200bzero\u200dwidth"]
    for prompt in TRICKY_PROMPTS + extra:
        cleaned = tokenizer.clean(prompt)
        assert split_words(cleaned) == pattern.findall(cleaned), prompt


def test_tokenizer_cleaning_and_decoding(tokenizer) -> None:
    # HTML entities are unescaped twice (web captions are often escaped twice); case and whitespace are folded.
    assert torch.equal(tokenizer("Rock &amp;amp; ROLL").input_ids, tokenizer("rock & roll").input_ids)
    assert tokenizer.clean("  A\t\tB \n C&lt;3 ") == "a b c<3"
    assert tokenizer.text_to_ids("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.decode(tokenizer("A photo of a cat, 3.14!").input_ids[0]) == "a photo of a cat , 3 . 1 4 !"
    assert tokenizer.decode(CLIPTokenizer(pad_token_id=0)("café").input_ids[0]) == "café"  # stops at the end token


def test_truncation_is_logged_not_silent(tokenizer, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=tokenizer_module.__name__):
        fits = tokenizer(["a " * 75])  # exactly 75 tokens + start + end
        assert not caplog.records
        out = tokenizer(["short", "a " * 76 + "zebra"], max_length=77)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "prompt 1" in message and "truncated" in message and "zebra" in message  # says which and what
    assert fits.input_ids[0, -1] == 49407 and fits.attention_mask[0].all()
    assert out.input_ids[1, -1] == 49407 and out.attention_mask[1].all()  # the end token is kept last
    assert out.input_ids.shape == (2, 77)
    short = tokenizer(["a b c d e"], max_length=4)  # a shorter context truncates the same way
    assert short.input_ids.tolist() == [[49406, *tokenizer.text_to_ids("a b"), 49407]]


def test_missing_vocabulary_fails_clearly(tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="pad_token_id"):
        CLIPTokenizer(default_vocab_path(), pad_token_id=50000)
    with pytest.raises(FileNotFoundError, match="open_clip_torch"):
        CLIPTokenizer(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    with pytest.raises(FileNotFoundError, match="has no vocab.json"):
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\n")
        CLIPTokenizer(tmp_path / "tok")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "open_clip" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps open_clip_torch"):
        CLIPTokenizer()
