"""Training objectives for the denoiser: targets, the simple loss, its weightings and the LDM ELBO mix.

One training step, as the caller runs it:

    t = sample_timesteps(n, schedule, generator, device)
    noise = sample_noise(x0.shape, generator, config.offset_noise, device, dtype)
    output = network(q_sample(schedule, x0, t, noise), t, cond)
    loss, logs = diffusion_loss(config, schedule, output, x0, noise, t)

The loss follows CompVis' ``DDPM.p_losses`` (ldm/models/diffusion/ddpm.py, with its default logvar of 0):

    per_sample = mean over dims of l(output, target)                         (l = squared or absolute error)
    loss = l_simple_weight * mean_n(w_snr[t] * per_sample) + original_elbo_weight * mean_n(lvlb_weights[t] * per_sample)

where w_snr is 1 unless min-SNR-gamma weighting is on (Hang et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentdiff.diffusion.process import (
    PARAMETERIZATIONS,
    draw_noise,
    extract,
    posterior_variance,
    v_from_x0_eps,
)
from latentdiff.diffusion.schedule import NoiseSchedule

LOSS_TYPES = ("l2", "l1")
ELBO_WEIGHTS = ("ldm", "exact")


@dataclass
class DiffusionLossConfig:
    parameterization: str = "eps"  # what the network predicts: "eps", "x0" or "v"
    loss_type: str = "l2"  # "l2" (squared error) or "l1" (absolute error)
    l_simple_weight: float = 1.0
    original_elbo_weight: float = 0.0  # > 0 adds LDM's lvlb-weighted term (0 in every SD config)
    elbo_weights: str = "ldm"  # "ldm": CompVis' lvlb_weights as written; "exact": the true KL weights
    min_snr_gamma: float = 0.0  # 0 = off; else min-SNR-gamma weighting (Hang et al. 2023; gamma = 5 there)
    offset_noise: float = 0.0  # Guttenberg 2023: noise + offset * N(0, 1) per (sample, channel); ~0.1 there

    def __post_init__(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {self.parameterization!r}; choose eps, x0 or v")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose l2 or l1")
        if self.elbo_weights not in ELBO_WEIGHTS:
            raise ValueError(f"unknown elbo_weights {self.elbo_weights!r}; choose ldm or exact")
        if self.min_snr_gamma < 0 or self.offset_noise < 0:
            raise ValueError("min_snr_gamma and offset_noise must be >= 0")


def sample_timesteps(n: int, schedule: NoiseSchedule, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """n timestep indices uniform on {0, ..., T-1} (DDPM algorithm 1), drawn on the generator's device."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def sample_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                 offset_noise: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Training noise: N(0, I), plus ``offset_noise`` * one N(0, 1) value per (sample, channel) when > 0.

    The offset (Guttenberg 2023, "Diffusion with Offset Noise") is constant over the spatial dimensions, so
    the model also learns to change an image's mean per channel, which plain eps training barely sees at high
    SNR (too dark / too bright images). The same noise is the eps target. Shape is (N, C, ...).
    """
    noise = draw_noise(shape, generator, device, dtype)
    if offset_noise > 0:
        if len(shape) < 2:
            raise ValueError("offset noise needs a shape (N, C, ...)")
        offset_shape = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
        noise = noise + offset_noise * draw_noise(offset_shape, generator, device, dtype)
    return noise


def training_target(schedule: NoiseSchedule, parameterization: str, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the network should output at x_t = q_sample(x0, t, noise): eps, x0 or v (Salimans & Ho 2022)."""
    if parameterization == "eps":
        return noise
    if parameterization == "x0":
        return x0
    if parameterization == "v":
        return v_from_x0_eps(schedule, x0, noise, t)
    raise ValueError(f"unknown parameterization {parameterization!r}; choose eps, x0 or v")


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, parameterization: str,
                   gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", eq. 9 and sec. 3.4) for a loss on ``parameterization``'s target, float64 on the CPU.

    The paper's weight on the x_0 loss is min(SNR, gamma). The eps loss equals SNR times the x_0 loss and the
    v loss (SNR + 1) times it, so the same effective weight is min(SNR, gamma) / SNR on eps and
    min(SNR, gamma) / (SNR + 1) on v. The eps weight is written gamma / max(SNR, gamma): equal, and 1 (its
    limit) rather than 0/0 where SNR = 0 (zero terminal SNR).
    """
    a = schedule.alphas_cumprod[t.long().cpu()]
    snr = a / (1 - a)
    if parameterization == "eps":
        return gamma / snr.clamp_min(gamma)
    if parameterization == "x0":
        return snr.clamp_max(gamma)
    if parameterization == "v":
        return snr.clamp_max(gamma) / (snr + 1)
    raise ValueError(f"unknown parameterization {parameterization!r}; choose eps, x0 or v")


def lvlb_weights(schedule: NoiseSchedule, parameterization: str, convention: str = "ldm") -> torch.Tensor:
    """Per-timestep weights that turn the per-dimension simple loss into the ELBO term L_{t-1} (float64, CPU).

    With the fixed-small reverse variance beta~_t, L_{t-1} per dimension (nats) is
    |mu~(x_0) - mu~(x0_hat)|^2 / (2 beta~_t) (DDPM eq. 8), and mu~'s x_0 coefficient beta_t sqrt(a_{t-1}) / (1 - a_t)
    turns that into a weight on each target's squared error:
      eps: beta_t^2 / (2 beta~_t alpha_t (1 - a_t))              (DDPM eq. 12 before dropping the weight)
      x0:  beta_t^2 a_{t-1} / (2 beta~_t (1 - a_t)^2)
      v:   beta_t^2 a_{t-1} / (2 beta~_t (1 - a_t))              (since x_0 - x0_hat = -sqrt(1 - a_t) (v - v_hat))
    ``convention="exact"`` returns these. ``convention="ldm"`` returns CompVis' ``lvlb_weights`` as the code
    computes them, to reproduce its training: the same eps weight; for x0 ``0.5 * sqrt(a_t) / (2. * 1 - a_t)``,
    which by operator precedence is 0.5 sqrt(a_t) / (2 - a_t) (not the ELBO weight); for v all ones.
    Both set weight[0] = weight[1] (beta~_0 = 0 makes the formula infinite there), as CompVis does.
    """
    betas, alphas, a = schedule.betas, schedule.alphas, schedule.alphas_cumprod
    a_prev, post_var = schedule.alphas_cumprod_prev, posterior_variance(schedule)
    if convention not in ELBO_WEIGHTS:
        raise ValueError(f"unknown convention {convention!r}; choose ldm or exact")
    if parameterization == "eps":
        weights = betas ** 2 / (2 * post_var * alphas * (1 - a))
    elif parameterization == "x0":
        if convention == "ldm":
            weights = 0.5 * a.sqrt() / (2.0 * 1 - a)
        else:
            weights = betas ** 2 * a_prev / (2 * post_var * (1 - a) ** 2)
    elif parameterization == "v":
        weights = torch.ones_like(betas) if convention == "ldm" else betas ** 2 * a_prev / (2 * post_var * (1 - a))
    else:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose eps, x0 or v")
    weights = weights.clone()
    if len(weights) > 1:
        weights[0] = weights[1]
    return weights


def diffusion_loss(config: DiffusionLossConfig, schedule: NoiseSchedule, network_output: torch.Tensor,
                   x0: torch.Tensor, noise: torch.Tensor,
                   t: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss (a scalar) and detached logs for a network output at x_t = q_sample(x0, t, noise).

    ``noise`` is the noise that made x_t (offset noise included), so the eps target is exactly it.
    Logs: loss, loss_simple (unweighted mean error), loss_simple_weighted (after min-SNR), loss_vlb
    (lvlb-weighted mean error; present even when original_elbo_weight is 0, as CompVis logs it).
    """
    target = training_target(schedule, config.parameterization, x0, noise, t)
    diff = network_output - target
    err = diff.abs() if config.loss_type == "l1" else diff ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    if config.min_snr_gamma > 0:
        weight = min_snr_weight(schedule, t, config.parameterization, config.min_snr_gamma)
        simple = (weight.to(per_sample.device, per_sample.dtype) * per_sample).mean()
    else:
        simple = per_sample.mean()
    vlb_weight = extract(lvlb_weights(schedule, config.parameterization, config.elbo_weights), t, per_sample)
    loss_vlb = (vlb_weight * per_sample).mean()
    loss = config.l_simple_weight * simple
    if config.original_elbo_weight > 0:
        loss = loss + config.original_elbo_weight * loss_vlb
    logs = {"loss": loss.detach(), "loss_simple": per_sample.mean().detach(),
            "loss_simple_weighted": simple.detach(), "loss_vlb": loss_vlb.detach()}
    return loss, logs
