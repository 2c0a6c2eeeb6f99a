"""The noise levels: timestep spacing against diffusers' published timesteps, strength, where each sampler ends."""

import pytest
import torch

from latentdiff.diffusion.noise_levels import (
    SPACINGS,
    apply_strength,
    get_sigmas_discrete,
    sampler_sigmas,
    sampler_timesteps,
    spaced_timesteps,
    strength_start,
)
from latentdiff.diffusion.samplers import SAMPLERS
from latentdiff.diffusion.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule()  # SD's scaled-linear schedule, 1000 steps

# diffusers' DDIM/Euler (and DPM-Solver, with its extra level) schedulers, 10 steps of 1000, steps_offset=1.
KNOWN = {
    ("leading", False): [901, 801, 701, 601, 501, 401, 301, 201, 101, 1],
    ("linspace", False): [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    ("trailing", False): [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    ("leading", True): [901, 811, 721, 631, 541, 451, 361, 271, 181, 91],
    ("linspace", True): [999, 899, 799, 699, 599, 500, 400, 300, 200, 100],
    ("trailing", True): [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
}


@pytest.mark.parametrize("spacing, extra_level", sorted(KNOWN))
def test_spacing_gives_diffusers_timesteps(spacing, extra_level):
    assert spaced_timesteps(1000, 10, spacing, offset=1, extra_level=extra_level).tolist() == KNOWN[
        (spacing, extra_level)]


def test_spacing_matches_diffusers_schedulers_for_other_step_counts():
    diffusers = pytest.importorskip("diffusers")
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  set_alpha_to_one=False)
    for spacing in SPACINGS:
        for name, extra_level in (("DDIMScheduler", False), ("DPMSolverMultistepScheduler", True)):
            scheduler = getattr(diffusers, name).from_config(dict(config, timestep_spacing=spacing))
            for steps in (4, 25, 50):
                scheduler.set_timesteps(steps)
                want = [int(t) for t in scheduler.timesteps]
                assert spaced_timesteps(1000, steps, spacing, 1, extra_level).tolist() == want, (name, spacing, steps)


def test_spacing_errors_and_leading_offset():
    assert spaced_timesteps(1000, 10, "leading", offset=0).tolist() == list(range(900, -1, -100))
    assert spaced_timesteps(1000, 1000, "leading", offset=1)[:2].tolist() == [999, 999]  # clamped, not removed
    assert len(get_sigmas_discrete(SCHEDULE, 1000)) == 1000  # distinct levels, then 0
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="between 1 and 1000"):
        spaced_timesteps(1000, 0)


def test_the_registry_decides_each_samplers_levels():
    for name, spec in SAMPLERS.items():
        extra = spec.spacing_extra_level
        assert sampler_timesteps(name, 10) == KNOWN[(spec.default_spacing, extra)]
        assert sampler_timesteps(name, 10, spacing="leading") == KNOWN[("leading", extra)]
        sigmas = sampler_sigmas(SCHEDULE, spec, 10)
        assert sigmas.dtype == torch.float32 and len(sigmas) == 11
        final = float(SCHEDULE.sigmas[0]) if spec.ends_at_first_level else 0.0
        assert float(sigmas[-1]) == pytest.approx(final)
    assert sampler_timesteps("ddim", 10, spacing="trailing") == KNOWN[("trailing", False)]


def test_strength_is_a_parameter_of_the_levels():
    sigmas = sampler_sigmas(SCHEDULE, "euler", 10)
    assert strength_start(10, 0.6) == 4 and strength_start(10, 1.0) == 0
    assert torch.equal(apply_strength(sigmas, 0.6), sigmas[4:])
    assert torch.equal(sampler_sigmas(SCHEDULE, "euler", 10, strength=0.6), sigmas[4:])
    assert torch.equal(apply_strength(sigmas, 1.0), sigmas)
    with pytest.raises(ValueError, match="no denoising step"):
        apply_strength(sigmas, 0.05)
    with pytest.raises(ValueError, match="between 0 and 1"):
        strength_start(10, 1.5)
