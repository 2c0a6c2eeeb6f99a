"""The noise levels a sampler visits: timestep spacing, the schedule's sigmas, Karras / exponential ramps, strength.

A run of ``n`` steps over a discrete schedule of T training timesteps visits ``n`` of them (``spaced_timesteps``),
as diffusers' ``timestep_spacing`` names the choices. For T = 1000:

- "leading" ``arange(n) * (T // n) + offset``: 10 steps with SD's ``steps_offset=1`` give 901, 801, ..., 1
  (CompVis' DDIM ``range(0, T, T // n) + 1``);
- "linspace" ``round(linspace(0, T - 1, n))``: 999, 888, 777, ..., 111, 0;
- "trailing" ``round(arange(T, 0, -T / n)) - 1`` (Lin et al. 2023, starts from pure noise): 999, 899, ..., 99.

DPM-Solver (``DPMSolverMultistepScheduler``, our DPM++ samplers) and UniPC (``UniPCMultistepScheduler``) space
"leading" and "linspace" over ``n + 1`` levels and drop the lowest: 901, 811, ..., 91. The sigma of timestep t is
sqrt((1 - a_t) / a_t) with a = alphas_cumprod.

Stable Diffusion's schedulers (diffusers, ``scheduler_config.json``: leading spacing, ``steps_offset=1``,
``set_alpha_to_one=False``) also differ in where the last step lands: DDIM and PLMS step from timestep 1 to
alphas_cumprod[0] (sigma = 0.029 for SD) and return that slightly noisy latent, as CompVis' samplers do; the others
step to sigma = 0 (DPM-Solver's ``final_sigmas_type="zero"``, whose last step is then first order, as
``sample_dpmpp_2m``'s). ``sampler_sigmas`` gives these levels from what the sampler's registry entry declares.

Which spacing a sampler uses by default follows diffusers: a scheduler config's ``timestep_spacing`` when it has one,
else the scheduler class's own default ("linspace" for Euler, Euler ancestral, Heun, DPM-Solver and UniPC, "leading" for
DDIM, PNDM and DDPM: the hub's SD 1.5 config has no such key). ``LevelOptions`` carries what a model's
``scheduler_config.json`` says (spacing, ``steps_offset``, Karras / exponential sigmas). diffusers' sigma schedulers
(Euler, Euler ancestral, Heun) keep "linspace" timesteps fractional and interpolate sigma linearly between the
schedule's own; a Karras or exponential ramp spans the spaced sigmas (DPM-Solver, UniPC: all of the schedule's).

img2img and inpainting at ``strength`` < 1 start part way (``apply_strength``): as diffusers' ``get_timesteps``,
``n - min(int(n * strength), n)`` levels are skipped, counted in the scheduler's timestep list, which repeats a
level for each warm-up step (PNDM), so such a sampler skips ``warmup_steps`` fewer levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from latentdiff.diffusion.samplers import SAMPLERS, SamplerSpec, get_sampler
from latentdiff.diffusion.schedule import NoiseSchedule

SPACINGS = ("leading", "linspace", "trailing")
RAMPS = ("karras", "exponential")  # sigma ramps that replace the schedule's own levels (sigma samplers only)
STEPS_OFFSET = 1  # SD's scheduler_config.json: "steps_offset": 1, "timestep_spacing": "leading"
# alphas_cumprod floor that keeps the first sigma of a zero-terminal-SNR schedule finite (as diffusers does).
_ZERO_SNR_ALPHA_BAR = 2.0 ** -24


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def spaced_timesteps(num_timesteps: int, n: int, spacing: str = "leading", offset: int = STEPS_OFFSET,
                     extra_level: bool = False, fractional: bool = False) -> torch.Tensor:
    """``n`` of ``num_timesteps`` training timesteps, decreasing (int64; see the module docstring).

    ``offset`` shifts "leading" only; ``extra_level`` spaces "leading" and "linspace" over ``n + 1`` levels and
    drops the lowest (DPM-Solver). Timesteps are clamped to [0, T - 1]; "leading" with an offset can then repeat
    the last one (n = T), which callers that need distinct levels remove. ``fractional`` keeps "linspace"
    unrounded (float64), as diffusers' sigma schedulers do.
    """
    T = num_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {n}")
    levels = n + 1 if extra_level else n
    if spacing == "leading":
        timesteps = torch.arange(levels, dtype=torch.float64) * (T // levels) + offset
    elif spacing == "linspace":
        timesteps = torch.linspace(0, T - 1, levels, dtype=torch.float64)
        if fractional and not extra_level:
            return timesteps.flip(0)
        timesteps = timesteps.round()
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


@dataclass(frozen=True)
class LevelOptions:
    """How a model's scheduler picks its levels, as its diffusers ``scheduler_config.json`` says.

    ``spacing``: "leading", "linspace" or "trailing"; None gives each sampler diffusers' default when the config
    has no ``timestep_spacing`` key (``SamplerSpec.default_spacing``). ``steps_offset`` shifts "leading" (SD's
    configs: 1). ``ramp``: "karras" or "exponential" sigmas instead of the schedule's own (sigma samplers only).
    """

    spacing: str | None = None
    steps_offset: int = STEPS_OFFSET
    ramp: str | None = None

    def __post_init__(self) -> None:
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        if self.ramp is not None and self.ramp not in RAMPS:
            raise ValueError(f"unknown sigma ramp {self.ramp!r}; choose one of {', '.join(RAMPS)}")

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any]) -> LevelOptions:
        """The options of a diffusers scheduler config; a missing key means the scheduler class's default."""
        ramp = ("karras" if config.get("use_karras_sigmas") else
                "exponential" if config.get("use_exponential_sigmas") else None)
        return cls(config.get("timestep_spacing"), int(config.get("steps_offset", 0)), ramp)

    def spacing_for(self, sampler: str | SamplerSpec) -> str:
        """The spacing ``sampler`` uses under these options."""
        return self.spacing or get_sampler(sampler).default_spacing


def sampler_timesteps(sampler: str | SamplerSpec, steps: int, num_timesteps: int = 1000,
                      offset: int = STEPS_OFFSET, spacing: str | None = None) -> list[float]:
    """The training timesteps diffusers' scheduler for ``sampler`` visits in ``steps`` steps, decreasing.

    ``spacing`` None is the sampler's own default; "linspace" timesteps of a sigma scheduler (Euler, Heun) stay
    fractional, the others are integers.
    """
    spec = get_sampler(sampler)
    timesteps = spaced_timesteps(num_timesteps, steps, spacing or spec.default_spacing, offset,
                                 spec.spacing_extra_level, fractional=spec.fractional_timesteps)
    return [int(t) if float(t).is_integer() else float(t) for t in timesteps.tolist()]


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


def apply_strength(sigmas: torch.Tensor, strength: float, warmup_steps: int = 0) -> torch.Tensor:
    """The levels left to run at ``strength`` (1: all of them): the first ``strength_start`` are skipped.

    diffusers counts the skipped levels in its scheduler's timestep list, where a sampler with ``warmup_steps``
    (PNDM) repeats its second level that many times; such a sampler starts that many levels earlier, but never
    above the second level when one level or more is skipped (the list's entry there is that level).
    """
    start = strength_start(len(sigmas) - 1, strength)
    return sigmas[start if start <= 1 else max(start - warmup_steps, 1):]


def _interpolated_sigmas(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """The schedule's sigmas at (fractional) timesteps, linear in sigma between neighbours (diffusers' np.interp)."""
    sigmas = schedule.sigmas.double()
    lo = timesteps.floor().long()
    hi = timesteps.ceil().long()
    weight = timesteps - lo
    return torch.where(weight > 0, (1 - weight) * sigmas[lo] + weight * sigmas[hi], sigmas[lo])


def _ramp(ramp: str, spec: SamplerSpec, schedule: NoiseSchedule, spaced: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` Karras / exponential sigmas (no final 0) over the range diffusers' scheduler takes for ``spec``:
    the spaced sigmas' (Euler, Heun), or the whole schedule's (DPM-Solver, which spaces over an extra level)."""
    finite = schedule.sigmas[torch.isfinite(schedule.sigmas)].double()
    low, high = (finite[0], finite[-1]) if spec.spacing_extra_level else (spaced[-1], spaced[0])
    make = get_sigmas_karras if ramp == "karras" else get_sigmas_exponential
    return make(steps, float(low), float(high), dtype=torch.float64)[:-1]


def sampler_sigmas(schedule: NoiseSchedule, sampler: str | SamplerSpec, steps: int, offset: int = STEPS_OFFSET,
                   spacing: str | None = None, strength: float = 1.0, ramp: str | None = None) -> torch.Tensor:
    """The decreasing sigmas (float32) that ``steps`` steps of ``sampler`` integrate over in diffusers' scheduler
    conventions (see the module docstring), ending where its last step lands; ``strength`` < 1 drops the first.

    ``spacing`` None is the sampler's diffusers default; ``ramp`` ("karras", "exponential") replaces the levels by a
    ramp over their range, for samplers that take any sigmas.
    """
    spec = get_sampler(sampler)
    if ramp is not None and spec.levels != "sigmas":
        raise ValueError(f"{spec.name} steps between the schedule's own timesteps; {ramp} sigmas apply to "
                         f"{', '.join(name for name, s in SAMPLERS.items() if s.levels == 'sigmas')}")
    timesteps = torch.tensor(sampler_timesteps(spec, steps, schedule.num_timesteps, offset, spacing),
                             dtype=torch.float64)
    sigmas = _interpolated_sigmas(schedule, timesteps)
    if not torch.isfinite(sigmas).all():
        raise ValueError("the schedule has an infinite sigma (zero terminal SNR) at a visited timestep; "
                         "the Stable Diffusion pipelines need a finite starting noise level")
    if ramp is not None:
        sigmas = _ramp(ramp, spec, schedule, sigmas, steps)
    final = float(schedule.sigmas[0]) if spec.ends_at_first_level else 0.0
    return apply_strength(torch.cat([sigmas, sigmas.new_tensor([final])]).float(), strength, spec.warmup_steps)


def diffusers_stepping(schedule: NoiseSchedule, sampler: str | SamplerSpec, steps: int, offset: int = STEPS_OFFSET,
                       spacing: str | None = None, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """Sampler options that make DDIM and PLMS step as diffusers' DDIM and PNDM schedulers do where those leave
    the levels ``sampler_sigmas`` lists; empty where they step from level to level.

    Both always step T // n timesteps below the one they evaluate, which with uneven ("linspace") spacing falls
    between the listed ones: DDIM gets ``landing_sigmas``. PNDM also repeats its second level for the warm-up, which
    strength < 1 slices away with the skipped ones: PLMS then runs ``diffusers_plan``, one row (label, from, to) per
    network call, as ``PNDMScheduler.step_plms`` computes them.
    """
    spec = get_sampler(sampler)
    if spec.name not in ("ddim", "plms"):
        return {}
    timesteps = [int(t) for t in sampler_timesteps(spec, steps, schedule.num_timesteps, offset, spacing)]
    stride = schedule.num_timesteps // steps
    even = all(a - b == stride for a, b in zip(timesteps, timesteps[1:], strict=False))
    sigmas = schedule.sigmas.float()

    def sigma(t: int) -> torch.Tensor:  # past 0: the last step's target, alphas_cumprod[0]
        return sigmas[min(max(t, 0), len(sigmas) - 1)]

    if spec.name == "ddim":
        if even:
            return {}
        run = timesteps[strength_start(steps, strength):]
        return {"landing_sigmas": torch.stack([sigma(t - stride) for t in run])}
    if (strength >= 1 and even) or len(timesteps) < 2:
        return {}
    listed = [timesteps[0], *timesteps[1:2], *timesteps[1:]]  # PNDM repeats its second level for the warm-up
    labels = listed[strength_start(steps, strength):]
    rows = [(t, t + stride, t) if c == 1 else (t, t, t - stride) for c, t in enumerate(labels)]
    return {"diffusers_plan": torch.stack([torch.stack([sigma(a), sigma(b), sigma(c)]) for a, b, c in rows])}


def starts_at_sigma_max(sampler: str | SamplerSpec, spacing: str) -> bool:
    """Whether diffusers' scheduler for ``sampler`` starts from noise of std sigma_max (its ``init_noise_sigma``
    for the sigma schedulers with "linspace" or "trailing" spacing) rather than sqrt(1 + sigma_max^2)."""
    return get_sampler(sampler).fractional_timesteps and spacing in ("linspace", "trailing")


__all__ = ["RAMPS", "SPACINGS", "STEPS_OFFSET", "LevelOptions", "apply_strength", "diffusers_stepping",
           "discrete_timesteps",
           "get_sigmas_discrete", "get_sigmas_exponential", "get_sigmas_karras", "sampler_sigmas",
           "sampler_timesteps", "spaced_timesteps", "starts_at_sigma_max", "strength_start"]
