"""Noise schedules: betas -> alphas_cumprod -> the equivalent sigmas of sigma-space samplers.

A discrete schedule of T steps defines x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with a_t = alphas_cumprod[t].
Dividing by sqrt(a_t) gives the variance-exploding form x_t / sqrt(a_t) = x_0 + sigma_t eps with
sigma_t = sqrt((1 - a_t) / a_t), which is what sigma-space samplers (Euler, Heun, DPM-Solver++) integrate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ScheduleConfig:
    kind: str = "scaled_linear"  # "linear", "scaled_linear" (CompVis' "linear"), "cosine"
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    cosine_s: float = 0.008
    zero_terminal_snr: bool = False  # rescale so that alphas_cumprod[-1] = 0 (Lin et al. 2023)

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "scaled_linear", "cosine"):
            raise ValueError(f"unknown schedule {self.kind!r}; choose linear, scaled_linear or cosine")
        if self.num_timesteps < 1:
            raise ValueError("num_timesteps must be positive")


def make_betas(kind: str, num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012,
               cosine_s: float = 0.008) -> torch.Tensor:
    """Betas (float64) of a named schedule.

    "linear" is DDPM's linspace(beta_start, beta_end); "scaled_linear" is what CompVis and Stable Diffusion
    call "linear": linspace(sqrt(beta_start), sqrt(beta_end)) squared; "cosine" is Nichol & Dhariwal's
    alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas clipped at 0.999.
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == "cosine":
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=0.999)
    raise ValueError(f"unknown schedule {kind!r}; choose linear, scaled_linear or cosine")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step is pure noise (SNR 0) and the first is kept."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """The discrete schedule's tensors (float64, on the CPU) and conversions between t and sigma."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = c = config or ScheduleConfig()
        betas = make_betas(c.kind, c.num_timesteps, c.beta_start, c.beta_end, c.cosine_s)
        if c.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.num_timesteps = c.num_timesteps
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # sigma_t is infinite where alphas_cumprod is 0 (zero terminal SNR); samplers handle that end point.
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for ``sigma``: linear interpolation of t in log-sigma (as k-diffusion does)."""
        log_sigma = sigma.double().clamp_min(1e-12).log().cpu()
        ls = self.log_sigmas
        finite = torch.isfinite(ls)
        ls_f = ls[finite]
        idx = torch.searchsorted(ls_f, log_sigma.clamp(ls_f[0], ls_f[-1]).contiguous(), right=False)
        idx = idx.clamp(1, len(ls_f) - 1)
        lo, hi = ls_f[idx - 1], ls_f[idx]
        w = ((log_sigma.clamp(ls_f[0], ls_f[-1]) - lo) / (hi - lo)).clamp(0, 1)
        t = (idx - 1).double() + w
        if not torch.isfinite(ls[-1]):
            # Zero terminal SNR: sigma = inf is exactly the last step, not the last finite one.
            t = torch.where(torch.isposinf(log_sigma), torch.full_like(t, self.num_timesteps - 1), t)
        return t.to(sigma.device, torch.float32 if not sigma.is_floating_point() else sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep: log-sigma interpolated between neighbours."""
        t_cpu = t.double().cpu().clamp(0, self.num_timesteps - 1)
        lo = t_cpu.floor().long()
        hi = t_cpu.ceil().long()
        w = t_cpu - lo
        # Interpolate only where w > 0: with zero terminal SNR the last log-sigma is inf and 0 * inf is nan.
        log_sigma = torch.where(w > 0, (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi], self.log_sigmas[lo])
        return log_sigma.exp().to(t.device, t.dtype if t.is_floating_point() else torch.float32)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) at integer timesteps."""
        a = self.alphas_cumprod[t.long().cpu()]
        return (a / (1 - a)).to(t.device)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[torch.isfinite(self.sigmas)][-1])
