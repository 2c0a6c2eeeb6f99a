"""Token merging (latentdiff.nn.tome, latentdiff.diffusion.tome): the merge and its inverse, which transformers merge
and how many tokens, how far the UNet moves, and the pipeline and CLI paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentdiff.cli import main
from latentdiff.diffusion.tome import token_merging, transformer_levels
from latentdiff.diffusion.unet import UNetConfig, UNetModel
from latentdiff.nn.tome import TokenMerging, bipartite_soft_matching, destination_positions
from latentdiff.pipelines import load_pipeline
from latentdiff.pipelines.metadata import parse_a1111_parameters, read_png_parameters

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def unet(make_small_unet) -> UNetModel:
    # Transformers at both levels; with num_res_blocks 2, five of them (2 down, 3 up) at the input's resolution.
    return make_small_unet(attention_resolutions=(1, 2))


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500, 500]), torch.randn(2, 5, 16, generator=g)


def test_destinations_are_one_per_cell() -> None:
    corners = destination_positions(4, 6, 2, 2, None)
    assert corners.tolist() == [0, 2, 4, 12, 14, 16]  # the top-left token of each 2 x 2 cell, row-major
    drawn = destination_positions(4, 6, 2, 2, torch.Generator().manual_seed(3))
    rows, cols = drawn // 6, drawn % 6
    assert ((rows // 2) * 3 + cols // 2).tolist() == list(range(6))  # one in each cell, in cell order
    again = destination_positions(4, 6, 2, 2, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again)
    assert destination_positions(5, 5, 2, 2, None).tolist() == [0, 2, 10, 12]  # the last row/column: sources only


def test_merging_nothing_is_the_identity() -> None:
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    merge = bipartite_soft_matching(x, destination_positions(4, 4, 2, 2, None), 0)
    in_kept_order = x.gather(1, merge.kept[..., None].expand(-1, -1, 8))  # each sample's own order
    assert merge.removed == 0 and torch.equal(merge.merge(x), in_kept_order)
    assert torch.equal(merge.unmerge(merge.merge(x)), x)
    assert TokenMerging(0.01).plan(x, 4, 4) is None  # int(16 * 0.01) = 0 tokens: no merge at all


def test_identical_tokens_merge_without_changing_a_linear_sub_layer() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, generator=g)
    destinations = destination_positions(4, 4, 2, 2, None)  # 0, 2, 8, 10
    copies = {1: 0, 6: 2, 13: 8}  # each of these sources is an exact copy of a destination
    for source, destination in copies.items():
        x[:, source] = x[:, destination]
    merge = bipartite_soft_matching(x, destinations, len(copies))
    assert sorted(merge.merged[0].tolist()) == sorted(copies)  # the exact copies are the best matches
    merged = merge.merge(x)
    assert merged.shape == (1, 16 - len(copies), 8)
    assert torch.equal(merged, x[:, merge.kept[0]])  # the mean of two equal tokens is that token
    layer = torch.nn.Linear(8, 5)
    torch.testing.assert_close(merge.unmerge(layer(merged)), layer(x), rtol=0, atol=1e-6)


def test_the_merged_count_is_what_the_ratio_says(unet) -> None:
    x, t, ctx = _inputs()
    seen = []
    block = unet.input_blocks[1][1].transformer_blocks[0]  # at the input's resolution: 16 x 16 = 256 tokens
    handle = block.attn1.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            for ratio, removed in ((0.3, 76), (0.5, 128), (0.9, 192)):  # at most the 192 sources of 64 cells
                with token_merging(unet, ratio=ratio) as state:
                    unet(x, t, context=ctx)
                assert (state.calls, state.removed) == (5, 5 * removed)
                assert seen.pop() == 256 - removed
    finally:
        handle.remove()


def test_transformer_levels_on_sd_v1() -> None:
    with torch.device("meta"):
        sd = UNetModel(UNetConfig.sd_v1())
    levels = [ds for _, ds in transformer_levels(sd)]
    assert levels == [1, 1, 2, 2, 4, 4, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1]  # input blocks, middle, output blocks


def test_ratio_zero_is_the_exact_model_and_the_weights_stay(unet) -> None:
    x, t, ctx = _inputs()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        exact = unet(x, t, context=ctx)
        with token_merging(unet, ratio=0.0) as state:
            zero = unet(x, t, context=ctx)
        with token_merging(unet, ratio=0.5):
            unet(x, t, context=ctx)
        after = unet(x, t, context=ctx)
    assert torch.equal(zero, exact) and state.calls == 0
    assert torch.equal(after, exact)  # leaving the block leaves the UNet exact
    state_dict = unet.state_dict()
    assert state_dict.keys() == before.keys() and all(torch.equal(state_dict[k], before[k]) for k in before)


@pytest.mark.parametrize(("settings", "tolerance"), [({}, 0.05), ({"use_rand": False}, 0.05),
                                                     ({"max_downsample": 2}, 0.05),
                                                     ({"merge_crossattn": True, "merge_mlp": True}, 0.15)])
def test_the_unet_moves_a_little_and_the_same_way_every_time(unet, settings, tolerance) -> None:
    x, t, ctx = _inputs()
    with torch.no_grad():
        exact = unet(x, t, context=ctx)
        with token_merging(unet, ratio=0.5, **settings):
            first = unet(x, t, context=ctx)
        with token_merging(unet, ratio=0.5, **settings):
            second = unet(x, t, context=ctx)
    relative = float((first - exact).norm() / exact.norm())
    assert 0 < relative < tolerance  # measured: 0.017, 0.017, 0.024, 0.072
    assert torch.equal(first, second)  # the same seed, the same destinations


def test_another_seed_draws_other_destinations(unet) -> None:
    x, t, ctx = _inputs()
    with torch.no_grad():
        with token_merging(unet, ratio=0.5, seed=0):
            zero = unet(x, t, context=ctx)
        with token_merging(unet, ratio=0.5, seed=1):
            one = unet(x, t, context=ctx)
    assert not torch.equal(zero, one)


def test_gradients_flow_through_a_merge_with_checkpointing() -> None:
    cfg = UNetConfig(model_channels=32, channel_mult=(1,), attention_resolutions=(1,), num_heads=2,
                     num_res_blocks=1, context_dim=16, use_checkpoint=True)
    torch.manual_seed(0)
    model = UNetModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    x, t, ctx = _inputs()
    with token_merging(model, ratio=0.5) as state:
        model(x, t, context=ctx).square().mean().backward()
    # One merge per transformer (1 down, 1 in the middle, 2 up: one level, all at the input's resolution), planned
    # outside the checkpointed block, so that its recomputation in backward merges the same tokens.
    assert state.calls == 4
    assert model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("settings", "message"), [
    ({"ratio": 1.0}, r"ratio must be a number in \[0, 1\)"), ({"ratio": -0.1}, "ratio must be"),
    ({"ratio": "0.5"}, "ratio must be"), ({"sx": 0}, "sx must be a whole number"),
    ({"sx": 1, "sy": 1}, "at least two tokens"), ({"max_downsample": 1.5}, "max_downsample must be")])
def test_bad_settings_are_refused(unet, settings, message) -> None:
    with pytest.raises(ValueError, match=message), token_merging(unet, **settings):
        pass


def test_nesting_other_modules_and_unets_without_transformers_are_refused(unet) -> None:
    with pytest.raises(TypeError, match="needs a UNetModel"), token_merging(torch.nn.Linear(2, 2)):
        pass
    with token_merging(unet), pytest.raises(RuntimeError, match="already inside"), token_merging(unet):
        pass
    deep_only = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
                                     num_heads=2, context_dim=16))
    with pytest.raises(ValueError, match="no transformer at a downsampling factor <= 1"), token_merging(deep_only):
        pass
    no_transformers = UNetModel(UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1,),
                                           num_heads=2, context_dim=None, use_spatial_transformer=False))
    with pytest.raises(ValueError, match="no transformer blocks"), token_merging(no_transformers):
        pass


def test_pipelines_merge_when_asked_alone_and_with_deep_cache() -> None:
    pipe = load_pipeline(MODELS / "scenes-txt2img")
    run = dict(steps=6, sampler="ddim", generator=0, progress=False)
    exact = pipe.text_to_image("a red sneaker on the left", **run).images
    zero = pipe.text_to_image("a red sneaker on the left", sampler_options={"tome": 0}, **run).images
    merged = pipe.text_to_image("a red sneaker on the left", sampler_options={"tome": 0.5}, **run).images
    again = pipe.text_to_image("a red sneaker on the left", sampler_options={"tome": 0.5}, **run).images
    both = pipe.text_to_image("a red sneaker on the left", sampler_options={"tome": 0.5, "deep_cache": 3},
                              **run).images
    assert torch.equal(zero, exact) and torch.equal(merged, again)
    for approximate in (merged, both):
        difference = (approximate - exact).abs()
        assert 0 < float(difference.mean()) < 0.1  # changed, but the same picture (pixels in [0, 1])
    settings = {"ratio": 0.5, "max_downsample": 2, "use_rand": False}
    assert pipe.text_to_image("a red sneaker", sampler_options={"tome": settings}, **run).images is not None
    with pytest.raises(ValueError, match="ratio must be a number"):
        pipe.text_to_image("a red sneaker", sampler_options={"tome": 1.0}, **run)


def test_the_cli_flag_is_recorded_in_the_png(tmp_path, capsys) -> None:
    out = tmp_path / "merged.png"
    assert main(["generate", "a blue bag on the right", "--steps", "4", "--tome", "0.5", "-o", str(out)]) == 0
    assert read_png_parameters(out)["tome"] == 0.5
    assert main(["generate", "--from-png", str(out), "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()  # the record re-runs the merged sampling
    assert main(["generate", "a blue bag on the right", "--steps", "4", "-o", str(tmp_path / "exact.png")]) == 0
    assert "tome" not in read_png_parameters(tmp_path / "exact.png")
    assert (tmp_path / "exact.png").read_bytes() != out.read_bytes()
    both = tmp_path / "both.png"
    assert main(["generate", "a blue bag", "--steps", "4", "--tome", "0.3", "--deep-cache", "2", "-o",
                 str(both)]) == 0
    assert {k: read_png_parameters(both)[k] for k in ("tome", "deep_cache")} == {"tome": 0.3, "deep_cache": 2}
    capsys.readouterr()
    for bad in ("1", "-0.2", "half", "nan"):
        assert main(["generate", "a blue bag", "--tome", bad, "-o", str(tmp_path / "bad.png")]) == 2
        assert "--tome must be" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


def test_a1111_text_names_it_token_merging_ratio() -> None:
    record = parse_a1111_parameters("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
                                    "Token merging ratio: 0.5")
    assert record["tome"] == 0.5 and "Token merging ratio" not in record["a1111"]


def test_a_prompts_line_may_set_it(tmp_path) -> None:
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "a red bag", "tome": 0.5}\n{"prompt": "a red bag"}\n')
    assert main(["generate", "--prompts", str(lines), "--steps", "4", "-o", str(tmp_path / "out") + "/"]) == 0
    assert read_png_parameters(tmp_path / "out" / "0000.png")["tome"] == 0.5
    assert "tome" not in read_png_parameters(tmp_path / "out" / "0001.png")
    lines.write_text('{"prompt": "a red bag", "tome": 1.5}\n')
    assert main(["generate", "--prompts", str(lines), "--steps", "4", "-o", str(tmp_path / "bad") + "/"]) == 2
