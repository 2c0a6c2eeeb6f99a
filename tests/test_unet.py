"""Tests for the CompVis / Stable Diffusion UNet, its transformer layers and the timestep embedding."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from latentdiff.config import from_dict, to_dict
from latentdiff.diffusion.unet import AttentionBlock, UNetConfig, UNetModel, unet_parameter_count
from latentdiff.nn.embeddings import timestep_embedding
from latentdiff.nn.transformer import CrossAttention

TINY = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_heads=2, num_head_channels=-1, transformer_depth=1, context_dim=16)

VARIANTS = {
    "conv_proj_num_heads": {},
    "linear_proj_head_channels": dict(use_linear_in_transformer=True, num_heads=-1, num_head_channels=8),
    "scale_shift_norm": dict(use_scale_shift_norm=True),
    "class_conditional": dict(num_classes=5),
    "resblock_updown": dict(resblock_updown=True),
    "attention_block": dict(use_spatial_transformer=False, context_dim=None, num_heads=-1, num_head_channels=8),
    "self_attention_transformer": dict(context_dim=None),
    "concat_channels": dict(in_channels=6),
    "avgpool_resample_depth2": dict(conv_resample=False, transformer_depth=2),
    "first_channel_mult_2": dict(channel_mult=(2, 2)),
}


def tiny(**overrides: object) -> UNetConfig:
    return dataclasses.replace(TINY, **overrides)


def fill_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise: a fresh UNet outputs exactly zero, which proves nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def make_inputs(cfg: UNetConfig, seed: int = 1, batch: int = 2) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    timesteps = torch.tensor([3.0, 700.0][:batch])
    context = torch.randn(batch, 7, cfg.context_dim, generator=g) if cfg.context_dim else None
    y = torch.tensor([1, 4][:batch]) if cfg.num_classes else None
    concat = torch.randn(batch, cfg.in_channels - 4, 16, 16, generator=g) if cfg.in_channels > 4 else None
    return dict(x=x, timesteps=timesteps, context=context, y=y, concat=concat)


# ---------------------------------------------------------------------------------------------- embedding


def test_timestep_embedding_is_cos_then_sin() -> None:
    t = torch.tensor([0.0, 1.0, 10.5, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 4) for i in range(4)])
    args = t[:, None] * freqs[None]
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1))
    assert emb[0].tolist() == [1.0] * 4 + [0.0] * 4

    odd = timestep_embedding(torch.tensor([0, 1, 10, 999]), 9)
    assert odd.shape == (4, 9) and odd.dtype == torch.float32
    torch.testing.assert_close(odd[:, :8], timestep_embedding(torch.tensor([0.0, 1.0, 10.0, 999.0]), 8))
    assert (odd[:, 8] == 0).all()


def test_timestep_embedding_repeat_only_and_errors() -> None:
    t = torch.tensor([2, 5])
    assert timestep_embedding(t, 3, repeat_only=True).tolist() == [[2.0] * 3, [5.0] * 3]
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 1), 8)


# ---------------------------------------------------------------------------------------------- attention


def test_cross_attention_matches_masked_softmax_reference() -> None:
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=12, context_dim=10, heads=3, dim_head=4)
    x, ctx = torch.randn(2, 5, 12), torch.randn(2, 6, 10)
    mask = torch.tensor([[True] * 6, [True, True, False, True, False, False]])

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, H*D) -> (B, H, L, D)
        return t.view(t.shape[0], t.shape[1], 3, 4).transpose(1, 2)

    q, k, v = split(layer.to_q(x)), split(layer.to_k(ctx)), split(layer.to_v(ctx))
    scores = (q @ k.transpose(-1, -2)) / 2.0  # 1 / sqrt(dim_head)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = layer.to_out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(layer(x, ctx, mask), expected)


def test_cross_attention_fully_masked_sample_is_finite_and_context_free() -> None:
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=8, context_dim=6, heads=2, dim_head=4)
    x, mask = torch.randn(1, 3, 8), torch.zeros(1, 4, dtype=torch.bool)
    out = layer(x, torch.randn(1, 4, 6), mask)
    torch.testing.assert_close(out, layer(x, torch.randn(1, 4, 6), mask))
    torch.testing.assert_close(out, layer.to_out[0].bias.expand_as(out))


def test_attention_block_uses_compvis_head_interleaved_qkv_layout() -> None:
    torch.manual_seed(0)
    block = fill_(AttentionBlock(64, num_heads=2))
    x = torch.randn(2, 64, 3, 5)
    b, c, t, heads = 2, 64, 15, 2
    qkv = block.qkv(block.norm(x.reshape(b, c, t)))
    # CompVis' QKVAttentionLegacy: channels are [head0: q k v, head1: q k v], each c // heads wide.
    q, k, v = qkv.reshape(b * heads, 3 * c // heads, t).split(c // heads, dim=1)
    weights = torch.einsum("bct,bcs->bts", q, k).div(math.sqrt(c // heads)).softmax(-1)
    h = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, t)
    expected = (x.reshape(b, c, t) + block.proj_out(h)).reshape(x.shape)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- the UNet


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_keeps_shape_and_trains_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    cfg = tiny(**VARIANTS[name])
    model = fill_(UNetModel(cfg))
    inputs = make_inputs(cfg)
    out = model(**inputs)
    assert out.shape == inputs["x"].shape
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused, f"parameters without gradient: {unused}"


def test_fresh_model_outputs_exactly_zero() -> None:
    torch.manual_seed(0)
    cfg = tiny(num_classes=5)
    out = UNetModel(cfg)(**make_inputs(cfg))
    assert out.abs().max().item() == 0.0


# The expected numbers come from CompVis' own UNetModel (Stability-AI/stablediffusion, ldm/modules) loaded
# with the same seeded weights, so they pin the architecture, the names and the arithmetic at once.
KNOWN_ANSWERS = {
    "sd_v1_like": ({}, [-0.03029, 0.1591, 0.09597, 0.13171, 0.23677, 0.43508, 0.11624, 0.359]),
    "sd_v2_like": (dict(num_heads=-1, num_head_channels=8, use_linear_in_transformer=True),
                   [-0.03126, 0.1749, 0.10738, 0.14197, 0.22841, 0.43059, 0.12388, 0.36915]),
    "ldm_like": (dict(use_spatial_transformer=False, context_dim=None, use_scale_shift_norm=True,
                      resblock_updown=True, num_classes=5, legacy=True),
                 [-0.47419, -0.52348, -0.62585, -0.81974, -0.04446, -0.3809, -0.20652, -0.06455]),
}


@pytest.mark.parametrize("name", list(KNOWN_ANSWERS))
def test_known_answer_matches_compvis(name: str) -> None:
    overrides, expected = KNOWN_ANSWERS[name]
    cfg = tiny(**overrides)
    model = fill_(UNetModel(cfg), seed=0)
    with torch.no_grad():
        out = model(**make_inputs(cfg, seed=1))
    got = torch.cat([out[0, 0, 0, :4], out[1, -1, -1, -4:]])
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{}, dict(use_spatial_transformer=False, context_dim=None,
                                                resblock_updown=True, use_scale_shift_norm=True)])
def test_gradient_checkpointing_gives_same_output_and_gradients(overrides: dict) -> None:
    cfg = tiny(dropout=0.1, **overrides)  # dropout: the recomputation must replay the same random masks
    plain = fill_(UNetModel(cfg)).train()
    checkpointed = UNetModel(dataclasses.replace(cfg, use_checkpoint=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    results = []
    for model in (plain, checkpointed):
        inputs = make_inputs(cfg)
        torch.manual_seed(123)
        out = model(**inputs)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_set_gradient_checkpointing_reaches_every_block() -> None:
    model = UNetModel(tiny())
    model.set_gradient_checkpointing(True)
    flags = [m.use_checkpoint for m in model.modules() if hasattr(m, "use_checkpoint")]
    assert flags and all(flags) and model.config.use_checkpoint
    assert not TINY.use_checkpoint  # the caller's config is not mutated


def test_masked_context_tokens_do_not_affect_the_output() -> None:
    cfg = tiny()
    model = fill_(UNetModel(cfg))
    inputs = make_inputs(cfg)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 1] = False
    changed = inputs["context"].clone()
    changed[0, 4:] = torch.randn(3, 16)
    changed[1, 1] = 100.0
    with torch.no_grad():
        reference = model(**inputs, context_mask=mask)
        torch.testing.assert_close(model(**{**inputs, "context": changed}, context_mask=mask), reference,
                                   atol=1e-6, rtol=1e-6)
        changed[0, 0] += 1.0  # a kept token does matter
        assert not torch.allclose(model(**{**inputs, "context": changed}, context_mask=mask), reference)
        assert not torch.allclose(model(**inputs), reference)  # and the mask itself does


def test_scalar_timestep_is_broadcast_over_the_batch() -> None:
    cfg = tiny()
    model = fill_(UNetModel(cfg))
    inputs = make_inputs(cfg)
    with torch.no_grad():
        full = model(**{**inputs, "timesteps": torch.tensor([250, 250])})
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250])):
            torch.testing.assert_close(model(**{**inputs, "timesteps": t}), full)


def test_bfloat16_model_runs_and_stays_close_to_float32() -> None:
    cfg = tiny()
    model = fill_(UNetModel(cfg))
    inputs = make_inputs(cfg)
    with torch.no_grad():
        ref = model(**inputs)
        half = model.to(torch.bfloat16)(**{k: v.to(torch.bfloat16) if k in ("x", "context") else v
                                           for k, v in inputs.items()})
    assert half.dtype == torch.bfloat16
    assert (half.float() - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.parametrize(("cfg_overrides", "input_change", "message"), [
    ({}, dict(x=torch.zeros(2, 3, 16, 16)), "4 input channels, got 3"),
    ({}, dict(x=torch.zeros(2, 4, 15, 16)), "divisible by 2"),
    ({}, dict(x=torch.zeros(4, 16, 16)), r"\(N, C, H, W\)"),
    ({}, dict(context=None), "pass context"),
    ({}, dict(context=torch.zeros(2, 7, 8)), "context must be"),
    ({}, dict(context_mask=torch.ones(2, 6, dtype=torch.bool)), "context_mask must be"),
    ({}, dict(y=torch.tensor([0, 1])), "not class-conditional"),
    ({}, dict(timesteps=torch.tensor([1, 2, 3])), "timesteps must be"),
    (dict(context_dim=None), dict(context=torch.zeros(2, 7, 16)), "no cross-attention"),
    (dict(context_dim=None), dict(context_mask=torch.ones(2, 7, dtype=torch.bool)), "without a context"),
    (dict(num_classes=3), dict(y=None), "class-conditional"),
    (dict(num_classes=3), dict(y=torch.tensor([[0], [1]])), "y must be"),
    (dict(in_channels=6), dict(concat=None), "6 input channels, got 4"),
    (dict(in_channels=6), dict(concat=torch.zeros(2, 2, 8, 8)), "concat must be"),
])
def test_bad_inputs_give_clear_errors(cfg_overrides: dict, input_change: dict, message: str) -> None:
    cfg = tiny(**cfg_overrides)
    model = UNetModel(cfg)
    inputs = {**make_inputs(cfg), **input_change}
    with pytest.raises(ValueError, match=message):
        model(**inputs)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(num_heads=-1, num_head_channels=-1), "either num_heads or num_head_channels"),
    (dict(use_spatial_transformer=False), "needs use_spatial_transformer"),
    (dict(model_channels=48), "multiple of 32"),
    (dict(channel_mult=()), "channel_mult"),
])
def test_bad_configs_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_config_round_trips_through_plain_dicts() -> None:
    for cfg in (UNetConfig.sd_v1(), UNetConfig.sd_v2(), tiny(num_classes=10, context_dim=None)):
        assert from_dict(UNetConfig, to_dict(cfg)) == cfg


# ---------------------------------------------------------------------------------------------- SD layouts

SD_V1_SHAPES = {
    "time_embed.0.weight": (1280, 320),
    "time_embed.2.weight": (1280, 1280),
    "input_blocks.0.0.weight": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0.weight": (320,),
    "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    "input_blocks.1.1.norm.weight": (320,),
    "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": (320,),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
    "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "middle_block.0.emb_layers.1.weight": (1280, 1280),
    "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "middle_block.2.out_layers.3.bias": (1280,),
    "output_blocks.0.0.in_layers.2.weight": (1280, 2560, 3, 3),
    "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.5.0.in_layers.2.weight": (1280, 1920, 3, 3),
    "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "output_blocks.8.0.skip_connection.weight": (640, 960, 1, 1),
    "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "output_blocks.9.0.in_layers.0.weight": (960,),
    "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
    "out.0.weight": (320,),
    "out.2.weight": (4, 320, 3, 3),
    "out.2.bias": (4,),
}
ABSENT_IN_SD = ["label_emb.weight", "input_blocks.12.0.op.weight", "input_blocks.10.1.norm.weight",
                "output_blocks.11.2.conv.weight", "output_blocks.0.1.norm.weight"]


def meta_state_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # the full-size network, without allocating a byte of weights
        model = UNetModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_sd_v1_names_shapes_and_parameter_count() -> None:
    shapes = meta_state_shapes(UNetConfig.sd_v1())
    assert len(shapes) == 686
    for key, shape in SD_V1_SHAPES.items():
        assert shapes.get(key) == shape, key
    for key in ABSENT_IN_SD:
        assert key not in shapes
    assert unet_parameter_count(UNetConfig.sd_v1()) == 859_520_964


def test_sd_v2_names_shapes_and_parameter_count() -> None:
    shapes = meta_state_shapes(UNetConfig.sd_v2())
    assert len(shapes) == 686
    assert shapes["input_blocks.1.1.proj_in.weight"] == (320, 320)  # Linear, not 1x1 conv
    assert shapes["input_blocks.1.1.proj_out.weight"] == (320, 320)
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert shapes["middle_block.1.transformer_blocks.0.attn2.to_v.weight"] == (1280, 1024)
    assert unet_parameter_count(UNetConfig.sd_v2()) == 865_910_724


def test_sd_inpainting_conv_in_takes_nine_channels() -> None:
    shapes = meta_state_shapes(UNetConfig.sd_v1(in_channels=9))
    assert shapes["input_blocks.0.0.weight"] == (320, 9, 3, 3)
    assert shapes["out.2.weight"] == (4, 320, 3, 3)
    assert unet_parameter_count(UNetConfig.sd_v2(in_channels=9)) == 865_910_724 + 5 * 320 * 9


@pytest.mark.slow
@pytest.mark.parametrize(("cfg", "count"), [(UNetConfig.sd_v1(), 859_520_964), (UNetConfig.sd_v2(), 865_910_724)])
def test_full_size_unet_on_cpu(cfg: UNetConfig, count: int) -> None:
    model = UNetModel(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == count
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        out = model(x, torch.tensor([500]), context=torch.randn(1, 77, cfg.context_dim))
    assert out.shape == x.shape and out.abs().max().item() == 0.0
