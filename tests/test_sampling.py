"""The sampling core: how it starts, guides, wraps, ends, and the order in which it uses the generator."""

import math

import pytest
import torch

from latentdiff.diffusion.noise_levels import get_sigmas_karras
from latentdiff.diffusion.samplers import SamplerSpec, get_sampler
from latentdiff.diffusion.sampling import KnownRegion, denoise, guided, sample, start_latent

SIGMAS = get_sigmas_karras(4, 0.03, 14.6)


def shrink(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
    """A closed-form denoiser (the data is N(shift, 1)): E[x0 | x] = (x + sigma^2 shift) / (1 + sigma^2)."""
    shift = cond.get("shift", torch.zeros(()))
    s2 = sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2
    return (x + s2 * shift) / (1 + s2)


def recording_spec(seen: list) -> SamplerSpec:
    """A sampler that records its inputs and returns x unchanged."""
    def record(model, x, sigmas, **kwargs):
        seen.append((model, x.clone(), sigmas, kwargs))
        return x
    return SamplerSpec("record", record)


def test_start_from_noise_or_from_an_image_latent_and_end_in_vp_space():
    noise, init = torch.randn(2, 3), torch.randn(2, 3)
    sigmas = torch.tensor([2.0, 0.5])
    seen = []
    out = denoise(shrink, sigmas, noise, sampler=recording_spec(seen))
    assert torch.equal(seen[0][1], noise * math.sqrt(1 + 2.0 ** 2))
    assert torch.equal(out, seen[0][1] / math.sqrt(1 + 0.5 ** 2))  # DDIM/PLMS stop above 0: the VP latent
    denoise(shrink, sigmas, noise, sampler=recording_spec(seen), init=init)
    assert torch.equal(seen[1][1], init + 2.0 * noise)
    assert torch.equal(start_latent(noise, 2.0, prior="ve"), noise * 2.0)
    with pytest.raises(ValueError, match="infinite"):
        start_latent(noise, math.inf)


def test_guidance_wraps_the_denoiser_only_when_it_changes_something():
    cond, uncond = {"shift": torch.ones(2, 1)}, {"shift": torch.zeros(2, 1)}
    model, extra = guided(shrink, cond, uncond, 1.0)
    assert model is shrink and extra == cond
    model, extra = guided(shrink, cond, None, 3.0)
    assert model is shrink and extra == cond
    model, extra = guided(shrink, cond, uncond, 3.0)
    x, sigma = torch.randn(2, 3), torch.full((2,), 1.5)
    d_cond, d_uncond = shrink(x, sigma, **cond), shrink(x, sigma, **uncond)
    torch.testing.assert_close(model(x, sigma, **extra), d_uncond + 3.0 * (d_cond - d_uncond))


def test_the_step_wrapper_sees_the_guided_model():
    seen = []
    denoise(shrink, SIGMAS, torch.randn(2, 3), sampler=recording_spec(seen), extra_args={"shift": torch.ones(2, 1)},
            uncond={"shift": torch.zeros(2, 1)}, guidance_scale=2.0, step_wrapper=lambda model: ("wrapped", model))
    wrapped, inner = seen[0][0]
    assert wrapped == "wrapped" and inner.__class__.__name__ == "CFGDenoiser"
    assert seen[0][3]["extra_args"]["scale"] == 2.0


def test_known_region_is_reimposed_below_the_first_level_and_pasted_back():
    known, noise = torch.full((1, 1, 2, 2), 5.0), torch.ones(1, 1, 2, 2)
    repaint = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    region = KnownRegion(known, noise, repaint, first_sigma=2.0)
    inputs = []
    model = region.wrap(lambda x, sigma: inputs.append(x) or x)
    x = torch.zeros(1, 1, 2, 2)
    model(x, torch.tensor([2.0]))  # the first call sees x as the sampler starts it
    model(x, torch.tensor([0.5]))
    assert torch.equal(inputs[0], x)
    assert torch.equal(inputs[1], torch.tensor([[[[0.0, 5.5], [5.5, 0.0]]]]))
    assert torch.equal(region.paste(torch.full((1, 1, 2, 2), -1.0)), torch.tensor([[[[-1.0, 5.0], [5.0, -1.0]]]]))


def test_initial_noise_comes_first_then_the_samplers_noise():
    spec = get_sampler("euler_ancestral")
    got = sample(shrink, (3, 2), SIGMAS, spec, torch.Generator().manual_seed(4), disable=True)
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(3, 2, generator=generator)
    want = spec(shrink, noise * math.sqrt(1 + float(SIGMAS[0]) ** 2), SIGMAS, generator=generator, disable=True)
    assert torch.equal(got, want)
    again = denoise(shrink, SIGMAS, torch.randn(3, 2, generator=torch.Generator().manual_seed(4)), sampler=spec,
                    generator=torch.Generator().manual_seed(4), disable=True)
    assert not torch.equal(again, got)  # the sampler's draws must follow the initial noise on one generator
