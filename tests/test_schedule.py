"""Known-answer tests for the noise schedules: each kind against its formula computed independently in numpy."""

import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion.schedule import NoiseSchedule, ScheduleConfig, make_betas, rescale_zero_terminal_snr


def test_scaled_linear_matches_stable_diffusion():
    schedule = NoiseSchedule(ScheduleConfig())  # SD v1/v2: scaled_linear 0.00085 .. 0.012, 1000 steps
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-12)
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert float(schedule.alphas_cumprod[0]) == pytest.approx(0.99915, abs=1e-12)
    # The sigma range every SD sampler reports (k-diffusion's model_wrap of SD): 0.0292 .. 14.6146.
    assert schedule.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert schedule.sigma_min == pytest.approx(0.029168, abs=1e-6)
    np.testing.assert_allclose(schedule.sigmas.numpy(), np.sqrt((1 - alphas_cumprod) / alphas_cumprod), rtol=1e-12)
    assert float(schedule.alphas_cumprod_prev[0]) == 1.0
    np.testing.assert_allclose(schedule.alphas_cumprod_prev[1:].numpy(), alphas_cumprod[:-1], rtol=1e-12)


def test_linear_is_ddpm_linspace():
    schedule = NoiseSchedule(ScheduleConfig(kind="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02))
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)


def test_cosine_follows_alpha_bar_formula():
    T, s = 100, 0.008
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine", num_timesteps=T, cosine_s=s))

    def alpha_bar(t):  # Nichol & Dhariwal 2021, eq. 17
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    expected = np.array([alpha_bar(t + 1) / alpha_bar(0) for t in range(T)])
    # Every beta but the last is below the 0.999 clip, so the cumulative product is the formula itself there.
    np.testing.assert_allclose(schedule.alphas_cumprod[:-1].numpy(), expected[:-1], rtol=1e-10)
    assert float(schedule.betas[-1]) == pytest.approx(0.999)
    assert bool((schedule.betas[:-1] < 0.999).all())


def test_zero_terminal_snr():
    plain = NoiseSchedule(ScheduleConfig())
    rescaled = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    assert float(rescaled.alphas_cumprod[-1]) == 0.0
    assert float(rescaled.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-12)
    assert bool((rescaled.alphas_cumprod[1:] < rescaled.alphas_cumprod[:-1]).all())
    assert bool(torch.isinf(rescaled.sigmas[-1])) and math.isfinite(rescaled.sigma_max)
    # sqrt(alphas_cumprod) is an affine map of the original one (Lin et al. 2023, algorithm 1).
    a, b = plain.alphas_cumprod.sqrt().numpy(), rescaled.alphas_cumprod.sqrt().numpy()
    slope, intercept = np.polyfit(a, b, 1)
    np.testing.assert_allclose(b, slope * a + intercept, atol=1e-12)
    np.testing.assert_allclose(rescale_zero_terminal_snr(plain.betas).numpy(), rescaled.betas.numpy())
    # The last step is pure noise: t = T-1 maps to sigma = inf and back.
    assert math.isinf(float(rescaled.t_to_sigma(torch.tensor([999.0]))[0]))
    assert float(rescaled.sigma_to_t(torch.tensor([math.inf]))[0]) == 999.0
    assert float(rescaled.snr(torch.tensor([999]))[0]) == 0.0


def test_sigma_t_round_trip():
    schedule = NoiseSchedule(ScheduleConfig())
    t = torch.tensor([0.0, 0.25, 10.0, 123.5, 500.0, 998.75, 999.0], dtype=torch.float64)
    sigma = schedule.t_to_sigma(t)
    np.testing.assert_allclose(schedule.sigma_to_t(sigma).numpy(), t.numpy(), atol=1e-9)
    np.testing.assert_allclose(schedule.t_to_sigma(torch.arange(1000, dtype=torch.float64)).numpy(),
                               schedule.sigmas.numpy(), rtol=1e-12)
    np.testing.assert_allclose(schedule.sigma_to_t(schedule.sigmas).numpy(), np.arange(1000), atol=1e-9)
    # Out-of-range sigmas clamp to the ends.
    assert float(schedule.sigma_to_t(torch.tensor([1e-6]))[0]) == 0.0
    assert float(schedule.sigma_to_t(torch.tensor([1e6]))[0]) == 999.0


def test_snr():
    schedule = NoiseSchedule(ScheduleConfig(kind="linear", num_timesteps=2, beta_start=0.1, beta_end=0.5))
    # alphas_cumprod = [0.9, 0.45] by hand.
    np.testing.assert_allclose(schedule.snr(torch.tensor([0, 1])).numpy(), [9.0, 0.45 / 0.55], rtol=1e-12)


def test_invalid_kind():
    with pytest.raises(ValueError, match="unknown schedule"):
        ScheduleConfig(kind="quadratic")
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError):
        ScheduleConfig(num_timesteps=0)
