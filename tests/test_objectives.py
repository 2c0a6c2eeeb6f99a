"""Known-answer tests for the training objectives: targets, simple loss, min-SNR and ELBO weights, noise, timesteps."""

import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion import process as P
from latentdiff.diffusion.objectives import (
    DiffusionLossConfig,
    diffusion_loss,
    lvlb_weights,
    min_snr_weight,
    sample_noise,
    sample_timesteps,
    training_target,
)
from latentdiff.diffusion.schedule import NoiseSchedule, ScheduleConfig


def two_step_schedule() -> NoiseSchedule:
    # betas = [0.1, 0.5] -> alphas_cumprod = [0.9, 0.45], SNR = [9, 0.45 / 0.55]; every number below is by hand.
    return NoiseSchedule(ScheduleConfig(kind="linear", num_timesteps=2, beta_start=0.1, beta_end=0.5))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_perfect_prediction_has_zero_loss(parameterization):
    schedule = NoiseSchedule(ScheduleConfig())
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=gen)
    noise = sample_noise(x0.shape, gen, offset_noise=0.1)
    t = sample_timesteps(4, schedule, gen)
    target = training_target(schedule, parameterization, x0, noise, t)
    for config in (DiffusionLossConfig(parameterization=parameterization),
                   DiffusionLossConfig(parameterization=parameterization, loss_type="l1", min_snr_gamma=5.0,
                                       original_elbo_weight=1e-3)):
        output = target.clone().requires_grad_()
        loss, logs = diffusion_loss(config, schedule, output, x0, noise, t)
        assert loss.dim() == 0 and float(loss.detach()) == 0.0
        loss.backward()
        assert output.grad is not None and output.grad.shape == output.shape
        assert all(not value.requires_grad for value in logs.values())
    # The target is what the parameterisation's conversion inverts.
    xt = P.q_sample(schedule, x0, t, noise)
    pred_x0, pred_eps = P.predict_x0_and_eps(schedule, target, xt, t, parameterization)
    torch.testing.assert_close(pred_x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred_eps, noise, atol=1e-4, rtol=1e-4)


def test_l2_and_l1_known_values():
    schedule = two_step_schedule()
    x0 = torch.zeros(2, 1, 2, 2)
    noise = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([0, 1])
    errors = torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, -0.5, -0.5]]).reshape(2, 1, 2, 2)
    loss, logs = diffusion_loss(DiffusionLossConfig(loss_type="l2"), schedule, noise + errors, x0, noise, t)
    # Per sample: (1 + 4 + 9 + 0) / 4 = 3.5 and 0.25; mean 1.875.
    assert float(loss) == pytest.approx(1.875) and float(logs["loss_simple"]) == pytest.approx(1.875)
    loss, _ = diffusion_loss(DiffusionLossConfig(loss_type="l1"), schedule, noise + errors, x0, noise, t)
    # Per sample: 6 / 4 = 1.5 and 0.5; mean 1.0.
    assert float(loss) == pytest.approx(1.0)
    loss, _ = diffusion_loss(DiffusionLossConfig(loss_type="l2", l_simple_weight=2.0), schedule, noise + errors, x0,
                             noise, t)
    assert float(loss) == pytest.approx(3.75)


def test_min_snr_weights_hand_values():
    schedule = two_step_schedule()
    t = torch.tensor([0, 1])
    snr1 = 0.45 / 0.55
    # gamma = 5: SNR 9 is clipped to 5, SNR 0.818 is not.
    np.testing.assert_allclose(min_snr_weight(schedule, t, "eps", 5.0).numpy(), [5 / 9, 1.0], rtol=1e-12)
    np.testing.assert_allclose(min_snr_weight(schedule, t, "x0", 5.0).numpy(), [5.0, snr1], rtol=1e-12)
    np.testing.assert_allclose(min_snr_weight(schedule, t, "v", 5.0).numpy(), [0.5, snr1 / (snr1 + 1)], rtol=1e-12)
    # In the loss: per-sample errors 3.5 and 0.25 (see above) weighted 5/9 and 1.
    errors = torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, -0.5, -0.5]]).reshape(2, 1, 2, 2)
    zeros = torch.zeros_like(errors)
    loss, logs = diffusion_loss(DiffusionLossConfig(min_snr_gamma=5.0), schedule, errors, zeros, zeros, t)
    assert float(loss) == pytest.approx((3.5 * 5 / 9 + 0.25) / 2)
    assert float(logs["loss_simple"]) == pytest.approx(1.875)
    # Zero terminal SNR: the eps weight is 1 (its limit), not 0/0.
    ztsnr = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    assert float(min_snr_weight(ztsnr, torch.tensor([999]), "eps", 5.0)[0]) == 1.0
    assert float(min_snr_weight(ztsnr, torch.tensor([999]), "v", 5.0)[0]) == 0.0


def test_lvlb_weights_hand_values():
    schedule = two_step_schedule()
    # posterior variance at t = 1: 0.5 * (1 - 0.9) / (1 - 0.45) = 1 / 11.
    # eps: 0.5^2 / (2 (1/11) 0.5 0.55) = 5; exact x0: 0.25 * 0.9 / (2 (1/11) 0.55^2) = 4.0909...;
    # exact v: 0.25 * 0.9 / (2 (1/11) 0.55) = 2.25; CompVis x0: 0.5 sqrt(0.45) / (2 - 0.45); CompVis v: 1.
    ldm_x0 = 0.5 * math.sqrt(0.45) / 1.55
    for convention in ("ldm", "exact"):
        np.testing.assert_allclose(lvlb_weights(schedule, "eps", convention).numpy(), [5.0, 5.0], rtol=1e-12)
    np.testing.assert_allclose(lvlb_weights(schedule, "x0", "exact").numpy(), [0.225 / 0.055] * 2, rtol=1e-12)
    np.testing.assert_allclose(lvlb_weights(schedule, "v", "exact").numpy(), [2.25, 2.25], rtol=1e-12)
    np.testing.assert_allclose(lvlb_weights(schedule, "x0", "ldm").numpy(), [ldm_x0, ldm_x0], rtol=1e-12)
    np.testing.assert_allclose(lvlb_weights(schedule, "v", "ldm").numpy(), [1.0, 1.0])


def test_ldm_elbo_mix_hand_value():
    schedule = two_step_schedule()
    errors = torch.tensor([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, -0.5, -0.5]]).reshape(2, 1, 2, 2)
    zeros = torch.zeros_like(errors)
    t = torch.tensor([0, 1])
    config = DiffusionLossConfig(l_simple_weight=1.0, original_elbo_weight=0.5)
    loss, logs = diffusion_loss(config, schedule, errors, zeros, zeros, t)
    # simple = (3.5 + 0.25) / 2 = 1.875; vlb = mean(5 * 3.5, 5 * 0.25) = 9.375; loss = 1.875 + 0.5 * 9.375.
    assert float(logs["loss_vlb"]) == pytest.approx(9.375)
    assert float(loss) == pytest.approx(1.875 + 0.5 * 9.375)
    # LDM's x0 weight as CompVis computes it, 0.5 sqrt(a) / (2 - a), applies to both samples here.
    config = DiffusionLossConfig(parameterization="x0", original_elbo_weight=2.0)
    loss, _ = diffusion_loss(config, schedule, errors, zeros, zeros, t)
    assert float(loss) == pytest.approx(1.875 * (1 + 2.0 * 0.5 * math.sqrt(0.45) / 1.55))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_exact_elbo_weights_turn_the_error_into_the_kl_term(parameterization):
    # With fixed_small variance, L_{t-1} (nats/dim) = exact weight[t] * mean squared error of the target.
    schedule = NoiseSchedule(ScheduleConfig(kind="linear", num_timesteps=20, beta_start=1e-3, beta_end=0.2))
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    noise = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 2, 7, 13, 19])
    target = training_target(schedule, parameterization, x0, noise, t)
    output = target + 0.1 * torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    kl_bits = P.vlb_terms(schedule, lambda xt, tt: output, x0, t, noise, parameterization)["vlb"]
    mse = ((output - target) ** 2).mean(dim=(1, 2, 3))
    weights = lvlb_weights(schedule, parameterization, "exact")[t]
    torch.testing.assert_close(kl_bits * math.log(2), weights * mse)


def test_offset_noise_statistics():
    gen = torch.Generator().manual_seed(2)
    offset = 0.5
    noise = sample_noise((2000, 3, 8, 8), gen, offset_noise=offset)
    assert noise.shape == (2000, 3, 8, 8) and noise.dtype == torch.float32
    channel_means = noise.mean(dim=(2, 3))  # offset * z + the mean of 64 unit normals
    residual = noise - channel_means[..., None, None]
    # Tolerance 10%: the relative standard error of a variance over 6000 (sample, channel) pairs is ~2%.
    assert float(channel_means.var()) == pytest.approx(offset ** 2 + 1 / 64, rel=0.1)
    assert float(residual.var()) == pytest.approx(1 - 1 / 64, rel=0.02)
    assert float(noise.var()) == pytest.approx(1 + offset ** 2, rel=0.05)
    # The shared component is per channel: channel means are uncorrelated across channels.
    correlation = np.corrcoef(channel_means.T.numpy())
    assert np.abs(correlation - np.eye(3)).max() < 0.1
    # Without offset it is exactly the plain draw.
    plain = sample_noise((2, 3, 4, 4), torch.Generator().manual_seed(3))
    torch.testing.assert_close(plain, torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)))


def test_sample_timesteps_range_and_reproducibility():
    schedule = NoiseSchedule(ScheduleConfig(num_timesteps=50))
    t = sample_timesteps(10_000, schedule, torch.Generator().manual_seed(4))
    assert t.dtype == torch.long and t.shape == (10_000,)
    assert int(t.min()) == 0 and int(t.max()) == 49
    counts = torch.bincount(t, minlength=50).double()
    assert float(counts.min()) > 120 and float(counts.max()) < 280  # expected 200 each, sd ~14
    torch.testing.assert_close(t, sample_timesteps(10_000, schedule, torch.Generator().manual_seed(4)))
    assert not torch.equal(t, sample_timesteps(10_000, schedule, torch.Generator().manual_seed(5)))


def test_config_validation():
    with pytest.raises(ValueError):
        DiffusionLossConfig(parameterization="score")
    with pytest.raises(ValueError):
        DiffusionLossConfig(loss_type="huber")
    with pytest.raises(ValueError):
        DiffusionLossConfig(elbo_weights="other")
    with pytest.raises(ValueError):
        DiffusionLossConfig(min_snr_gamma=-1.0)
