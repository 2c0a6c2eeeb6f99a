"""The denoiser D(x, sigma, cond) -> x0: a noise-prediction network wrapped with its parameterisation's scalings.

Samplers and guidance see only D. Everything is in the variance-exploding space x = x0 + sigma * eps, which
relates to a discrete schedule's x_t by x = x_t / sqrt(alphas_cumprod[t]) (see ``schedule.py``). Following
Karras et al. 2022 (EDM, Table 1) with sigma_data = 1 as in Stable Diffusion,

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, t(sigma), cond),

and eps-, v- and x0-prediction differ only in (c_skip, c_out, c_in). c_in = 1 / sqrt(sigma^2 + 1) =
sqrt(alphas_cumprod) turns x back into the x_t that a CompVis/SD UNet was trained on, and t(sigma) is the
discrete timestep of that sigma, so original checkpoints work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from latentdiff.diffusion.schedule import NoiseSchedule

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def eps_scalings(sigma: torch.Tensor) -> Scalings:
    """(c_skip, c_out, c_in) for eps-prediction: x0 = x - sigma * eps."""
    return torch.ones_like(sigma), -sigma, (sigma ** 2 + 1).rsqrt()


def v_scalings(sigma: torch.Tensor) -> Scalings:
    """(c_skip, c_out, c_in) for v-prediction (Salimans & Ho 2022): x0 = sqrt(a) x_t - sqrt(1 - a) v."""
    return 1 / (sigma ** 2 + 1), -sigma * (sigma ** 2 + 1).rsqrt(), (sigma ** 2 + 1).rsqrt()


def x0_scalings(sigma: torch.Tensor) -> Scalings:
    """(c_skip, c_out, c_in) for x0-prediction: the network's output is the estimate itself."""
    return torch.zeros_like(sigma), torch.ones_like(sigma), (sigma ** 2 + 1).rsqrt()


SCALINGS: dict[str, Callable[[torch.Tensor], Scalings]] = {"eps": eps_scalings, "v": v_scalings, "x0": x0_scalings}


def get_scalings(parameterization: str) -> Callable[[torch.Tensor], Scalings]:
    """The scalings function of ``parameterization`` ("eps", "v" or "x0")."""
    try:
        return SCALINGS[parameterization]
    except KeyError:
        raise ValueError(f"unknown parameterization {parameterization!r}; choose one of {sorted(SCALINGS)}") from None


def append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """View a scalar or (N,) tensor with trailing singleton dims so it broadcasts against an ndim-D batch."""
    if t.ndim > 1:
        raise ValueError(f"expected a scalar or a 1-D tensor, got shape {tuple(t.shape)}")
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3 with sigma(t) = t).

    In VE space this is also the eps that the denoiser implies.
    """
    return (x - denoised) / append_dims(torch.as_tensor(sigma, device=x.device), x.ndim).to(x.dtype)


class DiscreteDenoiser(nn.Module):
    """D(x, sigma, **cond) -> x0 for a network trained on the discrete timesteps of a ``NoiseSchedule``.

    ``network(x_in, t, **cond)`` receives the scaled input and the (fractional) timestep of ``sigma`` as a float
    tensor of shape (N,). With ``discrete_t`` the timestep is rounded to the nearest integer, which is what the
    discrete-time samplers of CompVis feed the network (and what sgm calls a quantised denoiser).
    """

    def __init__(self, network: nn.Module | Callable[..., torch.Tensor], schedule: NoiseSchedule,
                 parameterization: str = "eps", discrete_t: bool = False) -> None:
        super().__init__()
        self.network = network
        self.schedule = schedule
        self.parameterization = parameterization
        self.scalings = get_scalings(parameterization)
        self.discrete_t = discrete_t

    @property
    def sigmas(self) -> torch.Tensor:
        """The schedule's sigmas (float32, CPU), one per discrete timestep, increasing."""
        return self.schedule.sigmas.float()

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        t = self.schedule.sigma_to_t(sigma)
        return t.round() if self.discrete_t else t

    def round_to_discrete(self, sigma: torch.Tensor) -> torch.Tensor:
        """The schedule sigma nearest to ``sigma`` in log space (same shape, dtype and device)."""
        return self.schedule.t_to_sigma(self.schedule.sigma_to_t(sigma).round())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor) -> torch.Tensor:
        # Scalings and timesteps in at least float32: a float16 sigma would put t off by whole steps near T.
        dtype = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        elif sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        c_skip, c_out, c_in = (append_dims(c, x.ndim).to(x.dtype) for c in self.scalings(sigma))
        t = self.sigma_to_t(sigma)
        return c_skip * x + c_out * self.network(x * c_in, t, **cond)
