"""The noise levels a sampler visits: timestep spacing, the schedule's sigmas, Karras / exponential ramps, strength.

A run of ``n`` steps over a discrete schedule of T training timesteps visits ``n`` of them (``spaced_timesteps``),
as diffusers' ``timestep_spacing`` names the choices. For T = 1000:

- "leading" ``arange(n) * (T // n) + offset``: 10 steps with SD's ``steps_offset=1`` give 901, 801, ..., 1
  (CompVis' DDIM ``range(0, T, T // n) + 1``);
- "linspace" ``round(linspace(0, T - 1, n))``: 999, 888, 777, ..., 111, 0;
- "trailing" ``round(arange(T, 0, -T / n)) - 1`` (Lin et al. 2023, starts from pure noise): 999, 899, ..., 99.

DPM-Solver (``DPMSolverMultistepScheduler``) spaces "leading" and "linspace" over ``n + 1`` levels and drops the
lowest: 901, 811, ..., 91. The sigma of timestep t is sqrt((1 - a_t) / a_t) with a = alphas_cumprod.

Stable Diffusion's schedulers (diffusers, ``scheduler_config.json``: leading spacing, ``steps_offset=1``,
``set_alpha_to_one=False``) also differ in where the last step lands: DDIM and PLMS step from timestep 1 to
alphas_cumprod[0] (sigma = 0.029 for SD) and return that slightly noisy latent, as CompVis' samplers do; the others
step to sigma = 0 (DPM-Solver's ``final_sigmas_type="zero"``, whose last step is then first order, as
``sample_dpmpp_2m``'s). ``sampler_sigmas`` gives these levels from what the sampler's registry entry declares.

img2img and inpainting at ``strength`` < 1 start part way (``apply_strength``): as diffusers' ``get_timesteps``,
``n - min(int(n * strength), n)`` levels are skipped.
"""

from __future__ import annotations

import math

import torch

from latentdiff.diffusion.samplers import SamplerSpec, get_sampler
from latentdiff.diffusion.schedule import NoiseSchedule

SPACINGS = ("leading", "linspace", "trailing")
STEPS_OFFSET = 1  # SD's scheduler_config.json: "steps_offset": 1, "timestep_spacing": "leading"
# alphas_cumprod floor that keeps the first sigma of a zero-terminal-SNR schedule finite (as diffusers does).
_ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def spaced_timesteps(num_timesteps: int, n: int, spacing: str = "leading", offset: int = STEPS_OFFSET,
                     extra_level: bool = False) -> torch.Tensor:
    """``n`` of ``num_timesteps`` training timesteps, decreasing (int64; see the module docstring).

    ``offset`` shifts "leading" only; ``extra_level`` spaces "leading" and "linspace" over ``n + 1`` levels and
    drops the lowest (DPM-Solver). Timesteps are clamped to [0, T - 1]; "leading" with an offset can then repeat
    the last one (n = T), which callers that need distinct levels remove.
    """
    T = num_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {n}")
    levels = n + 1 if extra_level else n
    if spacing == "leading":
        timesteps = torch.arange(levels, dtype=torch.float64) * (T // levels) + offset
    elif spacing == "linspace":
        timesteps = torch.linspace(0, T - 1, levels, dtype=torch.float64).round()
    elif spacing == "trailing":  # already starts at the last timestep: no level to drop
        timesteps = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    timesteps = timesteps.long().clamp(0, T - 1).sort(descending=True).values
    return timesteps[:n] if extra_level and spacing != "trailing" else timesteps


def get_sigmas_discrete(schedule: NoiseSchedule, n: int, spacing: str = "leading", offset: int = STEPS_OFFSET,
                        dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                        ) -> torch.Tensor:
    """The sigmas of ``n`` of the schedule's own timesteps (``spaced_timesteps``, distinct), decreasing, then 0.

    An infinite sigma (zero terminal SNR) is replaced by the sigma of alphas_cumprod = 2^-24. The final 0 makes
    the last step return the denoised estimate (CompVis' DDIM/PLMS stop one step short: ``sampler_sigmas``).
    """
    timesteps = spaced_timesteps(schedule.num_timesteps, n, spacing, offset).unique().flip(0)
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


def sampler_timesteps(sampler: str | SamplerSpec, steps: int, num_timesteps: int = 1000,
                      offset: int = STEPS_OFFSET, spacing: str = "leading") -> list[int]:
    """The training timesteps diffusers' scheduler for ``sampler`` visits in ``steps`` steps, decreasing."""
    extra_level = get_sampler(sampler).spacing_extra_level
    return spaced_timesteps(num_timesteps, steps, spacing, offset, extra_level).tolist()


def strength_start(steps: int, strength: float) -> int:
    """How many of ``steps`` levels img2img skips at ``strength`` (diffusers' ``get_timesteps``)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1, got {strength}")
    init = min(int(steps * strength), steps)
    start = max(steps - init, 0)
    if start >= steps:
        raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step (int(steps * strength) "
                         "is 0); raise --strength or --steps")
    return start


def apply_strength(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The levels left to run at ``strength`` (1: all of them): the first ``strength_start`` are skipped."""
    return sigmas[strength_start(len(sigmas) - 1, strength):]


def sampler_sigmas(schedule: NoiseSchedule, sampler: str | SamplerSpec, steps: int, offset: int = STEPS_OFFSET,
                   spacing: str = "leading", strength: float = 1.0) -> torch.Tensor:
    """The decreasing sigmas (float32) that ``steps`` steps of ``sampler`` integrate over in diffusers' scheduler
    conventions (see the module docstring), ending where its last step lands; ``strength`` < 1 drops the first."""
    spec = get_sampler(sampler)
    timesteps = torch.tensor(sampler_timesteps(spec, steps, schedule.num_timesteps, offset, spacing))
    sigmas = schedule.sigmas[timesteps]
    if not torch.isfinite(sigmas).all():
        raise ValueError("the schedule has an infinite sigma (zero terminal SNR) at a visited timestep; "
                         "the Stable Diffusion pipelines need a finite starting noise level")
    final = float(schedule.sigmas[0]) if spec.ends_at_first_level else 0.0
    return apply_strength(torch.cat([sigmas, sigmas.new_tensor([final])]).float(), strength)


__all__ = ["SPACINGS", "STEPS_OFFSET", "apply_strength", "discrete_timesteps", "get_sigmas_discrete",
           "get_sigmas_exponential", "get_sigmas_karras", "sampler_sigmas", "sampler_timesteps", "spaced_timesteps",
           "strength_start"]
