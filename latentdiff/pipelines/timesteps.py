"""The noise levels each sampler visits in a Stable Diffusion pipeline: diffusers' scheduler conventions for SD.

Stable Diffusion's scheduler config (``timestep_spacing="leading"``, ``steps_offset=1``, ``set_alpha_to_one=False``)
fixes which of the 1000 training timesteps a run of ``n`` steps visits, and the schedulers differ in details that
change the image. For ``n = 10``:

- DDIM, PLMS (``PNDMScheduler(skip_prk_steps=True)``), DDPM, Euler, Euler ancestral, Heun: ``arange(n) * (T // n)
  + 1``, i.e. 901, 801, ..., 1 (CompVis' DDIM ``range(0, T, T // n) + 1``);
- DPM-Solver++ (``DPMSolverMultistepScheduler``): its "leading" spacing divides T into ``n + 1`` parts and drops the
  last, ``arange(1, n + 1) * (T // (n + 1)) + 1`` reversed, i.e. 901, 811, ..., 91.

Where the last step goes also differs. DDIM and PLMS step from timestep 1 to ``alphas_cumprod[0]`` (the first
training noise level, sigma = 0.029 for SD; ``set_alpha_to_one=False``) and return that slightly noisy latent, as
CompVis' samplers do; the others step to sigma = 0 (DPM-Solver's ``final_sigmas_type="zero"``, whose last step is
then first order, which ``sample_dpmpp_2m`` does too). ``sampler_sigmas`` returns these levels as the decreasing
sigmas our samplers take, ending in that final sigma.

img2img and inpainting with ``strength < 1`` start part way: as diffusers' ``get_timesteps``,
``t_start = n - min(int(n * strength), n)`` levels are skipped.
"""

from __future__ import annotations

import torch

from latentdiff.diffusion.schedule import NoiseSchedule

STEPS_OFFSET = 1  # SD's scheduler_config.json: "steps_offset": 1, "timestep_spacing": "leading"
# Samplers that end at alphas_cumprod[0] rather than at sigma = 0 (diffusers' DDIM/PNDM with set_alpha_to_one=False).
ENDS_AT_FIRST_LEVEL = frozenset({"ddim", "plms"})


def sampler_timesteps(sampler: str, steps: int, num_timesteps: int = 1000, offset: int = STEPS_OFFSET) -> list[int]:
    """The training timesteps visited by ``steps`` steps of ``sampler``, decreasing (see the module docstring)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    if sampler == "dpmpp_2m":
        ratio = num_timesteps // (steps + 1)
        timesteps = [i * ratio + offset for i in range(1, steps + 1)]
    else:
        ratio = num_timesteps // steps
        timesteps = [i * ratio + offset for i in range(steps)]
    return [min(t, num_timesteps - 1) for t in reversed(timesteps)]


def final_sigma(schedule: NoiseSchedule, sampler: str) -> float:
    """Where the last step lands: alphas_cumprod[0]'s sigma for DDIM/PLMS, else 0."""
    return float(schedule.sigmas[0]) if sampler in ENDS_AT_FIRST_LEVEL else 0.0


def sampler_sigmas(schedule: NoiseSchedule, sampler: str, steps: int, offset: int = STEPS_OFFSET) -> torch.Tensor:
    """The decreasing sigmas (float32, ``steps + 1`` values) that ``sampler`` integrates over in ``steps`` steps."""
    timesteps = torch.tensor(sampler_timesteps(sampler, steps, schedule.num_timesteps, offset))
    sigmas = schedule.sigmas[timesteps]
    if not torch.isfinite(sigmas).all():
        raise ValueError("the schedule has an infinite sigma (zero terminal SNR) at a visited timestep; "
                         "the Stable Diffusion pipelines need a finite starting noise level")
    return torch.cat([sigmas, sigmas.new_tensor([final_sigma(schedule, sampler)])]).float()


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


__all__ = ["ENDS_AT_FIRST_LEVEL", "STEPS_OFFSET", "final_sigma", "sampler_sigmas", "sampler_timesteps",
           "strength_start"]
