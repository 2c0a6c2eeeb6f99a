"""The multistep solvers of ``latentdiff.diffusion.solvers`` (DPM++ 2M SDE, DPM++ 3M SDE, UniPC) against diffusers'
schedulers and against their known reductions, driven by the exact denoiser of a 2-D Gaussian mixture
(``test_samplers``' oracles; their moments and convergence orders are checked there with the other samplers).

diffusers' schedulers get the SD schedule (scaled-linear betas 0.00085..0.012, 1000 steps) and an eps-prediction
model made from the same denoiser, evaluated at the sigma of each of their steps; ours run over those sigmas in VE
space. diffusers computes its coefficients in float32, so the parity bound is relative 1e-5 (``PARITY``).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_samplers import F64, GAUSSIAN, MIXTURE, GaussianMixture, assert_close, karras

from latentdiff.diffusion.samplers import get_sampler, sample_ddpm, sample_dpmpp_2m, sample_euler
from latentdiff.diffusion.solvers import sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_unipc

diffusers = pytest.importorskip("diffusers")

PARITY = 1e-5  # max |ours - diffusers| relative to the samples' largest magnitude
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def start_noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def run_diffusers(scheduler, steps: int, data: GaussianMixture, noise: torch.Tensor,
                  step_noise: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the final sample, the sigmas visited) of ``scheduler`` from the VP noise ``noise``, with an eps-prediction
    model that is ``data``'s exact denoiser at each step's sigma; ``step_noise``: an SDE scheduler's noise, in order."""
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.to(F64)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i]
        x_ve = x * (1 + sigma ** 2).sqrt()
        eps = (x_ve - data(x_ve, sigma)) / sigma
        extra = {} if step_noise is None else {"variance_noise": step_noise[i]}
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x, sigmas


def run_ours(sampler, sigmas: torch.Tensor, data: GaussianMixture, noise: torch.Tensor, **options) -> torch.Tensor:
    """``sampler`` over ``sigmas`` from the same VP noise (VE: times sqrt(1 + sigma_max^2)), back to VP at the end."""
    x = sampler(data, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, disable=True, **options)
    return x / (1 + sigmas[-1] ** 2).sqrt()


def unipc(**config):
    return diffusers.UniPCMultistepScheduler(**SD_BETAS, **config)


def dpm_solver(**config):
    return diffusers.DPMSolverMultistepScheduler(**SD_BETAS, **config)


def replay(noises: list[torch.Tensor]):
    """A ``noise_sampler`` that hands out ``noises`` in order (float32, as diffusers' ``variance_noise``)."""
    it = iter(noises)
    return lambda sigma, sigma_next: next(it)


def step_noises(steps: int, n: int = 64, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 2, generator=g) for _ in range(steps)]


# ------------------------------------------------------------------------------------------------ UniPC


@pytest.mark.parametrize("karras_sigmas", [False, True])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_unipc_matches_diffusers(steps: int, karras_sigmas: bool) -> None:
    """diffusers' defaults for SD: order 2, "bh2", data prediction, lower_order_final, the corrector everywhere."""
    noise = start_noise()
    theirs, sigmas = run_diffusers(unipc(use_karras_sigmas=karras_sigmas), steps, MIXTURE, noise)
    assert sigmas[-1] == 0 and len(sigmas) == steps + 1
    ours = run_ours(sample_unipc, sigmas, MIXTURE, noise)
    assert relative_error(ours, theirs) < PARITY
    # the corrector matters at this tolerance: without it, the result moves by far more than the bound
    assert relative_error(run_ours(sample_unipc, sigmas, MIXTURE, noise, corrector=False), theirs) > 100 * PARITY


@pytest.mark.parametrize("options, config", [
    ({"order": 3}, {"solver_order": 3}),
    ({"variant": "bh1"}, {"solver_type": "bh1"}),
    ({"order": 3, "variant": "bh1"}, {"solver_order": 3, "solver_type": "bh1"}),
    ({"disable_corrector": (0, 3)}, {"disable_corrector": [0, 3]}),
], ids=["order3", "bh1", "order3-bh1", "disable_corrector"])
def test_unipc_options_match_diffusers(options: dict, config: dict) -> None:
    """Ending at sigma_min: diffusers' "bh1" steps to sigma 0 give NaN (B(h) = -h is infinite there)."""
    noise = start_noise(seed=1)
    theirs, sigmas = run_diffusers(unipc(final_sigmas_type="sigma_min", **config), 8, MIXTURE, noise)
    assert torch.isfinite(theirs).all()
    assert relative_error(run_ours(sample_unipc, sigmas, MIXTURE, noise, **options), theirs) < PARITY


@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_last_steps_as_diffusers(lower_order_final: bool, order: int) -> None:
    """Ending at sigma_min instead of 0, the last steps' orders show: lower_order_final lowers step i of n to order
    n - i, without it they keep the full order; both as diffusers, and the two differ."""
    noise = start_noise(seed=2)
    results = {}
    for lof in (lower_order_final, not lower_order_final):
        theirs, sigmas = run_diffusers(unipc(solver_order=order, lower_order_final=lof, final_sigmas_type="sigma_min"),
                                       6, MIXTURE, noise)
        assert sigmas[-1] > 0
        ours = run_ours(sample_unipc, sigmas, MIXTURE, noise, order=order, lower_order_final=lof)
        assert relative_error(ours, theirs) < PARITY
        results[lof] = ours
    assert relative_error(results[True], results[False]) > 100 * PARITY


def test_unipc_first_step_and_predictor_alone() -> None:
    """The first step has no history: first order, Euler's (= DDIM's) step. UniP alone (no corrector) with order 2 and
    "bh2" is DPM-Solver++(2M), with any sigmas."""
    sigmas = karras(12)
    x = GAUSSIAN.sample(32, float(sigmas[0]), torch.Generator().manual_seed(3))
    one_step = sigmas[:2]
    assert_close(sample_unipc(GAUSSIAN, x, one_step, disable=True), sample_euler(GAUSSIAN, x, one_step, disable=True),
                 1e-12)
    assert_close(sample_unipc(GAUSSIAN, x, sigmas, corrector=False, disable=True),
                 sample_dpmpp_2m(GAUSSIAN, x, sigmas, disable=True), 1e-12)
    with pytest.raises(ValueError, match="variant"):
        sample_unipc(GAUSSIAN, x, sigmas, variant="bh3", disable=True)


# ------------------------------------------------------------------------------------------------ DPM++ SDE


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("karras_sigmas", [False, True])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(steps: int, karras_sigmas: bool, solver_type: str) -> None:
    """k-diffusion's 2M SDE at eta = 1 is diffusers' "sde-dpmsolver++" of order 2 (its terms, written in VE space, are
    the same), given the same standard normal noise at every step.

    The data are the single Gaussian: with the mixture, the fresh noise can leave a sample near a boundary between
    components at low noise, where the denoiser is steep and amplifies diffusers' float32 rounding (one sample in 64
    at 20 steps ends 9e-5 apart, all others within 1e-6)."""
    noise, drawn = start_noise(seed=4), step_noises(steps)
    scheduler = dpm_solver(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type=solver_type,
                           use_karras_sigmas=karras_sigmas)
    theirs, sigmas = run_diffusers(scheduler, steps, GAUSSIAN, noise, drawn)
    ours = run_ours(sample_dpmpp_2m_sde, sigmas, GAUSSIAN, noise, solver_type=solver_type, noise_sampler=replay(drawn))
    assert relative_error(ours, theirs) < PARITY
    # and the noise is used: other noise, another sample
    other = run_ours(sample_dpmpp_2m_sde, sigmas, GAUSSIAN, noise, solver_type=solver_type,
                     noise_sampler=replay(step_noises(steps, seed=6)))
    assert relative_error(other, theirs) > 0.01


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_3m_sde_at_eta_0_is_diffusers_third_order_solver(steps: int) -> None:
    """At eta = 0, 3M SDE is DPM-Solver++'s third order multistep ODE solver, whose second step takes the "heun"
    form; diffusers' ``lower_order_final`` would lower the next-to-last step, k-diffusion does not."""
    noise = start_noise(seed=7)
    scheduler = dpm_solver(solver_order=3, solver_type="heun", lower_order_final=False)
    theirs, sigmas = run_diffusers(scheduler, steps, MIXTURE, noise)
    ours = run_ours(sample_dpmpp_3m_sde, sigmas, MIXTURE, noise, eta=0.0)
    assert relative_error(ours, theirs) < PARITY
    # the third order term is there: 2M SDE at eta = 0 (DPM-Solver++(2M)) is another solver
    assert relative_error(run_ours(sample_dpmpp_2m_sde, sigmas, MIXTURE, noise, eta=0.0), theirs) > 100 * PARITY


def reference_3m_sde(data: GaussianMixture, x_vp: torch.Tensor, sigmas: torch.Tensor,
                     noises: list[torch.Tensor]) -> torch.Tensor:
    """k-diffusion's 3M SDE at eta = 1, written out in VP space (x_t = alpha x0 + sigma_vp eps) from its published
    formulas: lambda = log(alpha / sigma_vp), weights of exp(-2h), previous estimates as divided differences."""
    x, d, lam = x_vp, [], []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        alpha = 1 / (1 + s ** 2).sqrt()
        denoised = data(x / alpha, s)
        if s_next == 0:
            return denoised
        alpha_next = 1 / (1 + s_next ** 2).sqrt()
        lam_s, lam_t = torch.log(1 / s), torch.log(1 / s_next)
        h = lam_t - lam_s
        x = (alpha_next * s_next) / (alpha * s) * torch.exp(-h) * x + alpha_next * (1 - torch.exp(-2 * h)) * denoised
        phi_2 = 1 - (1 - torch.exp(-2 * h)) / (2 * h)
        if len(d) >= 2:
            r0, r1 = (lam_s - lam[-1]) / h, (lam[-1] - lam[-2]) / h
            slope_0, slope_1 = (denoised - d[-1]) / r0, (d[-1] - d[-2]) / r1
            curvature = (slope_0 - slope_1) / (r0 + r1)
            x = x + alpha_next * (phi_2 * (slope_0 + r0 * curvature) - (phi_2 / (2 * h) - 0.5) * curvature)
        elif len(d) == 1:
            x = x + alpha_next * phi_2 * (denoised - d[-1]) / ((lam_s - lam[-1]) / h)
        x = x + alpha_next * s_next * (1 - torch.exp(-2 * h)).sqrt() * noises[i].to(F64)
        d, lam = [*d, denoised], [*lam, lam_s]
    return x


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_3m_sde_matches_its_formulas_with_injected_noise(steps: int) -> None:
    """At eta = 1 diffusers' third order "sde-dpmsolver++" update weights the second divided difference otherwise, so
    the reference is k-diffusion's formulas, written out independently (VP space) in ``reference_3m_sde``."""
    sigmas, drawn = karras(steps), step_noises(steps, seed=8)
    noise = start_noise(seed=9)
    expected = reference_3m_sde(MIXTURE, noise, sigmas, drawn)
    ours = run_ours(sample_dpmpp_3m_sde, sigmas, MIXTURE, noise, noise_sampler=replay(drawn))
    assert_close(ours, expected, 1e-10)


def test_sde_solvers_reduce_to_known_samplers() -> None:
    """eta = 0: 2M SDE ("midpoint") is DPM-Solver++(2M), exactly, with no draw from the generator. eta = 1: a first
    order step (the first step of both) is DDPM's posterior step, drawing the same noise from the generator."""
    sigmas = karras(15)
    x = GAUSSIAN.sample(32, float(sigmas[0]), torch.Generator().manual_seed(10))
    generator = torch.Generator().manual_seed(11)
    state = generator.get_state()
    assert_close(sample_dpmpp_2m_sde(GAUSSIAN, x, sigmas, eta=0.0, generator=generator, disable=True),
                 sample_dpmpp_2m(GAUSSIAN, x, sigmas, disable=True), 1e-12)
    assert torch.equal(generator.get_state(), state)
    one_step = sigmas[:2]
    ddpm = sample_ddpm(GAUSSIAN, x, one_step, generator=torch.Generator().manual_seed(12), disable=True)
    for sde in (sample_dpmpp_2m_sde, sample_dpmpp_3m_sde):
        assert_close(sde(GAUSSIAN, x, one_step, generator=torch.Generator().manual_seed(12), disable=True), ddpm, 1e-12)
    with pytest.raises(ValueError, match="eta"):
        sample_dpmpp_3m_sde(GAUSSIAN, x, sigmas, eta=-1.0, disable=True)
    with pytest.raises(ValueError, match="solver_type"):
        sample_dpmpp_2m_sde(GAUSSIAN, x, sigmas, solver_type="euler", disable=True)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_sde_noise_scale_keeps_the_marginal(name: str) -> None:
    """With the exact denoiser at every level the SDE step keeps x0 + sigma_next eps: a batch started on the noisy
    marginal of a point mass stays at std sigma_next after each step (a wrong noise std would show at once)."""
    point = GaussianMixture([1.0], [[0.3, -0.2]], [[[1e-12, 0.0], [0.0, 1e-12]]])
    sigmas = karras(6)[:-1]  # ends at sigma_min: every step adds noise
    x = point.sample(20_000, float(sigmas[0]), torch.Generator().manual_seed(13))
    out = get_sampler(name)(point, x, sigmas, generator=torch.Generator().manual_seed(14), disable=True)
    std = (out - point.means[0]).std(0)
    assert torch.allclose(std, torch.full_like(std, float(sigmas[-1])), rtol=0.03), std
    assert math.isclose(float((out - point.means[0]).mean()), 0.0, abs_tol=4 * float(sigmas[-1]) / 100)
