"""DeepCache (latentdiff.diffusion.deepcache): which calls run in full, and what a cached call computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentdiff.cli import main
from latentdiff.diffusion import deepcache
from latentdiff.diffusion.deepcache import deep_cache
from latentdiff.diffusion.unet import UNetModel
from latentdiff.pipelines import load_pipeline
from latentdiff.pipelines.metadata import read_png_parameters

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def unet(make_small_unet) -> UNetModel:
    return make_small_unet()


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 16, generator=g)


def _with_feature(unet: UNetModel, branch: int, feature: torch.Tensor, x, t, ctx) -> torch.Tensor:
    """The plain forward with the deep feature entering output block -(branch + 1) replaced by ``feature``."""
    block = unet.output_blocks[len(unet.output_blocks) - branch - 1]

    def swap(module, args):
        joined = args[0]
        return (torch.cat([feature, joined[:, feature.shape[1]:]], dim=1), *args[1:])

    handle = block.register_forward_pre_hook(swap)
    try:
        return unet(x, t, context=ctx)
    finally:
        handle.remove()


@pytest.mark.parametrize("branch", [0, 2])
def test_cached_steps_reuse_the_last_full_steps_deep_feature(unet, branch) -> None:
    (x0, ctx), (x1, _) = _inputs(1), _inputs(2)
    t0, t1 = torch.tensor([900, 900]), torch.tensor([800, 800])
    with torch.no_grad():
        full0 = unet(x0, t0, context=ctx)
        with deep_cache(unet, interval=2, branch=branch) as state:
            got0 = unet(x0, t0, context=ctx)
            got1 = unet(x1, t1, context=ctx)
        kept = state.features[0][1]
        want1 = _with_feature(unet, branch, kept, x1, t1, ctx)
        plain1 = unet(x1, t1, context=ctx)
    assert torch.equal(got0, full0)  # a full step is the plain forward
    assert (state.full_calls, state.cached_calls) == (1, 1)
    assert torch.allclose(got1, want1, rtol=1e-5, atol=1e-6)  # the shallow blocks on the kept feature
    assert not torch.allclose(got1, plain1, atol=1e-4)  # and not the exact answer: it is an approximation


def test_interval_one_is_the_exact_model_and_the_schedule_counts_steps(unet) -> None:
    x, ctx = _inputs(3)
    with torch.no_grad():
        with deep_cache(unet, interval=1) as exact:
            outs = [unet(x, torch.tensor([t, t]), context=ctx) for t in (999, 500, 1)]
        plain = [unet(x, torch.tensor([t, t]), context=ctx) for t in (999, 500, 1)]
        assert all(torch.equal(a, b) for a, b in zip(outs, plain, strict=True))
        assert (exact.full_calls, exact.cached_calls) == (3, 0)
        with deep_cache(unet, interval=3) as state:
            for t in (999, 900, 800, 700, 600):
                unet(x, torch.tensor([t, t]), context=ctx)
                unet(x, torch.tensor([t, t]), context=ctx)  # a second call of the step: its own slot
        assert (state.full_calls, state.cached_calls) == (4, 6)
        assert sorted(state.features) == [0, 1]
    assert unet.__dict__["_deep_cache"] is None  # the block leaves the UNet as it was


def test_a_batch_that_does_not_match_its_slot_runs_in_full(unet) -> None:
    x, ctx = _inputs(4)
    with torch.no_grad():
        with deep_cache(unet, interval=2) as state:
            unet(x, torch.tensor([900, 900]), context=ctx)
            out = unet(x[:1], torch.tensor([800]), context=ctx[:1])
        plain = unet(x[:1], torch.tensor([800]), context=ctx[:1])
    assert torch.equal(out, plain)
    assert (state.full_calls, state.cached_calls) == (2, 0)


@pytest.mark.parametrize(("interval", "branch", "message"), [
    (0, 0, "interval must be a whole number"), (2.5, 0, "interval must be a whole number"),
    (3, 6, "branch must be a block index from 0 to 5"), (3, -1, "branch must be a block index")])
def test_bad_settings_are_refused(unet, interval, branch, message) -> None:
    with pytest.raises(ValueError, match=message), deep_cache(unet, interval=interval, branch=branch):
        pass


def test_nesting_and_other_modules_are_refused(unet) -> None:
    with pytest.raises(TypeError, match="needs a UNetModel"), deep_cache(torch.nn.Linear(2, 2)):
        pass
    with deep_cache(unet), pytest.raises(RuntimeError, match="already inside"), deep_cache(unet):
        pass


def test_pipelines_cache_when_asked_and_stay_near_the_exact_images(monkeypatch) -> None:
    pipe = load_pipeline(MODELS / "scenes-txt2img")
    states = []
    original = deepcache.DeepCacheState.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        states.append(self)

    monkeypatch.setattr(deepcache.DeepCacheState, "__init__", record)
    run = dict(steps=6, sampler="ddim", generator=0, progress=False)
    exact = pipe.text_to_image("a red sneaker on the left", **run).images
    assert not states  # off unless asked for
    cached = pipe.text_to_image("a red sneaker on the left", sampler_options={"deep_cache": 3}, **run).images
    assert len(states) == 1 and (states[0].full_calls, states[0].cached_calls) == (2, 4)
    difference = (cached - exact).abs()
    assert 0 < float(difference.mean()) < 0.1  # changed, but the same picture (pixels in [0, 1])
    with pytest.raises(ValueError, match="branch must be a block index"):
        pipe.text_to_image("a red sneaker", sampler_options={"deep_cache": 2, "deep_cache_branch": 99}, **run)


def test_the_cli_flag_is_recorded_in_the_png(tmp_path) -> None:
    out = tmp_path / "cached.png"
    assert main(["generate", "a blue bag on the right", "--steps", "4", "--deep-cache", "2", "-o", str(out)]) == 0
    assert read_png_parameters(out)["deep_cache"] == 2
    assert main(["generate", "--from-png", str(out), "-o", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()  # the record re-runs the cached sampling
    assert main(["generate", "a blue bag on the right", "--steps", "4", "-o", str(tmp_path / "exact.png")]) == 0
    assert "deep_cache" not in read_png_parameters(tmp_path / "exact.png")
    assert main(["generate", "a blue bag", "--deep-cache", "0", "-o", str(tmp_path / "zero.png")]) == 2
    assert not (tmp_path / "zero.png").exists()


def test_a_prompts_line_may_set_it(tmp_path) -> None:
    lines = tmp_path / "prompts.jsonl"
    lines.write_text('{"prompt": "a red bag", "deep_cache": 2}\n{"prompt": "a red bag"}\n')
    assert main(["generate", "--prompts", str(lines), "--steps", "4", "-o", str(tmp_path / "out") + "/"]) == 0
    assert read_png_parameters(tmp_path / "out" / "0000.png")["deep_cache"] == 2
    assert "deep_cache" not in read_png_parameters(tmp_path / "out" / "0001.png")
    lines.write_text('{"prompt": "a red bag", "deep_cache": 0}\n')
    assert main(["generate", "--prompts", str(lines), "--steps", "4", "-o", str(tmp_path / "bad") + "/"]) == 2
