"""Samplers: pure functions that integrate from noise to data over a denoiser D(x, sigma) -> x0.

Every sampler works in the variance-exploding space x = x0 + sigma * eps (``x_t / sqrt(alphas_cumprod[t])``
for a discrete schedule) and has one signature, after k-diffusion::

    sample_NAME(model, x, sigmas, extra_args=None, callback=None, generator=None, disable=None, **options) -> x0

``model(x, sigma, **extra_args)`` returns the denoised estimate, with ``sigma`` of shape (N,); ``x`` is the
initial noise already scaled for ``sigmas[0]``; ``sigmas`` decreases and ends in 0. Stochastic samplers draw
their noise from ``generator`` on the generator's own device (the CPU, by the project's policy) and move it
to ``x``'s device, so a seed gives the same samples on any device and thread count.

The discrete-time samplers of CompVis (DDPM, DDIM, PLMS) become short sigma-space updates once one notes
alphas_cumprod = 1 / (1 + sigma^2); each docstring gives the correspondence. The multistep solvers A1111 and
diffusers users know by name (DPM++ 2M SDE, DPM++ 3M SDE, UniPC) live in ``latentdiff.diffusion.solvers``, and
what all samplers share (set-up, the reported model call, the generator's noise) in
``latentdiff.diffusion.sampler_steps``.

``SAMPLERS`` registers each function with what it needs (``SamplerSpec``): the noise levels it takes, its model
evaluations per step, warm-up, ancestral noise, and the scheduler conventions diffusers applies to it. Code outside
this module asks a spec, never a sampler's name. The noise levels come from ``latentdiff.diffusion.noise_levels``;
``latentdiff.diffusion.sampling`` is the one loop that runs a sampler for the models and pipelines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import trange

from latentdiff.diffusion.denoiser import to_d
from latentdiff.diffusion.sampler_steps import Callback, Denoiser, evaluate, noise_like, report, setup
from latentdiff.diffusion.solvers import sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_unipc

# ------------------------------------------------------------------------------------------------ helpers

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
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1).

    It is the ancestral sampler with eta = 0: sigma_down is then sigma_next and no noise is added.
    """
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, generator, disable, eta=0.0)


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, generator: torch.Generator | None = None,
                           disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Euler to sigma_down, then add noise back up to sigma_next (see ``ancestral_step``); eta = 0 is Euler."""
    sigmas, s_in, extra_args = setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = evaluate(model, x, sigmas[i], s_in, extra_args, callback, i)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigma_up > 0:
            x = x + noise_like(x, generator) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: torch.Generator | None = None,
                disable: bool | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1, deterministic); Euler on the last step to sigma = 0."""
    sigmas, s_in, extra_args = setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = evaluate(model, x, sigma, s_in, extra_args, callback, i)
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
    sigmas, s_in, extra_args = setup(x, sigmas, extra_args)
    denoised_prev = None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = evaluate(model, x, sigma, s_in, extra_args, callback, i)
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
                disable: bool | None = None, eta: float = 0.0,
                landing_sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) in sigma space.

    With a = alphas_cumprod = 1 / (1 + sigma^2), DDIM's x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s_t^2) eps
    + s_t z, divided by sqrt(a_prev), is x_prev = x0 + sqrt(sigma_next^2 - (s_t / sqrt(a_prev))^2) eps
    + (s_t / sqrt(a_prev)) z with s_t = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev) (eq. 16). eta = 0
    is deterministic and the same update as Euler; eta = 1 is DDPM's posterior (``sample_ddpm``). Any sigma
    sequence works, including an increasing one with eta = 0 (DDIM inversion).

    ``landing_sigmas``: where each step lands instead of the next level; the latent is then passed on as the next
    level (diffusers' DDIM always steps by T // n timesteps, which with "linspace" spacing falls between the
    timesteps it lists).
    """
    sigmas, s_in, extra_args = setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, listed = sigmas[i], sigmas[i + 1]
        sigma_next = listed if landing_sigmas is None else landing_sigmas[i].to(sigmas)
        denoised = evaluate(model, x, sigma, s_in, extra_args, callback, i)
        eps = to_d(x, sigma, denoised)
        a, a_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        if eta > 0 and sigma_next > 0:
            s_t = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
            noise_std = s_t / a_prev.sqrt()
            x = denoised + (sigma_next ** 2 - noise_std ** 2).clamp_min(0).sqrt() * eps
            x = x + noise_std * noise_like(x, generator)
        else:
            x = denoised + sigma_next * eps
        if landing_sigmas is not None:
            x = _relabelled(x, sigma_next, listed)
    return x


@torch.no_grad()
def sample_plms(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, generator: torch.Generator | None = None,
                disable: bool | None = None, diffusers_plan: torch.Tensor | None = None) -> torch.Tensor:
    """Pseudo linear multistep (PNDM, Liu et al. 2022) as in CompVis's PLMSSampler, in sigma space.

    The DDIM update x_next = x + (sigma_next - sigma) eps is taken with an Adams-Bashforth combination of the
    current and previous eps estimates (orders 2, 3, 4 as history accumulates). The first step has no history:
    it uses the pseudo improved Euler step, the mean of eps here and eps after a plain DDIM step (one extra
    network call).

    ``diffusers_plan``: run diffusers' PNDM call by call instead (``_sample_diffusers_pndm``), one row per network
    call; its img2img/inpainting at strength < 1 and its "linspace" spacing visit levels this loop does not.
    """
    sigmas, s_in, extra_args = setup(x, sigmas, extra_args)
    if diffusers_plan is not None:
        return _sample_diffusers_pndm(model, x, sigmas, s_in, extra_args, diffusers_plan.to(sigmas), callback, disable)
    eps_history: list[torch.Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = to_d(x, sigma, model(x, sigma * s_in, **extra_args))
        if not eps_history and sigma_next > 0:
            x_ddim = x + (sigma_next - sigma) * eps
            eps_prime = (eps + to_d(x_ddim, sigma_next, model(x_ddim, sigma_next * s_in, **extra_args))) / 2
        else:
            eps_prime = _adams_bashforth([*eps_history, eps])
        report(callback, i, x, sigma, x - sigma.to(x.dtype) * eps_prime)
        x = x + (sigma_next - sigma) * eps_prime
        eps_history = (eps_history + [eps])[-3:]
    return x


def _relabelled(x: torch.Tensor, sigma: torch.Tensor, as_sigma: torch.Tensor | float) -> torch.Tensor:
    """The latent ``x`` holds at ``sigma`` (VE form), in the VE form of level ``as_sigma``: the same VP latent."""
    as_sigma = torch.as_tensor(as_sigma, dtype=sigma.dtype, device=sigma.device)
    return x * ((1 + as_sigma ** 2) / (1 + sigma ** 2)).sqrt().to(x.dtype)


def _adams_bashforth(history: list[torch.Tensor]) -> torch.Tensor:
    """PLMS' combination of the last 1-4 eps estimates (oldest first, the current one last)."""
    e = history[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def _sample_diffusers_pndm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, s_in: torch.Tensor,
                           extra_args: dict, plan: torch.Tensor, callback: Callback | None,
                           disable: bool | None) -> torch.Tensor:
    """diffusers' ``PNDMScheduler.step_plms``, one ``plan`` row (label, from, to sigma) per network call.

    Call c evaluates the current latent at its label. Call 0 steps it from ``from`` to ``to`` with that eps and
    keeps it; call 1 steps the kept latent with the mean of both eps (the warm-up); later calls step the current
    latent with the Adams-Bashforth mix of the last four. A latent is always the same VP latent, passed between
    levels in VE form (``_relabelled``): where diffusers' labels and steps disagree, so do ours, alike.
    """
    at, history = sigmas[0], []
    kept, kept_at = x, at
    for c in trange(len(plan), disable=disable):
        label, start, end = plan[c]
        x_in = _relabelled(x, at, label)
        eps = to_d(x_in, label, evaluate(model, x_in, label, s_in, extra_args, callback, c))
        if c == 0:
            history, kept, kept_at, base, base_at, mix = [eps], x, at, x, at, eps
        elif c == 1:
            base, base_at, mix = kept, kept_at, (eps + history[-1]) / 2
        else:
            history = (history + [eps])[-4:]
            base, base_at, mix = x, at, _adams_bashforth(history)
        x, at = _relabelled(base, base_at, start) + (end - start) * mix, end
    return _relabelled(x, at, sigmas[-1])


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
    sigmas, s_in, extra_args = setup(x, sigmas, extra_args)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = evaluate(model, x, sigma, s_in, extra_args, callback, i)
        keep = sigma_next ** 2 / sigma ** 2
        x = denoised + keep * (x - denoised)
        if sigma_next > 0:
            x = x + sigma_next * (1 - keep).sqrt() * noise_like(x, generator)
    return x


# ------------------------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function and what it needs from the schedule and the caller.

    ``levels``: "sigmas" for samplers of the probability-flow ODE that take any decreasing sigmas (a Karras or
    exponential ramp as well as the schedule's own), "timesteps" for the discrete-time samplers derived for the
    schedule's own timesteps (DDPM, DDIM, PLMS; diffusers' schedulers for them take no other sigmas).
    ``evaluations_per_step``: denoiser calls per step (Heun's corrector makes 2; its last step to sigma 0 is
    Euler's). ``warmup_steps``: extra calls at the start (PLMS's pseudo improved Euler step). ``ancestral``: adds
    fresh noise from the generator at every step. ``ends_at_first_level``: in diffusers' scheduler conventions the
    last step lands on alphas_cumprod[0] rather than sigma 0 (DDIM and PLMS with ``set_alpha_to_one=False``).
    ``spacing_extra_level``: diffusers spaces its timesteps as ``n + 1`` levels and drops the lowest
    (``DPMSolverMultistepScheduler`` for "leading" and "linspace" spacing). ``default_spacing``: the
    ``timestep_spacing`` of diffusers' scheduler class when its config has none (the hub's SD 1.5 config has none).
    ``fractional_timesteps``: diffusers' scheduler is a sigma scheduler (Euler, Heun) that keeps fractional timesteps
    (unrounded "linspace", Karras ramps) and feeds them to the UNet as they are, and starts from noise of std
    sigma_max with "linspace" or "trailing" spacing.
    """

    name: str
    function: Callable[..., torch.Tensor]
    levels: str = "sigmas"
    evaluations_per_step: int = 1
    warmup_steps: int = 0
    ancestral: bool = False
    ends_at_first_level: bool = False
    spacing_extra_level: bool = False
    default_spacing: str = "linspace"
    fractional_timesteps: bool = False

    def __call__(self, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Run the sampler: ``function(model, x, sigmas, extra_args=..., callback=..., generator=...)``."""
        return self.function(model, x, sigmas, **kwargs)

    def model_evaluations(self, steps: int, ends_at_zero: bool = True) -> int:
        """Denoiser calls for ``steps`` steps (for progress and cost): a last step to sigma 0 makes one call, and a
        one-step run has no warm-up (it has no next level to warm up towards)."""
        calls = steps * self.evaluations_per_step + (self.warmup_steps if steps > 1 or not ends_at_zero else 0)
        return calls - (self.evaluations_per_step - 1 if ends_at_zero else 0)


def _registry(*specs: SamplerSpec) -> dict[str, SamplerSpec]:
    return {spec.name: spec for spec in specs}


SAMPLERS: dict[str, SamplerSpec] = _registry(
    SamplerSpec("ddpm", sample_ddpm, levels="timesteps", ancestral=True, default_spacing="leading"),
    SamplerSpec("ddim", sample_ddim, levels="timesteps", ends_at_first_level=True, default_spacing="leading"),
    SamplerSpec("plms", sample_plms, levels="timesteps", warmup_steps=1, ends_at_first_level=True,
                default_spacing="leading"),
    SamplerSpec("euler", sample_euler, fractional_timesteps=True),
    SamplerSpec("euler_ancestral", sample_euler_ancestral, ancestral=True, fractional_timesteps=True),
    SamplerSpec("heun", sample_heun, evaluations_per_step=2, fractional_timesteps=True),
    SamplerSpec("dpmpp_2m", sample_dpmpp_2m, spacing_extra_level=True),
    # latentdiff.diffusion.solvers; their levels are diffusers' DPM-Solver / UniPC schedulers'
    SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, ancestral=True, spacing_extra_level=True),
    SamplerSpec("dpmpp_3m_sde", sample_dpmpp_3m_sde, ancestral=True, spacing_extra_level=True),
    SamplerSpec("unipc", sample_unipc, spacing_extra_level=True),
)

# AUTOMATIC1111's sampler names (its k-diffusion and CompVis samplers that we have), with the sigma ramp the name
# implies; matched without regard to case.
SAMPLER_ALIASES: dict[str, tuple[str, str | None]] = {
    "Euler a": ("euler_ancestral", None), "Euler": ("euler", None), "Heun": ("heun", None),
    "DPM++ 2M": ("dpmpp_2m", None), "DPM++ 2M Karras": ("dpmpp_2m", "karras"), "DDIM": ("ddim", None),
    "PLMS": ("plms", None), "DPM++ 2M SDE": ("dpmpp_2m_sde", None), "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 2M SDE Exponential": ("dpmpp_2m_sde", "exponential"), "DPM++ 3M SDE": ("dpmpp_3m_sde", None),
    "DPM++ 3M SDE Karras": ("dpmpp_3m_sde", "karras"), "DPM++ 3M SDE Exponential": ("dpmpp_3m_sde", "exponential"),
    "UniPC": ("unipc", None),
}
_ALIASES_LOWER = {alias.lower(): target for alias, target in SAMPLER_ALIASES.items()}


def resolve_sampler(sampler: str | SamplerSpec) -> tuple[SamplerSpec, str | None]:
    """(spec, sigma ramp) of a registered name, an A1111 name ("DPM++ 2M Karras": dpmpp_2m with Karras sigmas) or a
    spec; a ValueError names the choices."""
    if isinstance(sampler, SamplerSpec):
        return sampler, None
    if sampler in SAMPLERS:
        return SAMPLERS[sampler], None
    if sampler.lower() in _ALIASES_LOWER:
        name, ramp = _ALIASES_LOWER[sampler.lower()]
        return SAMPLERS[name], ramp
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)} (or an AUTOMATIC1111 name: "
                     f"{', '.join(SAMPLER_ALIASES)})")


def get_sampler(sampler: str | SamplerSpec) -> SamplerSpec:
    """The sampler registered as ``sampler`` or named so by A1111 (a spec is returned as it is); a ValueError names
    the choices. ``resolve_sampler`` also gives the sigma ramp an A1111 name implies."""
    return resolve_sampler(sampler)[0]


__all__ = ["SAMPLERS", "SAMPLER_ALIASES", "SamplerSpec", "ancestral_step", "get_sampler", "resolve_sampler",
           "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde",
           "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_plms", "sample_unipc"]
