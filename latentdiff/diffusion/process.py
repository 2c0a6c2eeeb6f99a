"""The discrete diffusion process: forward noising, the Gaussian posterior, the reverse step and the variational bound.

Pure functions over a :class:`~latentdiff.diffusion.schedule.NoiseSchedule`. Timesteps are 0-based as in the
DDPM code: index ``t`` in ``0 .. T-1`` is the paper's step ``t + 1``, so ``q_sample(x0, t=0)`` is one step of
noise and ``x0`` (the data) sits "before" index 0. With ``a_t = alphas_cumprod[t]``:

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps                        (Ho et al. 2020, eq. 4)

References: "DDPM" = Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models";
"IDDPM" = Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models";
"v" = Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models", sec. 4 / app. D.

Schedule tensors are float64 on the CPU; every gathered coefficient is cast to the data's device and dtype, so
the same code serves float32/bf16 training on any device and float64 checks in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latentdiff.diffusion.schedule import NoiseSchedule

PARAMETERIZATIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large")
DECODER_NLLS = ("discretized", "continuous")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def extract(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Gather ``values[t]`` (a CPU schedule tensor) and shape it (N, 1, ..., 1) on x's device and dtype."""
    out = values[t.long().cpu()]
    return out.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def draw_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device in float32, then moved to ``device``/``dtype``.

    Drawing where the generator lives (usually the CPU) is what makes a seed give the same numbers on every
    device; drawing in float32 first makes it give the same numbers for every working dtype.
    """
    if generator is None:
        return torch.randn(tuple(shape), device=device).to(dtype=dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=device if device is not None else generator.device, dtype=dtype)


def posterior_variance(schedule: NoiseSchedule) -> torch.Tensor:
    """beta~_t = beta_t (1 - a_{t-1}) / (1 - a_t) (DDPM eq. 7), float64; it is 0 at t = 0."""
    return schedule.betas * (1 - schedule.alphas_cumprod_prev) / (1 - schedule.alphas_cumprod)


def posterior_log_variance_clipped(schedule: NoiseSchedule) -> torch.Tensor:
    """log beta~_t with beta~_1 in place of beta~_0 = 0, as in the DDPM code, so the log stays finite."""
    var = posterior_variance(schedule)
    if len(var) == 1:
        return torch.full_like(var, -math.inf)
    return torch.cat([var[1:2], var[1:]]).log()


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)


# --------------------------------------------------------------------------------------------------------------
# Forward process q
# --------------------------------------------------------------------------------------------------------------


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) with the given noise (DDPM eq. 4)."""
    return extract(schedule.alphas_cumprod.sqrt(), t, x0) * x0 + extract((1 - schedule.alphas_cumprod).sqrt(),
                                                                         t, x0) * noise


def q_mean_variance(schedule: NoiseSchedule, x0: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and log-variance of q(x_t | x_0) (DDPM eq. 4); variance and log-variance are (N, 1, ...)."""
    a = schedule.alphas_cumprod
    return extract(a.sqrt(), t, x0) * x0, extract(1 - a, t, x0), extract((1 - a).log(), t, x0)


def q_step_sample(schedule: NoiseSchedule, x_prev: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """One forward step x_t ~ q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I) (DDPM eq. 2).

    ``x_prev`` is the sample at index t - 1, or the data itself for t = 0; applying this for t = 0, 1, ..., k
    gives the same marginal as ``q_sample`` at index k.
    """
    return extract(schedule.alphas.sqrt(), t, x_prev) * x_prev + extract(schedule.betas.sqrt(), t, x_prev) * noise


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, xt: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7).

    mu~ = beta_t sqrt(a_{t-1}) / (1 - a_t) x_0 + (1 - a_{t-1}) sqrt(alpha_t) / (1 - a_t) x_t. At t = 0 the
    "previous" sample is the data: the mean is x_0 and the variance 0; the log-variance uses beta~ at index 1
    there (DDPM code), which is what the decoder term's Gaussian uses.
    """
    a, a_prev, betas = schedule.alphas_cumprod, schedule.alphas_cumprod_prev, schedule.betas
    coef_x0 = betas * a_prev.sqrt() / (1 - a)
    coef_xt = (1 - a_prev) * schedule.alphas.sqrt() / (1 - a)
    mean = extract(coef_x0, t, xt) * x0 + extract(coef_xt, t, xt) * xt
    return mean, extract(posterior_variance(schedule), t, xt), extract(posterior_log_variance_clipped(schedule), t, xt)


# --------------------------------------------------------------------------------------------------------------
# Parameterisations: the network predicts eps, x0 or v; each determines the other two given x_t
# --------------------------------------------------------------------------------------------------------------


def x0_from_eps(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (DDPM eq. 4 solved for x_0; undefined where a_t = 0)."""
    a = schedule.alphas_cumprod
    return extract((1 / a).sqrt(), t, xt) * xt - extract((1 / a - 1).sqrt(), t, xt) * eps


def eps_from_x0(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(a_t) x_0) / sqrt(1 - a_t) (DDPM eq. 4 solved for eps)."""
    a = schedule.alphas_cumprod
    return (xt - extract(a.sqrt(), t, xt) * x0) / extract((1 - a).sqrt(), t, xt)


def v_from_x0_eps(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    a = schedule.alphas_cumprod
    return extract(a.sqrt(), t, x0) * eps - extract((1 - a).sqrt(), t, x0) * x0


def x0_from_v(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_0 = sqrt(a_t) x_t - sqrt(1 - a_t) v: x_t and v are a rotation of (x_0, eps), so this is its inverse."""
    a = schedule.alphas_cumprod
    return extract(a.sqrt(), t, xt) * xt - extract((1 - a).sqrt(), t, xt) * v


def eps_from_v(schedule: NoiseSchedule, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(1 - a_t) x_t + sqrt(a_t) v (the other row of the same rotation)."""
    a = schedule.alphas_cumprod
    return extract((1 - a).sqrt(), t, xt) * xt + extract(a.sqrt(), t, xt) * v


def predict_x0_and_eps(schedule: NoiseSchedule, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                       parameterization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a network output under ``parameterization`` in {"eps", "x0", "v"}."""
    _check("parameterization", parameterization, PARAMETERIZATIONS)
    if parameterization == "eps":
        return x0_from_eps(schedule, xt, t, output), output
    if parameterization == "x0":
        return output, eps_from_x0(schedule, xt, t, output)
    return x0_from_v(schedule, xt, t, output), eps_from_v(schedule, xt, t, output)


# --------------------------------------------------------------------------------------------------------------
# Reverse process p
# --------------------------------------------------------------------------------------------------------------


def reverse_log_variance(schedule: NoiseSchedule, variance: str = "fixed_small") -> torch.Tensor:
    """log sigma_t^2 of the fixed reverse variance (float64, per timestep).

    "fixed_small" is beta~_t (the posterior variance, the lower bound on the optimal reverse variance),
    "fixed_large" is beta_t (the upper bound; DDPM sec. 3.2). Both use beta~_1 at t = 0, as DDPM and IDDPM do,
    so the decoder term's Gaussian at t = 0 is the same in both.
    """
    _check("variance", variance, VARIANCES)
    if variance == "fixed_small":
        return posterior_log_variance_clipped(schedule)
    var = posterior_variance(schedule)
    if len(var) == 1:
        return torch.full_like(var, -math.inf)
    return torch.cat([var[1:2], schedule.betas[1:]]).log()


def p_mean_variance(schedule: NoiseSchedule, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                    parameterization: str = "eps", variance: str = "fixed_small",
                    clip_denoised: float | None = None) -> dict[str, torch.Tensor]:
    """The reverse step p(x_{t-1} | x_t) = N(mu~(x0_hat, x_t), sigma_t^2 I) with a fixed variance.

    The mean plugs the predicted x_0 (clamped to [-clip_denoised, clip_denoised] when given, for pixel data in
    [-1, 1]) into the posterior mean (DDPM eq. 7 with x_0 -> x0_hat; equal to eq. 11 for eps-prediction without
    clipping). Returns mean, variance, log_variance (both (N, 1, ...)) and pred_x0.
    """
    pred_x0, _ = predict_x0_and_eps(schedule, output, xt, t, parameterization)
    if clip_denoised is not None:
        pred_x0 = pred_x0.clamp(-clip_denoised, clip_denoised)
    mean, _, _ = q_posterior(schedule, pred_x0, xt, t)
    log_variance = extract(reverse_log_variance(schedule, variance), t, xt)
    return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance, "pred_x0": pred_x0}


def p_sample(schedule: NoiseSchedule, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
             parameterization: str = "eps", generator: torch.Generator | None = None, variance: str = "fixed_small",
             clip_denoised: float | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral step x_{t-1} ~ p(x_{t-1} | x_t) (DDPM algorithm 2). Returns (x_{t-1}, pred_x0).

    No noise is added where t = 0: the mean there is the final sample. Noise comes from ``noise`` when given,
    else from ``generator`` (drawn on the generator's device, then moved to x_t's).
    """
    out = p_mean_variance(schedule, output, xt, t, parameterization, variance, clip_denoised)
    if noise is None:
        noise = draw_noise(xt.shape, generator, xt.device, xt.dtype)
    nonzero = (t != 0).to(device=xt.device, dtype=xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
    return out["mean"] + nonzero * (0.5 * out["log_variance"]).exp() * noise, out["pred_x0"]


# --------------------------------------------------------------------------------------------------------------
# Likelihoods and the variational bound
# --------------------------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor | float, logvar1: torch.Tensor | float, mean2: torch.Tensor | float,
              logvar2: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasts).

    Python numbers take the dtype and device of the first tensor argument (float64 when all are numbers).
    """
    args = (mean1, logvar1, mean2, logvar2)
    like = next((v for v in args if isinstance(v, torch.Tensor)), torch.zeros((), dtype=torch.float64))
    mean1, logvar1, mean2, logvar2 = (v if isinstance(v, torch.Tensor) else torch.as_tensor(
        v, dtype=like.dtype, device=like.device) for v in args)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-density of x under N(means, exp(log_scales)^2), in nats.

    The decoder term for continuous data such as LDM latents: a density, not a probability, so -log p can be
    negative and the resulting bits/dim depend on the data's scale; compare them only between models on the
    same latents (and the same latent scale factor), never with pixel-space bits/dim.
    """
    return -0.5 * math.log(2 * math.pi) - log_scales - 0.5 * ((x - means) * torch.exp(-log_scales)) ** 2


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability of 8-bit data x in [-1, 1] under a Gaussian integrated over its bin.

    DDPM sec. 3.3, eq. 13: 256 bins of width 2/255 centred on the data values; the first and last bins extend
    to -inf and +inf, so the probabilities of all 256 values sum to 1. Returns nats. Uses the exact normal CDF
    (log_ndtr in the open-ended bins) and, inside, subtracts CDFs on the side of the mean where they are small,
    so neither tail loses precision; a bin probability is floored at 1e-12 as in the DDPM code.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    # Phi(b) - Phi(a) equals Phi(-a) - Phi(-b); take the form whose terms are both small (far tail) to avoid
    # cancellation when the bin lies far from the mean.
    right_of_mean = lower > 0
    delta = torch.where(right_of_mean, torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
                        torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_delta = delta.clamp_min(1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_delta))


def prior_bpd(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per sample, in bits/dim (DDPM eq. 5, first term)."""
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean, _, log_variance = q_mean_variance(schedule, x0, t)
    return _mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)


def vlb_terms(schedule: NoiseSchedule, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
              parameterization: str = "eps", variance: str = "fixed_small", clip_denoised: float | None = None,
              decoder_nll: str = "discretized") -> dict[str, torch.Tensor]:
    """One term of the bound per sample, in bits/dim, at timestep index t (DDPM eq. 5; IDDPM eqs. 4-6).

    For t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); for t = 0: the decoder NLL
    -log p(x_0 | x_1), with p's Gaussian at t = 0 (mean pred_x0, variance beta~_1) either integrated over 8-bit
    bins ("discretized", pixel data in [-1, 1]) or as a density ("continuous", latents). Terms are averaged
    over the non-batch dimensions and divided by log 2. ``model_fn(x_t, t)`` returns the network output.

    Returns ``vlb`` (N,), ``pred_x0`` and ``pred_eps`` (the model's predictions at this x_t).
    """
    _check("decoder_nll", decoder_nll, DECODER_NLLS)
    xt = q_sample(schedule, x0, t, noise)
    output = model_fn(xt, t)
    true_mean, _, true_log_variance = q_posterior(schedule, x0, xt, t)
    out = p_mean_variance(schedule, output, xt, t, parameterization, variance, clip_denoised)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
    likelihood = discretized_gaussian_log_likelihood if decoder_nll == "discretized" else gaussian_log_likelihood
    decoder = -_mean_flat(likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
    vlb = torch.where(t.to(kl.device) == 0, decoder, kl)
    _, pred_eps = predict_x0_and_eps(schedule, output, xt, t, parameterization)
    return {"vlb": vlb, "pred_x0": out["pred_x0"], "pred_eps": pred_eps}


@torch.no_grad()
def estimate_bpd(schedule: NoiseSchedule, model_fn: ModelFn, x0: torch.Tensor, timesteps: str | int = "all",
                 generator: torch.Generator | None = None, parameterization: str = "eps",
                 variance: str = "fixed_small", clip_denoised: float | None = None,
                 decoder_nll: str = "discretized") -> dict[str, torch.Tensor]:
    """The variational bound -log p(x_0) <= L_T + sum_{t=1}^{T} L_{t-1} per sample, in bits/dim (DDPM eq. 5).

    ``timesteps="all"`` evaluates every one of the T terms (IDDPM's ``calc_bpd_loop``), one fresh noise draw
    per term. ``timesteps=k`` instead draws k timestep indices per sample uniformly with replacement and uses
    T * mean(sampled terms), which is an unbiased estimate of the sum over all T terms (each term enters with
    probability 1/T per draw); its standard error T * std(sampled terms) / sqrt(k) (needs k >= 2) covers both
    the choice of timesteps and the noise. With "all" there is no timestep sampling, so ``stderr`` is 0; the
    noise is still one Monte-Carlo draw per term in both modes, so average over many samples for a data-set
    value. Both modes draw all noise and timesteps from ``generator``.

    Returns per sample (N,): ``total_bpd`` (terms + prior), ``vlb_bpd`` (the timestep sum or its estimate),
    ``prior_bpd``, ``stderr``; and ``terms`` (N, T or k) with the matching ``timesteps`` (N, T or k), plus the
    squared errors of the predicted x_0 and eps per term, ``x0_mse`` and ``eps_mse``.
    """
    n, num_t = x0.shape[0], schedule.num_timesteps
    if timesteps == "all":
        ts = torch.arange(num_t, device=x0.device).expand(n, num_t)
    elif isinstance(timesteps, int) and not isinstance(timesteps, bool) and timesteps > 0:
        gen_device = generator.device if generator is not None else None
        ts = torch.randint(0, num_t, (n, timesteps), generator=generator, device=gen_device).to(x0.device)
    else:
        raise ValueError(f"timesteps must be 'all' or a positive int, got {timesteps!r}")
    terms, x0_mse, eps_mse = [], [], []
    for j in range(ts.shape[1]):
        t = ts[:, j].contiguous()
        noise = draw_noise(x0.shape, generator, x0.device, x0.dtype)
        out = vlb_terms(schedule, model_fn, x0, t, noise, parameterization, variance, clip_denoised, decoder_nll)
        terms.append(out["vlb"])
        x0_mse.append(_mean_flat((out["pred_x0"] - x0) ** 2))
        eps_mse.append(_mean_flat((out["pred_eps"] - noise) ** 2))
    terms_t = torch.stack(terms, dim=1)
    prior = prior_bpd(schedule, x0)
    if timesteps == "all":
        vlb = terms_t.sum(dim=1)
        stderr = torch.zeros_like(vlb)
    else:
        vlb = num_t * terms_t.mean(dim=1)
        k = terms_t.shape[1]
        stderr = num_t * terms_t.std(dim=1) / math.sqrt(k) if k > 1 else torch.full_like(vlb, math.nan)
    return {"total_bpd": vlb + prior, "vlb_bpd": vlb, "prior_bpd": prior, "stderr": stderr, "terms": terms_t,
            "timesteps": ts, "x0_mse": torch.stack(x0_mse, dim=1), "eps_mse": torch.stack(eps_mse, dim=1)}
