"""CFG rescale (Lin et al. 2023): the x0 formulation against diffusers' ``rescale_noise_cfg`` on the noise prediction,
the tiny Stable Diffusion model against diffusers' ``StableDiffusionPipeline(guidance_rescale=0.7)``, and the option
through the sampling core and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import test_sd_pipeline as sd
import torch
from PIL import Image

from latentdiff.cli import main
from latentdiff.diffusion.guidance import CFGDenoiser, parameterization_anchor, rescale_guided
from latentdiff.diffusion.sampling import guided
from latentdiff.formats import save_diffusers
from latentdiff.pipelines import load_pipeline

rescale_noise_cfg = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"
                                        ).rescale_noise_cfg
RESCALE = 0.7


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescale_models")
    components = sd.tiny_components(sd.UNET, seed=0, tokenizer=sd.write_tokenizer(root / "tokenizer"))
    folder = save_diffusers(components, root / "v1")
    return folder, load_pipeline(folder), sd.load_theirs(folder)


def test_x0_rescale_is_diffusers_noise_rescale() -> None:
    """D = x - sigma * eps: rescaling the x0 estimates equals rescaling eps with diffusers' function."""
    g = torch.Generator().manual_seed(0)
    x, eps_uncond, eps_cond = (torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.5, 3.0, 14.0], dtype=torch.float64).view(3, 1, 1, 1)
    eps_cfg = eps_uncond + 7.5 * (eps_cond - eps_uncond)
    expected = x - sigma * rescale_noise_cfg(eps_cfg, eps_cond, guidance_rescale=RESCALE)
    got = rescale_guided(x, x - sigma * eps_cfg, x - sigma * eps_cond, RESCALE)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert float((got - (x - sigma * eps_cfg)).abs().max()) > 0.1  # the rescale does move the estimate


def test_v_rescale_is_diffusers_v_rescale() -> None:
    """A v-predicting network: the rescale acts on v, as diffusers' (v = (x / (1 + sigma^2) - D) * sqrt(1 +
    sigma^2) / sigma in the VE scalings), which differs from rescaling eps."""
    g = torch.Generator().manual_seed(1)
    x, v_uncond, v_cond = (torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.5, 3.0, 14.0], dtype=torch.float64)
    s = sigma.view(3, 1, 1, 1)
    a = 1 / (1 + s ** 2)
    to_d = lambda v: a * x - v * s * a.sqrt()  # noqa: E731  (x0 from v: D = a x - sigma sqrt(a) v)
    v_cfg = v_uncond + 7.5 * (v_cond - v_uncond)
    expected = to_d(rescale_noise_cfg(v_cfg, v_cond, guidance_rescale=RESCALE))
    anchor = parameterization_anchor("v", sigma, x.ndim)
    got = rescale_guided(x, to_d(v_cfg), to_d(v_cond), RESCALE, anchor)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    eps_form = rescale_guided(x, to_d(v_cfg), to_d(v_cond), RESCALE)
    assert float((got - eps_form).abs().max()) > 1e-3  # the parameterisation matters


def test_rescale_zero_and_no_guidance_leave_cfg_alone() -> None:
    def denoiser(x, sigma, context):  # guidance changes the spread of x - D, which the rescale then undoes
        return 0.5 * x * context

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cond, uncond = {"context": torch.full((2, 1, 1, 1), 1.5)}, {"context": torch.ones(2, 1, 1, 1)}
    cfg = CFGDenoiser(denoiser)
    plain = cfg(x, torch.ones(2), cond, uncond, 5.0)
    assert torch.equal(cfg(x, torch.ones(2), cond, uncond, 5.0, rescale=0.0), plain)
    assert not torch.allclose(cfg(x, torch.ones(2), cond, uncond, 5.0, rescale=1.0), plain)
    model, extra = guided(denoiser, cond, uncond, 1.0, guidance_rescale=0.7)
    assert model is denoiser and "rescale" not in extra  # scale 1: no unconditional branch, nothing to rescale
    with pytest.raises(ValueError, match="guidance_rescale"):
        guided(denoiser, cond, uncond, 5.0, guidance_rescale=1.5)


def _rescaled_images(ours, theirs, sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') images with CFG rescale, from the same initial noise."""
    latents = sd.initial_latents()
    expected = sd.with_scheduler(theirs, sampler)(
        sd.PROMPT, negative_prompt=sd.NEGATIVE, guidance_scale=7.5, guidance_rescale=RESCALE,
        num_inference_steps=sd.STEPS, latents=latents, output_type="pt").images
    got = ours.text_to_image(sd.PROMPT, sd.NEGATIVE, guidance_scale=7.5, steps=sd.STEPS, sampler=sampler,
                             latents=latents, sampler_options={"guidance_rescale": RESCALE}).images
    return got, expected


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_rescale_matches_diffusers(v1, sampler: str) -> None:
    _, ours, theirs = v1
    got, expected = _rescaled_images(ours, theirs, sampler)
    assert sd.max_diff(got, expected) <= sd.TOL
    plain = ours.text_to_image(sd.PROMPT, sd.NEGATIVE, guidance_scale=7.5, steps=sd.STEPS, sampler=sampler,
                               latents=sd.initial_latents()).images
    assert sd.max_diff(plain, expected) > 10 * sd.TOL  # the tolerance tells rescaled from plain CFG


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_v_prediction_rescale_matches_diffusers(tmp_path_factory, sampler: str) -> None:
    """A v-predicting model: diffusers rescales v (the eps-only form fails this test)."""
    root = tmp_path_factory.mktemp("rescale_v2")
    tokenizer = sd.write_tokenizer(root / "tokenizer", pad_token_id=0)
    folder = save_diffusers(sd.tiny_components(sd.UNET_V2, seed=20, v2=True, tokenizer=tokenizer), root / "v2")
    got, expected = _rescaled_images(load_pipeline(folder), sd.load_theirs(folder), sampler)
    assert sd.max_diff(got, expected) <= sd.TOL


def test_cli_guidance_rescale(v1, tmp_path, capsys) -> None:
    folder, ours, _ = v1
    out = tmp_path / "rescaled.png"
    args = ["generate", sd.PROMPT, "--model", str(folder), "--steps", "3", "--sampler", "ddim", "--seed", "2"]
    assert main([*args, "--guidance-rescale", "0.7", "-o", str(out)]) == 0
    expected = ours.text_to_image(sd.PROMPT, steps=3, sampler="ddim", generator=2,
                                  sampler_options={"guidance_rescale": 0.7}).pil()[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    assert main([*args, "--guidance-rescale", "2", "-o", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("latentdiff: error: ") and "--guidance-rescale" in err[-1]
