"""Known-answer tests for the diffusion process: forward marginals, the posterior, conversions and the bound."""

import math

import numpy as np
import pytest
import torch

from latentdiff.diffusion import process as P
from latentdiff.diffusion.schedule import NoiseSchedule, ScheduleConfig

LN2 = math.log(2.0)


def small_schedule(T: int = 50) -> NoiseSchedule:
    # A short linear schedule that still ends near pure noise (alphas_cumprod[-1] ~ 0.006).
    return NoiseSchedule(ScheduleConfig(kind="linear", num_timesteps=T, beta_start=1e-3, beta_end=0.2))


def test_q_sample_marginal_statistics():
    schedule = NoiseSchedule(ScheduleConfig())
    gen = torch.Generator().manual_seed(0)
    m = 100_000
    values = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64)
    x0 = values.expand(m, 3)
    for step in (0, 200, 999):
        t = torch.full((m,), step, dtype=torch.long)
        xt = P.q_sample(schedule, x0, t, P.draw_noise(x0.shape, gen, dtype=torch.float64))
        a = float(schedule.alphas_cumprod[step])
        # Tolerance: 5 standard errors of the mean (sqrt((1-a)/m)) and of the variance ((1-a) sqrt(2/m)).
        np.testing.assert_allclose(xt.mean(0).numpy(), math.sqrt(a) * values.numpy(), atol=5 * math.sqrt((1 - a) / m))
        np.testing.assert_allclose(xt.var(0).numpy(), [1 - a] * 3, atol=5 * (1 - a) * math.sqrt(2 / m))
        mean, var, log_var = P.q_mean_variance(schedule, x0[:2], t[:2])
        np.testing.assert_allclose(mean.numpy(), math.sqrt(a) * x0[:2].numpy(), rtol=1e-12)
        assert var.shape == (2, 1) and float(var[0, 0]) == pytest.approx(1 - a) and float(log_var[0, 0]) == (
            pytest.approx(math.log(1 - a)))


def test_forward_steps_compose_to_the_marginal():
    schedule = small_schedule()
    gen = torch.Generator().manual_seed(1)
    m, k = 50_000, 20
    values = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    x = values.expand(m, 2)
    for step in range(k):
        x = P.q_step_sample(schedule, x, torch.full((m,), step), P.draw_noise(x.shape, gen, dtype=torch.float64))
    a = float(schedule.alphas_cumprod[k - 1])
    np.testing.assert_allclose(x.mean(0).numpy(), math.sqrt(a) * values.numpy(), atol=5 * math.sqrt((1 - a) / m))
    np.testing.assert_allclose(x.var(0).numpy(), [1 - a] * 2, atol=5 * (1 - a) * math.sqrt(2 / m))


def test_posterior_matches_bayes_rule():
    schedule = NoiseSchedule(ScheduleConfig())
    betas, a = schedule.betas.numpy(), schedule.alphas_cumprod.numpy()
    x0_value, xt_value = 0.7, -0.4
    steps = torch.tensor([1, 2, 10, 100, 500, 999])
    x0 = torch.full((len(steps), 1), x0_value, dtype=torch.float64)
    xt = torch.full((len(steps), 1), xt_value, dtype=torch.float64)
    mean, var, log_var = P.q_posterior(schedule, x0, xt, steps)
    for i, step in enumerate(steps.tolist()):
        # Bayes: q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0); integrate it on a grid.
        prior_mean, prior_var = math.sqrt(a[step - 1]) * x0_value, 1 - a[step - 1]
        # The grid spans both factors' mass: the prior's and the one centred on x_t / sqrt(alpha_t).
        centres = (prior_mean, xt_value / math.sqrt(1 - betas[step]))
        width = 12 * math.sqrt(max(prior_var, betas[step] / (1 - betas[step])))
        grid = np.linspace(min(centres) - width, max(centres) + width, 400_001)
        log_density = (-0.5 * (grid - prior_mean) ** 2 / prior_var
                       - 0.5 * (xt_value - math.sqrt(1 - betas[step]) * grid) ** 2 / betas[step])
        weights = np.exp(log_density - log_density.max())
        weights /= weights.sum()
        grid_mean = (weights * grid).sum()
        grid_var = (weights * (grid - grid_mean) ** 2).sum()
        assert float(mean[i, 0]) == pytest.approx(grid_mean, rel=1e-6, abs=1e-9)
        assert float(var[i, 0]) == pytest.approx(grid_var, rel=1e-5)
        assert float(log_var[i, 0]) == pytest.approx(math.log(grid_var), abs=1e-5)
    # At t = 0 the previous sample is the data: mean x_0, variance 0, log-variance clipped to that of t = 1.
    mean0, var0, log_var0 = P.q_posterior(schedule, x0[:1], xt[:1], torch.tensor([0]))
    assert float(mean0[0, 0]) == pytest.approx(x0_value, abs=1e-12)
    assert float(var0[0, 0]) == 0.0
    assert float(log_var0[0, 0]) == pytest.approx(float(P.posterior_variance(schedule)[1].log()))


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_parameterisation_conversions_round_trip(parameterization):
    schedule = NoiseSchedule(ScheduleConfig())
    gen = torch.Generator().manual_seed(2)
    x0 = P.draw_noise((6, 2, 3, 3), gen, dtype=torch.float64)
    eps = P.draw_noise((6, 2, 3, 3), gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    xt = P.q_sample(schedule, x0, t, eps)
    v = P.v_from_x0_eps(schedule, x0, eps, t)
    output = {"eps": eps, "x0": x0, "v": v}[parameterization]
    pred_x0, pred_eps = P.predict_x0_and_eps(schedule, output, xt, t, parameterization)
    torch.testing.assert_close(pred_x0, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(pred_eps, eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(P.eps_from_x0(schedule, xt, t, P.x0_from_eps(schedule, xt, t, eps)), eps)
    torch.testing.assert_close(P.x0_from_v(schedule, xt, t, v), x0)
    torch.testing.assert_close(P.eps_from_v(schedule, xt, t, v), eps)
    # v, x_t is a rotation of x_0, eps: norms are kept.
    torch.testing.assert_close(xt ** 2 + v ** 2, x0 ** 2 + eps ** 2)


def test_conversions_keep_device_and_dtype():
    schedule = NoiseSchedule(ScheduleConfig())
    xt = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 700])
    pred_x0, pred_eps = P.predict_x0_and_eps(schedule, xt, xt, t, "v")
    assert pred_x0.dtype == torch.float32 and pred_eps.shape == xt.shape
    assert P.extract(schedule.alphas_cumprod, t, xt.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="parameterization"):
        P.predict_x0_and_eps(schedule, xt, xt, t, "score")


def test_reverse_step():
    schedule = small_schedule()
    gen = torch.Generator().manual_seed(3)
    x0 = P.draw_noise((4, 3), gen, dtype=torch.float64)
    eps = P.draw_noise((4, 3), gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 25, 49])
    xt = P.q_sample(schedule, x0, t, eps)
    # With the true noise, the reverse mean is the posterior mean (DDPM eq. 11 equals eq. 7).
    out = P.p_mean_variance(schedule, eps, xt, t, "eps")
    true_mean, true_var, _ = P.q_posterior(schedule, x0, xt, t)
    torch.testing.assert_close(out["mean"], true_mean)
    torch.testing.assert_close(out["variance"][1:], true_var[1:])
    pv = P.posterior_variance(schedule)
    assert float(out["variance"][0, 0]) == pytest.approx(float(pv[1]))
    large = P.p_mean_variance(schedule, eps, xt, t, "eps", variance="fixed_large")
    np.testing.assert_allclose(large["variance"][:, 0].numpy(), [pv[1], *schedule.betas[[1, 25, 49]].tolist()])
    clipped = P.p_mean_variance(schedule, eps * 10, xt, t, "eps", clip_denoised=1.0)
    assert float(clipped["pred_x0"].abs().max()) <= 1.0
    # p_sample: no noise at t = 0; the generator alone decides the noise.
    sample_a, pred_x0 = P.p_sample(schedule, eps, xt, t, "eps", torch.Generator().manual_seed(7))
    sample_b, _ = P.p_sample(schedule, eps, xt, t, "eps", torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample_a, sample_b)
    torch.testing.assert_close(sample_a[0], out["mean"][0])
    torch.testing.assert_close(pred_x0, x0)
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(sample_a[1:], (out["mean"] + out["variance"].sqrt() * noise)[1:])


def test_normal_kl_hand_value():
    # KL(N(1, 1) || N(0, 4)) = 0.5 (log 4 + 1/4 + 1/4 - 1) = log 2 - 1/4.
    assert float(P.normal_kl(1.0, 0.0, 0.0, math.log(4.0))) == pytest.approx(math.log(2) - 0.25, rel=1e-12)
    assert float(P.normal_kl(torch.tensor(0.3), torch.tensor(-1.0), 0.3, -1.0)) == 0.0


def test_discretized_likelihood_is_a_distribution_over_256_values():
    values = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.5)), (0.9, math.log(0.01)), (-3.0, math.log(2.0)), (0.2, -8.0)]:
        log_p = P.discretized_gaussian_log_likelihood(values, torch.tensor(mean, dtype=torch.float64),
                                                      torch.tensor(log_scale, dtype=torch.float64))
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # A wide Gaussian is nearly flat over one bin of width 2/255: probability = density * width.
    x = torch.tensor([0.1, -0.5], dtype=torch.float64)
    log_scales = torch.full_like(x, math.log(0.7))
    expected = P.gaussian_log_likelihood(x, torch.zeros_like(x), log_scales) + math.log(2 / 255)
    torch.testing.assert_close(P.discretized_gaussian_log_likelihood(x, torch.zeros_like(x), log_scales), expected,
                               atol=1e-5, rtol=0)
    # Far in a tail the bin probability stays exact (no cancellation): compare with the erfc form.
    far = P.discretized_gaussian_log_likelihood(torch.tensor([0.5], dtype=torch.float64),
                                                torch.tensor([0.0], dtype=torch.float64),
                                                torch.tensor([math.log(0.1)], dtype=torch.float64))
    lo, hi = (0.5 - 1 / 255) / 0.1, (0.5 + 1 / 255) / 0.1
    exact = 0.5 * (math.erfc(lo / math.sqrt(2)) - math.erfc(hi / math.sqrt(2)))
    assert float(far[0]) == pytest.approx(math.log(exact), rel=1e-9)


# ---- the bound of the Bayes-optimal denoiser on 1-D Gaussian data, in closed form --------------------------------

DATA_MEAN, DATA_STD = 0.5, 0.3


def optimal_eps_model(schedule: NoiseSchedule):
    """E[eps | x_t] for x_0 ~ N(m, s^2): linear in x_t (Gaussian conditioning)."""
    def model_fn(xt, t):
        a = schedule.alphas_cumprod[t].to(xt.dtype).reshape(-1, 1)
        s2 = DATA_STD ** 2
        x0_mean = DATA_MEAN + a.sqrt() * s2 / (a * s2 + 1 - a) * (xt - a.sqrt() * DATA_MEAN)
        return (xt - a.sqrt() * x0_mean) / (1 - a).sqrt()
    return model_fn


def analytic_terms_bits(schedule: NoiseSchedule, variance: str) -> tuple[list[float], float]:
    """E over data and noise of each L_{t-1} (t = 0: the continuous decoder term) and of L_T, in bits/dim.

    With x0_hat = E[x_0 | x_t], E (x_0 - x0_hat)^2 = Var(x_0 | x_t) = s^2 (1 - a_t) / (a_t s^2 + 1 - a_t).
    L_{t-1} = KL(N(mu~, beta~_t) || N(mu~ + c_t (x0_hat - x_0), sigma_t^2)), c_t = beta_t sqrt(a_{t-1}) / (1 - a_t),
    so E L_{t-1} = 0.5 (log(sigma_t^2 / beta~_t) + beta~_t / sigma_t^2 - 1 + c_t^2 Var(x_0 | x_t) / sigma_t^2).
    The decoder term is E -log N(x_0; x0_hat, beta~_1) and the prior KL(N(sqrt(a_T) x_0, 1 - a_T) || N(0, 1)).
    """
    betas = schedule.betas.tolist()
    a = schedule.alphas_cumprod.tolist()
    m, s2 = DATA_MEAN, DATA_STD ** 2
    post_var = [betas[t] * (1 - (a[t - 1] if t else 1.0)) / (1 - a[t]) for t in range(len(a))]
    terms = []
    for t in range(len(a)):
        cond_var = s2 * (1 - a[t]) / (a[t] * s2 + 1 - a[t])
        if t == 0:
            terms.append(0.5 * math.log(2 * math.pi * post_var[1]) + cond_var / (2 * post_var[1]))
            continue
        sigma2 = post_var[t] if variance == "fixed_small" else betas[t]
        c = betas[t] * math.sqrt(a[t - 1]) / (1 - a[t])
        terms.append(0.5 * (math.log(sigma2 / post_var[t]) + post_var[t] / sigma2 - 1 + c ** 2 * cond_var / sigma2))
    a_T = a[-1]
    prior = 0.5 * (-1 - math.log(1 - a_T) + (1 - a_T) + a_T * (m ** 2 + s2))
    return [term / LN2 for term in terms], prior / LN2


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_bound_of_optimal_denoiser_matches_analytic_value(variance):
    schedule = small_schedule()
    gen = torch.Generator().manual_seed(4)
    n = 20_000
    x0 = DATA_MEAN + DATA_STD * P.draw_noise((n, 1), gen, dtype=torch.float64)
    result = P.estimate_bpd(schedule, optimal_eps_model(schedule), x0, "all", gen, "eps", variance,
                            decoder_nll="continuous")
    assert result["terms"].shape == (n, 50) and bool((result["stderr"] == 0).all())
    torch.testing.assert_close(result["total_bpd"], result["terms"].sum(1) + result["prior_bpd"])
    expected_terms, expected_prior = analytic_terms_bits(schedule, variance)
    expected = sum(expected_terms) + expected_prior
    # Tolerance: 4 Monte-Carlo standard errors of the mean over the n data points (under 0.05 bits/dim here),
    # for the total and for each term.
    standard_error = float(result["total_bpd"].std()) / math.sqrt(n)
    assert standard_error < 0.05
    assert abs(float(result["total_bpd"].mean()) - expected) < 4 * standard_error
    term_errors = (result["terms"].mean(0) - torch.tensor(expected_terms, dtype=torch.float64)).abs()
    assert bool((term_errors < 4 * result["terms"].std(0) / math.sqrt(n)).all()), term_errors
    prior_se = float(result["prior_bpd"].std()) / math.sqrt(n)
    assert abs(float(result["prior_bpd"].mean()) - expected_prior) < 4 * prior_se


def test_subset_estimate_is_unbiased_and_its_stderr_calibrated():
    schedule = small_schedule()
    gen = torch.Generator().manual_seed(5)
    n = 2000
    # One data point repeated: rows are then i.i.d. estimates for that point, so their spread checks the stderr.
    x0 = torch.full((n, 1), 0.8, dtype=torch.float64)
    model = optimal_eps_model(schedule)
    full = P.estimate_bpd(schedule, model, x0, "all", gen, decoder_nll="continuous")
    subset = P.estimate_bpd(schedule, model, x0, 10, gen, decoder_nll="continuous")
    assert subset["terms"].shape == (n, 10) and subset["timesteps"].shape == (n, 10)
    assert int(subset["timesteps"].min()) >= 0 and int(subset["timesteps"].max()) <= 49
    se_subset = float(subset["total_bpd"].std()) / math.sqrt(n)
    se_full = float(full["total_bpd"].std()) / math.sqrt(n)
    difference = float(subset["total_bpd"].mean() - full["total_bpd"].mean())
    assert abs(difference) < 4 * math.sqrt(se_subset ** 2 + se_full ** 2)
    # The reported per-sample stderr matches the actual spread of the estimates (within 15%).
    ratio = float(subset["stderr"].pow(2).mean().sqrt()) / float(subset["total_bpd"].std())
    assert 0.85 < ratio < 1.15, ratio


def test_bound_with_discretized_decoder_on_pixels():
    schedule = small_schedule(T=20)
    gen = torch.Generator().manual_seed(6)
    x0 = (torch.randint(0, 256, (3, 1, 4, 4), generator=gen).double() / 127.5 - 1)
    result = P.estimate_bpd(schedule, lambda xt, t: torch.zeros_like(xt), x0, "all", gen, clip_denoised=1.0)
    assert result["total_bpd"].shape == (3,) and bool(torch.isfinite(result["total_bpd"]).all())
    # A probability over 256 values costs >= 0 bits, and L_{t-1} are KLs, so every term is non-negative.
    assert bool((result["terms"] >= 0).all()) and bool((result["prior_bpd"] >= 0).all())
    with pytest.raises(ValueError):
        P.estimate_bpd(schedule, lambda xt, t: xt, x0, "some", gen)


def test_prior_bpd_hand_value():
    schedule = small_schedule()
    x0 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    a = float(schedule.alphas_cumprod[-1])
    expected = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * 1.0) / LN2
    assert float(P.prior_bpd(schedule, x0)[0]) == pytest.approx(expected, rel=1e-12)
