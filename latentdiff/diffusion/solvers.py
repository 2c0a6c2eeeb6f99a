"""Multistep solvers known by name from AUTOMATIC1111, k-diffusion and diffusers: DPM-Solver++(2M) SDE,
DPM-Solver++(3M) SDE and UniPC, with the signature and conventions of ``latentdiff.diffusion.samplers`` (which
registers them): VE space x = x0 + sigma eps, a denoiser D(x, sigma) -> x0, noise from ``generator``.

All three are exponential integrators in lambda = -log sigma (half the log signal-to-noise ratio). Over a step from
sigma to sigma_next, h = log(sigma / sigma_next), the probability-flow ODE with D held constant has the exact
solution x_next = e^-h x + (1 - e^-h) D (DPM-Solver++'s first order step, DDIM's). The SDE samplers take a fraction
eta of the reverse SDE's noise (Lu et al. 2022, "DPM-Solver++", sec. 5; k-diffusion's ``eta``):

    x_next = e^-(1 + eta) h x + (1 - e^-(1 + eta) h) D + sigma_next sqrt(1 - e^-2 eta h) z,    z ~ N(0, I).

With an exact D and x = x0 + sigma eps this is x0 + sigma_next (e^-eta h eps + sqrt(1 - e^-2 eta h) z): the step
keeps the fraction e^-eta h of the current noise and draws the rest afresh, so the marginal stays exact. eta = 0 is
the ODE step; eta = 1 is the DDPM posterior step of ``sample_ddpm``. The multistep methods replace D by a
polynomial in lambda through the previous steps' estimates (no extra model calls) and integrate it against the
step's weight (1 + eta) e^-(1 + eta)(lambda_next - lambda).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from tqdm.auto import trange

from latentdiff.diffusion.sampler_steps import Callback, Denoiser, evaluate, noise_like, setup

# k-diffusion's ``noise_sampler(sigma, sigma_next)``: the step's standard normal noise, of x's shape.
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _log_ratio(sigma: torch.Tensor | float, sigma_next: torch.Tensor | float) -> float:
    """The step in lambda = -log sigma from sigma to sigma_next (float64 arithmetic)."""
    return math.log(float(sigma) / float(sigma_next))


@dataclass(frozen=True)
class _SDENoise:
    """The fresh noise of an SDE step: a fraction ``eta`` of the reverse SDE's, times ``s_noise`` (k-diffusion's
    options), from ``sampler`` if given, else standard normal from ``generator`` (the module's convention)."""

    eta: float
    s_noise: float
    generator: torch.Generator | None
    sampler: NoiseSampler | None

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    def added(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, h: float) -> torch.Tensor:
        """x plus noise of std sigma_next sqrt(1 - e^(-2 eta h)) (no draw at eta = 0)."""
        if self.eta == 0:
            return x
        z = self.sampler(sigma, sigma_next) if self.sampler is not None else noise_like(x, self.generator)
        return x + z.to(x) * (self.s_noise * float(sigma_next) * math.sqrt(-math.expm1(-2 * self.eta * h)))


def _sde_first_order(x: torch.Tensor, denoised: torch.Tensor, h: float, eta: float) -> tuple[torch.Tensor, float]:
    """(e^(-(1 + eta) h) x + (1 - e^(-(1 + eta) h)) D, the step (1 + eta) h): the update with D held constant."""
    h_eta = (1 + eta) * h
    return math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised, h_eta


def _phi_2(h_eta: float) -> float:
    """The weight of a linear term, 1 - (1 - e^-h) / h: (1/h) times the integral of e^-(h - u) u over [0, h]."""
    return math.expm1(-h_eta) / h_eta + 1


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, generator: torch.Generator | None = None,
                        disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint", noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE as k-diffusion's ``sample_dpmpp_2m_sde`` (A1111's "DPM++ 2M SDE").

    The first order SDE step (module docstring) plus a linear term through the previous step's estimate,
    w (D - D_prev) / r with r = h_prev / h and h_eta = (1 + eta) h: "midpoint" (the default, as k-diffusion and
    A1111) w = (1 - e^-h_eta) / 2; "heun" w = 1 - (1 - e^-h_eta) / h_eta, the exact weight. At eta = 1 this is
    diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` of that ``solver_type``; at eta = 0
    with "midpoint", ``sample_dpmpp_2m``. The first step is first order and the last, to sigma 0, returns D.

    ``noise_sampler(sigma, sigma_next)``: the step's standard normal noise instead of the generator's (A1111 uses a
    seeded Brownian tree there, whose increments are independent standard normals too; we draw from ``generator``).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _sample_dpmpp_sde(model, x, sigmas, extra_args, callback, disable, _SDENoise(eta, s_noise, generator,
                             noise_sampler), order=2, midpoint=solver_type == "midpoint")


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, generator: torch.Generator | None = None,
                        disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE as k-diffusion's ``sample_dpmpp_3m_sde`` (A1111's "DPM++ 3M SDE").

    From the third step on, D is extrapolated through the last three estimates with the divided differences
    d1_0 = (D - D_1) / r0, d1_1 = (D_1 - D_2) / r1 (r0 = h_1 / h, r1 = h_2 / h: the previous steps over this one),
    d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1), d2 = (d1_0 - d1_1) / (r0 + r1), and the step adds
    phi_2 d1 - phi_3 d2 with phi_2 = 1 - (1 - e^-h_eta) / h_eta and phi_3 = phi_2 / h_eta - 1/2 (h_eta = (1 + eta) h),
    the weights of DPM-Solver's third order multistep update (phi_3 is half the weight that integrates a quadratic D
    exactly; kept, as it defines the sampler users know); the second step adds phi_2 (D - D_1) / r0 (the "heun"
    form of 2M). At eta = 0 it is ``DPMSolverMultistepScheduler(solver_order=3, solver_type="heun",
    lower_order_final=False)``'s ODE solver; at eta = 1 not diffusers' third order "sde-dpmsolver++" step, whose d2
    weight is another. The last step, to sigma 0, returns D. ``noise_sampler`` and the noise: as
    ``sample_dpmpp_2m_sde``.

    (A1111 also drops the next-to-last noise level for this sampler, ``discard_next_to_last_sigma``; that is a choice
    of levels, not of the sampler, and is not made here.)
    """
    return _sample_dpmpp_sde(model, x, sigmas, extra_args, callback, disable, _SDENoise(eta, s_noise, generator,
                             noise_sampler), order=3, midpoint=False)


def _sample_dpmpp_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None,
                      callback: Callback | None, disable: bool | None, noise: _SDENoise, order: int,
                      midpoint: bool) -> torch.Tensor:
    """The one loop of the DPM++ SDE samplers: the first order SDE step, plus (from the second step) the linear
    term through the previous estimate, with the "midpoint" weight (1 - e^-h_eta) / 2 or the "heun" one phi_2, and
    for ``order`` 3 (from the third step) the quadratic term of ``sample_dpmpp_3m_sde``; then the fresh noise. The
    last step, to sigma 0, returns D."""
    sigmas, s_in, extra_args = setup(x, sigmas, extra_args)
    history: list[torch.Tensor] = []  # the previous steps' D, newest first
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = evaluate(model, x, sigma, s_in, extra_args, callback, i)
        if sigma_next == 0:
            x = denoised
        else:
            h = _log_ratio(sigma, sigma_next)
            x, h_eta = _sde_first_order(x, denoised, h, noise.eta)
            phi_2 = _phi_2(h_eta)
            if len(history) == 2:
                r0, r1 = _log_ratio(sigmas[i - 1], sigma) / h, _log_ratio(sigmas[i - 2], sigmas[i - 1]) / h
                d1_0, d1_1 = (denoised - history[0]) / r0, (history[0] - history[1]) / r1
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * (d1_0 + r0 * d2) - (phi_2 / h_eta - 0.5) * d2
            elif len(history) == 1:
                weight = -math.expm1(-h_eta) / 2 if midpoint else phi_2
                x = x + (weight / (_log_ratio(sigmas[i - 1], sigma) / h)) * (denoised - history[0])
            x = noise.added(x, sigma, sigma_next, h)
        history = [denoised, *history][:order - 1]
    return x


def _unipc_weights(h: float, nodes: list[float], corrector: bool, variant: str) -> tuple[list[float], float]:
    """(rho, B(h)) of UniP (predictor) or UniC (corrector) over the earlier estimates at ``nodes`` r_k.

    With hh = -h, B(h) = hh ("bh1") or e^hh - 1 ("bh2") and the phi functions phi_1(z) = (e^z - 1) / z,
    phi_(k+1)(z) = (phi_k(z) - 1/k!) / z, the order conditions are sum_k rho_k c_k^(i-1) = i! hh phi_(i+1)(hh) / B(h)
    for i = 1 .. p over the nodes c: the r_k, and for the corrector also r = 1, the new estimate. A predictor with one
    earlier estimate and a corrector with none take rho = 1/2 (as the paper's code and diffusers; the predictor is then
    DPM-Solver++(2M)).
    """
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    columns = [*nodes, 1.0] if corrector else list(nodes)
    if len(columns) == 1:
        return [0.5], b_h
    if not columns:
        return [], b_h
    rhs, h_phi, factorial = [], math.expm1(hh) / hh - 1, 1
    for i in range(1, len(columns) + 1):
        rhs.append(h_phi * factorial / b_h)
        factorial *= i + 1
        h_phi = h_phi / hh - 1 / factorial
    matrix = torch.tensor([[c ** (i - 1) for c in columns] for i in range(1, len(columns) + 1)], dtype=torch.float64)
    return torch.linalg.solve(matrix, torch.tensor(rhs, dtype=torch.float64)).tolist(), b_h


def _unipc_step(x: torch.Tensor, levels: list[float], j: int, history: list[torch.Tensor],
                new: torch.Tensor | None, variant: str) -> torch.Tensor:
    """x at levels[j] stepped to levels[j + 1] with D = history[0] there and history[k] at levels[j - k]: UniP, or
    UniC with the estimate ``new`` at levels[j + 1] (the corrected x at that level)."""
    sigma, sigma_next = levels[j], levels[j + 1]
    h = math.log(sigma / sigma_next)
    nodes = [math.log(sigma / levels[j - k]) / h for k in range(1, len(history))]  # (lambda_k - lambda) / h < 0
    rhos, b_h = _unipc_weights(h, nodes, new is not None, variant)
    d0 = history[0]
    differences = [(d - d0) / r for d, r in zip(history[1:], nodes, strict=True)]
    if new is not None:
        differences.append(new - d0)
    ratio = sigma_next / sigma
    x = ratio * x + (1 - ratio) * d0
    for rho, difference in zip(rhos, differences, strict=True):
        x = x - (b_h * rho) * difference
    return x


@torch.no_grad()
def sample_unipc(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, generator: torch.Generator | None = None,
                 disable: bool | None = None, order: int = 2, variant: str = "bh2", lower_order_final: bool = True,
                 corrector: bool = True, disable_corrector: Collection[int] = ()) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), data prediction, as diffusers' ``UniPCMultistepScheduler`` (A1111's "UniPC").

    The predictor UniP-p steps with D and p - 1 earlier estimates (``_unipc_weights``); UniC then redoes that step
    once D at its end is known, adding it as one more node, which raises the order by one at no extra model call
    (the new D is the one the next prediction needs anyway; it was evaluated at the uncorrected x). Orders build up
    from 1 over the first steps; ``lower_order_final``: step i of n uses at most order n - i (the last step is first
    order, and to sigma 0 it returns D). ``corrector=False`` or step indices in ``disable_corrector`` (those steps'
    results are not corrected, as diffusers' option) leave UniP alone, which for order 2 and "bh2" is
    DPM-Solver++(2M). Defaults: diffusers' for Stable Diffusion (order 2, "bh2"); A1111's own defaults are order 3
    with "bh1" and its own noise levels.
    """
    if order < 1 or variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC needs order >= 1 and variant 'bh1' or 'bh2', got {order} and {variant!r}")
    sigmas, s_in, extra_args = setup(x, sigmas, extra_args)
    levels = sigmas.tolist()
    steps = len(levels) - 1
    history: list[torch.Tensor] = []  # D at the levels i, i - 1, ..., newest first
    x_prev, step_order = None, 0
    for i in trange(steps, disable=disable):
        denoised = evaluate(model, x, sigmas[i], s_in, extra_args, callback, i)
        if x_prev is not None and corrector and i - 1 not in disable_corrector:
            x = _unipc_step(x_prev, levels, i - 1, history[:step_order], denoised, variant)
        history = [denoised, *history][:order]
        step_order = min(order, steps - i if lower_order_final else order, len(history))
        x_prev = x
        if levels[i + 1] == 0:
            x = denoised
        else:
            x = _unipc_step(x, levels, i, history[:step_order], None, variant)
    return x


__all__ = ["NoiseSampler", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_unipc"]
