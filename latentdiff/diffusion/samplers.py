"""Samplers: pure functions that integrate from noise to data over a denoiser D(x, sigma) -> x0.

Every sampler works in the variance-exploding space x = x0 + sigma * eps (``x_t / sqrt(alphas_cumprod[t])``
for a discrete schedule) and has one signature, after k-diffusion::

    sample_NAME(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, **options) -> x0

``model(x, sigma, **extra_args)`` returns the denoised estimate, with ``sigma`` of shape (N,); ``x`` is the
initial noise already scaled for ``sigmas[0]``; ``sigmas`` decreases and ends in 0. Stochastic samplers draw
their noise from ``generator`` on the generator's own device (the CPU, by the project's policy) and move it
to ``x``'s device, so a seed gives the same samples on any device and thread count.

The discrete-time samplers of CompVis (DDPM, DDIM, PLMS) become short sigma-space updates once one notes
alphas_cumprod = 1 / (1 + sigma^2); each docstring gives the correspondence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import trange

from latentdiff.diffusion.denoiser import to_d
from latentdiff.diffusion.schedule import NoiseSchedule

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]

# alphas_cumprod floor that keeps the first sigma of a zero-terminal-SNR schedule finite (as diffusers does).
_ZERO_SNR_ALPHA_BAR = 2.0 ** -24


# ------------------------------------------------------------------------------------------------ sigma schedules

def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_discrete(schedule: NoiseSchedule, n: int, spacing: str = "leading", offset: int = 1,
                        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                        ) -> torch.Tensor:
    """The sigmas of ``n`` of the schedule's own timesteps, decreasing, with a final 0.

    These are the timesteps that DDIM/PLMS visit in CompVis and diffusers:
    "leading": ``arange(n) * (T // n) + offset`` (CompVis DDIM's ``range(0, T, T // n) + 1`` when n divides T;
    like diffusers this always gives n steps); "trailing": ``round(arange(T, 0, -T / n)) - 1`` (Lin et al. 2023,
    starts at the last timestep); "linspace": ``round(linspace(0, T - 1, n))``. ``offset`` applies to "leading"
    only. An infinite sigma (zero terminal SNR) is replaced by the sigma of alphas_cumprod = 2^-24.
    The final 0 makes the last step return the denoised estimate; CompVis's DDIM/PLMS stop one step short, at
    alphas_cumprod[0] (sigma = 0.029 for SD), and return that slightly noisy x.
    """
    T = schedule.num_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"n must be in [1, {T}], got {n}")
    if spacing == "leading":
        timesteps = torch.arange(n, dtype=torch.float64) * (T // n) + offset
    elif spacing == "trailing":
        timesteps = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
    elif spacing == "linspace":
        timesteps = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose leading, trailing or linspace")
    timesteps = timesteps.long().clamp(0, T - 1).unique().flip(0)
    sigma_cap = math.sqrt((1 - _ZERO_SNR_ALPHA_BAR) / _ZERO_SNR_ALPHA_BAR)
    sigmas = schedule.sigmas[timesteps].clamp(max=sigma_cap)
    return _append_zero(sigmas).to(device=device, dtype=dtype)


def discrete_timesteps(schedule: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """The integer timesteps of the nonzero ``sigmas`` (the inverse of ``get_sigmas_discrete``)."""
    return schedule.sigma_to_t(sigmas[sigmas > 0].double()).round().long()


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Karras et al. 2022 (eq. 5): n sigmas evenly spaced in sigma^(1/rho), from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact endpoints despite the rho-th power round trip
    return _append_zero(sigmas).to(device=device, dtype=dtype)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """n sigmas evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return _append_zero(sigmas).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ helpers

def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn on the generator's device then moved to x's."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _setup(x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    # Sigmas stay in at least float32 even for a float16 x: small sigmas and their ratios need the precision.
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least two values")
    return sigmas, sigmas.new_ones(x.shape[0]), extra_args or {}


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then fresh noise of std sigma_up.

    sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 is DDIM's sigma_t(eta)^2 / alphas_cumprod_prev
    (Song et al. 2021, eq. 16) written with alphas_cumprod = 1 / (1 + sigma^2), and
    sigma_down^2 + sigma_up^2 = sigma_next^2.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, sigma_next * 0
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).sqrt())
    return (sigma_next ** 2 - sigma_up ** 2).sqrt(), sigma_up


# ------------------------------------------------------------------------------------------------ samplers

@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, generator: torch.Generator | None = None,
                 disable: bool | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1)."""
    sigmas, s_in, extra_args = _setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, generator: torch.Generator | None = None,
                           disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler to sigma_down, then add noise back up to sigma_next (see ``ancestral_step``); eta = 0 is Euler."""
    sigmas, s_in, extra_args = _setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigma_up > 0:
            x = x + _noise_like(x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: torch.Generator | None = None,
                disable: bool | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1, deterministic); Euler on the last step to sigma = 0."""
    sigmas, s_in, extra_args = _setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:  # the corrector would divide by sigma = 0
            x = x_euler
            continue
        d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next * s_in, **extra_args))
        x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, generator: torch.Generator | None = None,
                    disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), in lambda = -log sigma.

    The exact solution of the ODE with D held constant over a step is x_next = (s_next / s) x + (1 - s_next / s) D;
    the multistep variant replaces D by a linear extrapolation through the previous step's denoised estimate,
    D + (D - D_prev) / (2r) with r = h_prev / h. The first step and the final step to sigma = 0 are first order.
    """
    sigmas, s_in, extra_args = _setup(x, sigmas, extra_args)
    denoised_prev = None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        d_hat = denoised
        if denoised_prev is not None and sigma_next > 0:
            r = (sigmas[i - 1] / sigma).log() / (sigma / sigma_next).log()
            d_hat = denoised + (denoised - denoised_prev) / (2 * r)
        ratio = sigma_next / sigma
        x = ratio * x + (1 - ratio) * d_hat
        denoised_prev = denoised
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: torch.Generator | None = None,
                disable: bool | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma space.

    With a = alphas_cumprod = 1 / (1 + sigma^2), DDIM's x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s_t^2) eps
    + s_t z, divided by sqrt(a_prev), is x_prev = x0 + sqrt(sigma_next^2 - (s_t / sqrt(a_prev))^2) eps
    + (s_t / sqrt(a_prev)) z with s_t = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev) (eq. 16). eta = 0
    is deterministic and the same update as Euler; eta = 1 is DDPM's posterior (``sample_ddpm``). Any sigma
    sequence works, including an increasing one with eta = 0 (DDIM inversion).
    """
    sigmas, s_in, extra_args = _setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        eps = to_d(x, sigma, denoised)
        a, a_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        if eta > 0 and sigma_next > 0:
            s_t = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            noise_std = s_t / a_prev.sqrt()
            x = denoised + (sigma_next ** 2 - noise_std ** 2).clamp_min(0).sqrt() * eps
            x = x + noise_std * _noise_like(x, generator)
        else:
            x = denoised + sigma_next * eps
    return x


@torch.no_grad()
def sample_plms(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: torch.Generator | None = None,
                disable: bool | None = None) -> torch.Tensor:
    """Pseudo linear multistep (PNDM, Liu et al. 2022) as in CompVis's PLMSSampler, in sigma space.

    The DDIM update x_next = x + (sigma_next - sigma) eps is taken with an Adams-Bashforth combination of the
    current and previous eps estimates (orders 2, 3, 4 as history accumulates). The first step has no history:
    it uses the pseudo improved Euler step, the mean of eps here and eps after a plain DDIM step (one extra
    network call).
    """
    sigmas, s_in, extra_args = _setup(x, sigmas, extra_args)
    eps_history: list[torch.Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = to_d(x, sigma, model(x, sigma * s_in, **extra_args))
        if not eps_history and sigma_next > 0:
            x_ddim = x + (sigma_next - sigma) * eps
            eps_prime = (eps + to_d(x_ddim, sigma_next, model(x_ddim, sigma_next * s_in, **extra_args))) / 2
        elif not eps_history:
            eps_prime = eps
        elif len(eps_history) == 1:
            eps_prime = (3 * eps - eps_history[-1]) / 2
        elif len(eps_history) == 2:
            eps_prime = (23 * eps - 16 * eps_history[-1] + 5 * eps_history[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * eps_history[-1] + 37 * eps_history[-2] - 9 * eps_history[-3]) / 24
        _report(callback, i, x, sigma, x - sigma.to(x.dtype) * eps_prime)
        x = x + (sigma_next - sigma) * eps_prime
        eps_history = (eps_history + [eps])[-3:]
    return x


@torch.no_grad()
def sample_ddpm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: torch.Generator | None = None,
                disable: bool | None = None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x, x0 = D(x)) (Ho et al. 2020, eqs. 6-7), fixed_small.

    Between the steps of ``sigmas`` the posterior has beta = 1 - a / a_prev, mean
    sqrt(a_prev) beta / (1 - a) x0 + sqrt(1 - beta) (1 - a_prev) / (1 - a) x_t and variance
    beta (1 - a_prev) / (1 - a). Dividing by sqrt(a_prev), with a = 1 / (1 + sigma^2), it becomes
    x_prev = x0 + (sigma_next^2 / sigma^2) (x - x0) + sigma_next sqrt(1 - sigma_next^2 / sigma^2) z.
    With ``sigmas`` all of a schedule's sigmas (and 0) this is exactly DDPM's T-step chain, whose last step
    (t = 0, variance 0) returns the posterior mean, i.e. x0. No clipping of x0 (latents are unbounded).
    """
    sigmas, s_in, extra_args = _setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, denoised)
        keep = sigma_next ** 2 / sigma ** 2
        x = denoised + keep * (x - denoised)
        if sigma_next > 0:
            x = x + sigma_next * (1 - keep).sqrt() * _noise_like(x, generator)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function registered as ``name``."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def initial_noise_scale(sigma_max: float, prior: str = "vp") -> float:
    """The standard deviation of the starting noise at ``sigma_max``.

    "vp": sqrt(1 + sigma_max^2), the VE image of x_T ~ N(0, I) (x = x_T / sqrt(alphas_cumprod)), which is how
    CompVis's DDPM/DDIM/PLMS start, and the exact marginal std at sigma_max of data with unit variance
    (sigma_data = 1, as the scalings assume). "ve": sigma_max, k-diffusion's choice (ignores the data's variance).
    For SD's sigma_max = 14.61 the two differ by 0.2%.
    """
    if prior == "vp":
        return math.sqrt(1 + sigma_max ** 2)
    if prior == "ve":
        return sigma_max
    raise ValueError(f"unknown prior {prior!r}; choose vp or ve")


def sample(model: Denoiser, shape: tuple[int, ...] | torch.Size, sigmas: torch.Tensor,
           sampler: str | Callable[..., torch.Tensor] = "euler", generator: torch.Generator | None = None,
           extra_args: dict | None = None, device: torch.device | str | None = None,
           dtype: torch.dtype = torch.float32, prior: str = "vp", callback: Callback | None = None,
           disable: bool | None = None, **sampler_options: Any) -> torch.Tensor:
    """Draw starting noise of ``shape`` and run ``sampler`` over ``sigmas`` on ``device``.

    The noise comes from ``generator`` on its own device (create it on the CPU: a seed then gives the same
    sample on any device and thread count; without one, torch's global CPU generator is used) and is scaled by
    ``initial_noise_scale(sigmas[0], prior)``; the default "vp" matches CompVis's x_T ~ N(0, I).
    """
    sampler_fn = get_sampler(sampler) if isinstance(sampler, str) else sampler
    device = torch.device(device) if device is not None else torch.device("cpu")
    noise_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=noise_device, dtype=dtype).to(device)
    sigma_max = float(sigmas[0])
    if not math.isfinite(sigma_max):
        raise ValueError("sigmas[0] is infinite; sigma-space samplers need a finite starting sigma")
    x = noise * initial_noise_scale(sigma_max, prior)
    return sampler_fn(model, x, sigmas, extra_args=extra_args, callback=callback, generator=generator,
                      disable=disable, **sampler_options)
