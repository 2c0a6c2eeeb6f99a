"""Tests of the samplers against exact denoisers of 2-D Gaussians and Gaussian mixtures, whose answer is known.

For data with a Gaussian (mixture) distribution, E[x0 | x0 + sigma * eps = x] has a closed form, so a sampler
driven by it must reproduce the data's mean, covariance and mixture weights up to Monte-Carlo error plus its
own discretisation error. The step counts below keep the discretisation bias under about 1.5 standard errors
(measured with 1e5 samples), and every check allows ``Z`` = 4 standard errors.
"""

import math

import pytest
import torch

from latentdiff.diffusion.noise_levels import (
    discrete_timesteps,
    get_sigmas_discrete,
    get_sigmas_exponential,
    get_sigmas_karras,
)
from latentdiff.diffusion.samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_ancestral,
    sample_plms,
)
from latentdiff.diffusion.sampling import initial_noise_scale, sample
from latentdiff.diffusion.schedule import NoiseSchedule

F64 = torch.float64
Z = 4.0  # allowed deviation, in Monte-Carlo standard errors
SCHEDULE = NoiseSchedule()  # SD's scaled-linear schedule, 1000 steps


def full_chain_sigmas() -> torch.Tensor:
    return torch.cat([SCHEDULE.sigmas.flip(0), torch.zeros(1, dtype=F64)])


def karras(n: int) -> torch.Tensor:
    return get_sigmas_karras(n, SCHEDULE.sigma_min, SCHEDULE.sigma_max, dtype=F64)


def discrete(n: int) -> torch.Tensor:
    return get_sigmas_discrete(SCHEDULE, n, dtype=F64)


class GaussianMixture:
    """Data x0 ~ sum_k w_k N(m_k, C_k) in 2-D, with the exact denoiser E[x0 | x] at noise level sigma."""

    def __init__(self, weights, means, covs) -> None:
        self.weights = torch.tensor(weights, dtype=F64)
        self.means = torch.tensor(means, dtype=F64)  # (K, 2)
        self.covs = torch.tensor(covs, dtype=F64)  # (K, 2, 2)

    @property
    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    @property
    def cov(self) -> torch.Tensor:
        centred = self.means - self.mean
        within = (self.weights[:, None, None] * self.covs).sum(0)
        return within + (self.weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)

    def sample(self, n: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
        """Samples of the noisy marginal x0 + sigma * eps (sigma = 0: the data)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs + sigma ** 2 * torch.eye(2, dtype=F64))
        z = torch.randn(n, 2, generator=generator, dtype=F64)
        return self.means[k] + (chol[k] * z[:, None, :]).sum(-1)

    def _noisy_components(self, x: torch.Tensor, sigma: torch.Tensor):
        s2 = append(sigma, 4) ** 2
        noisy = self.covs[None] + s2 * torch.eye(2, dtype=F64, device=x.device)  # (N, K, 2, 2)
        a, b, d = noisy[..., 0, 0], noisy[..., 0, 1], noisy[..., 1, 1]
        det = a * d - b * b
        inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-b, a], -1)], -2) / det[..., None, None]
        r = x[:, None, :] - self.means[None]  # (N, K, 2)
        inv_r = (inv * r[..., None, :]).sum(-1)  # 2x2 products written out: batched matmul is slow here
        log_p = self.weights.log() - 0.5 * (r * inv_r).sum(-1) - 0.5 * det.log() - math.log(2 * math.pi)
        return log_p, inv_r

    def responsibilities(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        return self._noisy_components(x, sigma)[0].softmax(-1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        log_p, inv_r = self._noisy_components(x, sigma)
        # m_k + C_k (C_k + sigma^2 I)^-1 (x - m_k) per component, weighted by the posterior over components.
        per_component = self.means[None] + (self.covs[None] * inv_r[..., None, :]).sum(-1)
        return (log_p.softmax(-1)[..., None] * per_component).sum(1)

    __call__ = denoise


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    # torch.testing.assert_close would import torch.distributed (seconds) on first use.
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), f"max difference {(actual - expected).abs().max()}"


def append(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


GAUSSIAN = GaussianMixture([1.0], [[0.5, -0.3]], [[[1.0, 0.45], [0.45, 0.5]]])
MIXTURE = GaussianMixture(
    [0.5, 0.3, 0.2],
    [[-2.0, 0.5], [2.0, 1.0], [0.5, -2.5]],
    [[[0.3, 0.1], [0.1, 0.15]], [[0.1, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.05]]],
)


def gaussian_flow(data: GaussianMixture, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The exact probability-flow ODE map of a single Gaussian: mu + ((C + s1^2) / (C + s0^2))^(1/2) (x - mu)."""
    eigval, eigvec = torch.linalg.eigh(data.covs[0])
    ratio = ((eigval + sigma_to ** 2) / (eigval + sigma_from ** 2)).sqrt()
    return data.means[0] + ((x - data.means[0]) @ eigvec * ratio) @ eigvec.T


def assert_moments_match(samples: torch.Tensor, data: GaussianMixture, reference: torch.Tensor) -> None:
    """Mean and covariance within Z standard errors; the errors come from a large exact sample ``reference``."""
    n = samples.shape[0]
    centred_ref = reference - reference.mean(0)
    products_ref = centred_ref[:, :, None] * centred_ref[:, None, :]
    mean_se = (data.cov.diagonal() / n).sqrt()
    cov_se = products_ref.std(0) / math.sqrt(n)
    mean_err = (samples.mean(0) - data.mean) / mean_se
    cov_err = (torch.cov(samples.T) - data.cov) / cov_se
    assert mean_err.abs().max() < Z, f"mean off by {mean_err.tolist()} standard errors"
    assert cov_err.abs().max() < Z, f"covariance off by {cov_err.tolist()} standard errors"


# (sampler, sigmas, options): first-order samplers need many steps for their O(1/n) bias to fall under the
# Monte-Carlo error; ancestral ones even more; DDPM runs its whole 1000-step chain.
SAMPLER_CASES = {
    "euler": (karras(200), {}),
    "euler_ancestral": (karras(500), {}),
    "heun": (karras(30), {}),
    "dpmpp_2m": (karras(30), {}),
    "dpmpp_2m_sde": (karras(50), {}),
    "dpmpp_3m_sde": (karras(30), {}),
    "unipc": (karras(15), {}),
    "ddim": (discrete(200), {}),
    "plms": (discrete(25), {}),
    "ddpm": (full_chain_sigmas(), {}),
}


def run_sampler(name: str, data: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    sigmas, options = SAMPLER_CASES[name]
    generator = torch.Generator().manual_seed(seed)
    # Start from the exact noisy marginal at sigmas[0], so that only the sampler's own error is measured (the
    # N(0, sigma_max^2) start of ``sample`` is off by the data's mean / sigma_max, a property of the schedule).
    x = data.sample(n, float(sigmas[0]), generator)
    return get_sampler(name)(data, x, sigmas, generator=generator, disable=True, **options)


def test_registry_names_and_error():
    assert set(SAMPLERS) == {"ddpm", "ddim", "plms", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde",
                             "dpmpp_3m_sde", "unipc"}
    assert get_sampler("heun") is SAMPLERS["heun"]
    with pytest.raises(ValueError, match="dpmpp_2m"):
        get_sampler("dpm++")
    assert get_sampler(SAMPLERS["plms"]) is SAMPLERS["plms"]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("ends_at_zero", [True, False])
def test_registry_declares_the_model_evaluations(name, steps, ends_at_zero):
    spec = get_sampler(name)
    sigmas = karras(steps) if ends_at_zero else karras(steps + 1)[:-1]  # the second ends at sigma_min
    calls = []

    def model(x, sigma):
        calls.append(float(sigma[0]))
        return GAUSSIAN(x, sigma)

    spec(model, torch.randn(4, 2, dtype=F64) * sigmas[0], sigmas, generator=torch.Generator().manual_seed(0),
         disable=True)
    # Heun's last step to 0 is Euler's; PLMS warms up unless its only step goes to 0.
    expected = {"heun": 2 * steps - ends_at_zero, "plms": steps + (steps > 1 or not ends_at_zero)}.get(name, steps)
    assert len(calls) == expected == spec.model_evaluations(steps, ends_at_zero)
    if len(calls) > steps and spec.warmup_steps:  # the warm-up evaluates at the second level within the first step
        assert calls[:2] == pytest.approx([float(sigmas[0]), float(sigmas[1])])


def test_registry_declares_needs_and_scheduler_conventions():
    assert {n for n, s in SAMPLERS.items() if s.levels == "timesteps"} == {"ddpm", "ddim", "plms"}
    assert {n for n, s in SAMPLERS.items() if s.levels == "sigmas"} == {"euler", "euler_ancestral", "heun",
                                                                          "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                                                          "unipc"}
    assert {n for n, s in SAMPLERS.items() if s.evaluations_per_step == 2} == {"heun"}
    assert {n for n, s in SAMPLERS.items() if s.warmup_steps} == {"plms"}
    assert {n for n, s in SAMPLERS.items() if s.ends_at_first_level} == {"ddim", "plms"}
    assert {n for n, s in SAMPLERS.items() if s.spacing_extra_level} == {"dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                                                          "unipc"}
    assert {n for n, s in SAMPLERS.items() if s.ancestral} == {"ddpm", "euler_ancestral", "dpmpp_2m_sde",
                                                                "dpmpp_3m_sde"}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_ancestral_entries_and_only_they_use_the_generator(name):
    spec = get_sampler(name)
    sigmas = karras(4)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64) * sigmas[0]
    generator = torch.Generator().manual_seed(2)
    state = generator.get_state()
    first = spec(GAUSSIAN, x, sigmas, generator=generator, disable=True)
    other = spec(GAUSSIAN, x, sigmas, generator=torch.Generator().manual_seed(3), disable=True)
    assert torch.equal(generator.get_state(), state) != spec.ancestral
    assert torch.equal(first, other) != spec.ancestral


@pytest.mark.parametrize("name", sorted(SAMPLER_CASES))
def test_sampler_matches_gaussian_moments(name):
    reference = GAUSSIAN.sample(100_000, 0.0, torch.Generator().manual_seed(99))
    assert_moments_match(run_sampler(name, GAUSSIAN, 4000, seed=1), GAUSSIAN, reference)


@pytest.mark.parametrize("name", sorted(SAMPLER_CASES))
def test_sampler_matches_mixture_moments_and_weights(name):
    n = 3000
    samples = run_sampler(name, MIXTURE, n, seed=1)
    reference = MIXTURE.sample(100_000, 0.0, torch.Generator().manual_seed(99))
    assert_moments_match(samples, MIXTURE, reference)
    # Components are > 6 standard deviations apart: the most likely component is the one a sample came from.
    counts = torch.bincount(MIXTURE.responsibilities(samples, 0.0).argmax(-1), minlength=3).double()
    weight_se = (MIXTURE.weights * (1 - MIXTURE.weights) / n).sqrt()
    weight_err = (counts / n - MIXTURE.weights) / weight_se
    assert weight_err.abs().max() < Z, f"mixture weights off by {weight_err.tolist()} standard errors"


def test_mixture_denoiser_is_the_posterior_mean():
    # Sanity check of the test's own oracle: E[x0 | x] by Monte Carlo over (x0, x) pairs near a point.
    gen = torch.Generator().manual_seed(3)
    sigma = 1.5
    x0 = MIXTURE.sample(400_000, 0.0, gen)
    x = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=F64)
    near = (x - torch.tensor([0.5, 0.0], dtype=F64)).norm(dim=1) < 0.1
    predicted = MIXTURE(x[near], torch.tensor(sigma, dtype=F64)).mean(0)
    assert torch.allclose(predicted, x0[near].mean(0), atol=6 * x0[near].std(0).max() / near.sum().sqrt())


@pytest.mark.parametrize("name,expected_order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("plms", 2),
                                                 ("unipc", 3)])
def test_deterministic_samplers_converge_at_their_order(name, expected_order):
    # Against the exact ODE solution (to the last nonzero sigma, then the same final denoising step), doubling
    # the number of steps must divide the error by about 2^order; a wrong coefficient drops the order.
    x_start = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    errors = []
    for n in (20, 40):
        sigmas = karras(n)
        x = GAUSSIAN.means[0] + x_start * float(sigmas[0])
        exact = gaussian_flow(GAUSSIAN, x, float(sigmas[0]), float(sigmas[-2]))
        exact = GAUSSIAN(exact, sigmas[-2])
        errors.append((get_sampler(name)(GAUSSIAN, x, sigmas, disable=True) - exact).norm(dim=1).mean())
    assert errors[0] / errors[1] > 2 ** expected_order * 0.8


def test_ddim_eta0_is_deterministic_and_euler():
    sigmas = discrete(20)
    x = GAUSSIAN.sample(500, float(sigmas[0]), torch.Generator().manual_seed(5))
    first, second = sample_ddim(GAUSSIAN, x, sigmas, disable=True), sample_ddim(GAUSSIAN, x, sigmas, disable=True)
    assert torch.equal(first, second)
    assert_close(first, sample_euler(GAUSSIAN, x, sigmas, disable=True), 1e-12)


def test_ddim_eta0_inverts():
    # DDIM inversion: integrate from the data end up to sigma_max with the reversed sigmas, then back down. The
    # two directions evaluate the ODE at different points, so the round trip is exact only as the steps shrink:
    # its error is first order (measured 0.65% of the data's scale at 400 steps, 1.3% at 200).
    errors = []
    for n in (200, 400):
        sigmas = karras(n)[:-1]
        x0 = GAUSSIAN.sample(500, float(sigmas[-1]), torch.Generator().manual_seed(6))
        noise = sample_ddim(GAUSSIAN, x0, sigmas.flip(0), disable=True)
        assert torch.allclose(noise.std(0), (GAUSSIAN.cov.diagonal() + sigmas[0] ** 2).sqrt(), rtol=0.1)
        back = sample_ddim(GAUSSIAN, noise, sigmas, disable=True)
        errors.append((back - x0).norm(dim=1) / x0.std(0).norm())
    assert errors[1].mean() < 0.01 and errors[1].max() < 0.03
    assert 1.6 < errors[0].mean() / errors[1].mean() < 2.4


def test_ddim_eta1_ddpm_and_euler_ancestral_are_one_update():
    # DDIM with eta = 1 is DDPM's posterior step, and both equal k-diffusion's ancestral Euler with eta = 1.
    sigmas = discrete(10)
    x = GAUSSIAN.sample(64, float(sigmas[0]), torch.Generator().manual_seed(7))
    outs = [fn(GAUSSIAN, x, sigmas, generator=torch.Generator().manual_seed(8), disable=True, **kw)
            for fn, kw in [(sample_ddim, {"eta": 1.0}), (sample_ddpm, {}), (sample_euler_ancestral, {"eta": 1.0})]]
    assert_close(outs[0], outs[1], 1e-10)
    assert_close(outs[0], outs[2], 1e-10)


def vp_eps(data: GaussianMixture):
    """The exact noise prediction in the variance-preserving space x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
    def eps(x_t, t):
        a = SCHEDULE.alphas_cumprod[t]
        sigma = SCHEDULE.sigmas[t]
        x = x_t / a.sqrt()
        return (x - data(x, sigma)) / sigma
    return eps


def test_ddpm_is_the_compvis_ancestral_chain():
    # Reference: Ho et al.'s chain in VP space with CompVis's posterior coefficients and fixed_small variance.
    n, seed = 32, 9
    eps = vp_eps(GAUSSIAN)
    betas, ab, ab_prev = SCHEDULE.betas, SCHEDULE.alphas_cumprod, SCHEDULE.alphas_cumprod_prev
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    gen = torch.Generator().manual_seed(seed + 1)
    x = x_T
    for t in reversed(range(SCHEDULE.num_timesteps)):
        x0 = (x - (1 - ab[t]).sqrt() * eps(x, t)) / ab[t].sqrt()
        mean = (betas[t] * ab_prev[t].sqrt() * x0 + (1 - ab_prev[t]) * (1 - betas[t]).sqrt() * x) / (1 - ab[t])
        variance = betas[t] * (1 - ab_prev[t]) / (1 - ab[t])
        x = mean + variance.sqrt() * torch.randn(x.shape, generator=gen, dtype=F64) if t > 0 else mean
    ours = sample_ddpm(GAUSSIAN, x_T / ab[-1].sqrt(), full_chain_sigmas(),
                       generator=torch.Generator().manual_seed(seed + 1), disable=True)
    assert_close(ours, x, 1e-9)


def test_plms_is_the_compvis_plms_sampler():
    # Reference: CompVis's PLMSSampler in VP space (pseudo improved Euler first, then Adams-Bashforth on eps);
    # our sigma list ends in 0, so its last step goes to alphas_cumprod = 1.
    eps = vp_eps(GAUSSIAN)
    sigmas = discrete(12)
    ts = discrete_timesteps(SCHEDULE, sigmas).tolist()
    ab = SCHEDULE.alphas_cumprod

    def ddim_step(x, e, t, a_prev):
        x0 = (x - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e

    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(10), dtype=F64)
    x, old = x_T, []
    for i, t in enumerate(ts):
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=F64)
        e = eps(x, t)
        if not old:
            e_prime = (e + eps(ddim_step(x, e, t, a_prev), ts[i + 1])) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = ddim_step(x, e_prime, t, a_prev)
        old.append(e)
    ours = sample_plms(GAUSSIAN, x_T / ab[ts[0]].sqrt(), sigmas, disable=True)
    assert_close(ours, x, 1e-9)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_seed_same_samples_and_cpu_noise(name):
    sigmas = karras(6)
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(0)
    expected_global = torch.rand(3)
    torch.manual_seed(0)
    first = sample(GAUSSIAN, (16, 2), sigmas, name, generator, dtype=F64, disable=True)
    assert torch.equal(torch.rand(3), expected_global), "the global RNG must not be used when a generator is given"
    second = sample(GAUSSIAN, (16, 2), sigmas, name, torch.Generator().manual_seed(11), dtype=F64, disable=True)
    assert torch.equal(first, second)
    other = sample(GAUSSIAN, (16, 2), sigmas, name, torch.Generator().manual_seed(12), dtype=F64, disable=True)
    assert not torch.equal(first, other)


def test_sample_scales_cpu_noise_for_the_first_sigma():
    sigmas = karras(5)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(13), dtype=F64)
    for prior, scale in [("vp", math.sqrt(1 + float(sigmas[0]) ** 2)), ("ve", float(sigmas[0]))]:
        assert initial_noise_scale(float(sigmas[0]), prior) == pytest.approx(scale)
        expected = sample_euler(GAUSSIAN, noise * scale, sigmas, disable=True)
        got = sample(GAUSSIAN, (8, 2), sigmas, "euler", torch.Generator().manual_seed(13), dtype=F64,
                     prior=prior, disable=True)
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="prior"):
        initial_noise_scale(1.0, "edm")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_and_model_calls(name):
    sigmas = karras(5)
    calls, reports = [], []

    def model(x, sigma, **extra):
        calls.append((sigma.shape, extra))
        return GAUSSIAN(x, sigma)

    x = torch.randn(4, 2, dtype=F64) * sigmas[0]
    get_sampler(name)(model, x, sigmas, extra_args={"tag": 1}, callback=reports.append,
                      generator=torch.Generator().manual_seed(0), disable=True)
    steps = len(sigmas) - 1
    expected_calls = {"heun": 2 * steps - 1, "plms": steps + 1}.get(name, steps)
    assert len(calls) == expected_calls
    assert all(shape == (4,) and extra == {"tag": 1} for shape, extra in calls)
    assert [r["i"] for r in reports] == list(range(steps))
    assert set(reports[0]) == {"i", "x", "sigma", "denoised"}


def test_discrete_sigmas_match_compvis_timesteps():
    sigmas = get_sigmas_discrete(SCHEDULE, 50)  # CompVis DDIM: range(0, 1000, 20) + 1, reversed
    assert sigmas.dtype == torch.float32 and len(sigmas) == 51 and sigmas[-1] == 0
    timesteps = discrete_timesteps(SCHEDULE, sigmas)
    assert timesteps.tolist() == list(range(981, 0, -20))
    assert torch.equal(sigmas[:-1], SCHEDULE.sigmas[timesteps].float())
    assert discrete_timesteps(SCHEDULE, get_sigmas_discrete(SCHEDULE, 50, "trailing")).tolist() == list(
        range(999, 0, -20))
    linspace = discrete_timesteps(SCHEDULE, get_sigmas_discrete(SCHEDULE, 4, "linspace")).tolist()
    assert linspace == [999, 666, 333, 0]
    assert len(get_sigmas_discrete(SCHEDULE, 1000, offset=0)) == 1001
    with pytest.raises(ValueError, match="spacing"):
        get_sigmas_discrete(SCHEDULE, 10, "uniform")


def test_karras_and_exponential_sigmas():
    lo, hi = SCHEDULE.sigma_min, SCHEDULE.sigma_max
    for sigmas in (get_sigmas_karras(10, lo, hi, dtype=F64), get_sigmas_exponential(10, lo, hi, dtype=F64)):
        assert len(sigmas) == 11 and sigmas[0] == hi and sigmas[-2] == lo and sigmas[-1] == 0
        assert (sigmas.diff() < 0).all()
    rho_space = get_sigmas_karras(10, lo, hi, rho=7.0, dtype=F64)[:-1] ** (1 / 7)
    assert_close(rho_space.diff(), rho_space.diff()[:1].expand(9), 1e-9)
    log_space = get_sigmas_exponential(10, lo, hi, dtype=F64)[:-1].log()
    assert_close(log_space.diff(), log_space.diff()[:1].expand(9), 1e-9)
    assert get_sigmas_karras(10, lo, hi)[0] == torch.tensor(hi, dtype=torch.float32)


def test_zero_terminal_snr_schedule_gives_finite_sigmas():
    from latentdiff.diffusion.schedule import ScheduleConfig

    schedule = NoiseSchedule(ScheduleConfig(zero_terminal_snr=True))
    sigmas = get_sigmas_discrete(schedule, 10, "trailing")
    assert torch.isfinite(sigmas).all() and sigmas[0] == pytest.approx(4096, rel=1e-3)



@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_low_precision_x_keeps_its_dtype(name):
    # bfloat16 latents: the sampler's arithmetic stays in x's dtype, sigmas and timesteps stay in float32.
    seen = []

    def model(x, sigma):
        seen.append(sigma.dtype)
        return x * 0.5

    out = sample(model, (2, 4, 3, 3), get_sigmas_discrete(SCHEDULE, 5), name, torch.Generator().manual_seed(0),
                 dtype=torch.bfloat16, disable=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert set(seen) == {torch.float32}
