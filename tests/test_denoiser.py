"""Tests of the denoiser wrapper (eps/v/x0 scalings, timesteps, broadcasting) and classifier-free guidance."""

import pytest
import torch
from torch import nn

from latentdiff.diffusion.denoiser import DiscreteDenoiser, get_scalings, to_d
from latentdiff.diffusion.guidance import CFGDenoiser
from latentdiff.diffusion.noise_levels import get_sigmas_discrete
from latentdiff.diffusion.samplers import sample_euler
from latentdiff.diffusion.schedule import NoiseSchedule

F64 = torch.float64
SCHEDULE = NoiseSchedule()
TIMESTEPS = [0, 10, 500, 999]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), f"max difference {(actual - expected).abs().max()}"


class OracleNetwork(nn.Module):
    """Knows x0 and eps, checks its inputs are the VP-space x_t and the timestep, and returns the exact target."""

    def __init__(self, x0: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor, parameterization: str) -> None:
        super().__init__()
        self.x0, self.eps, self.timesteps, self.parameterization = x0, eps, timesteps, parameterization

    def forward(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = SCHEDULE.alphas_cumprod[self.timesteps].reshape(-1, 1, 1, 1)
        assert_close(x_in, a.sqrt() * self.x0 + (1 - a).sqrt() * self.eps, 1e-10)
        assert t.shape == (x_in.shape[0],) and t.dtype == x_in.dtype
        assert_close(t, self.timesteps.to(t.dtype), 1e-4)
        if self.parameterization == "eps":
            return self.eps
        if self.parameterization == "v":
            return a.sqrt() * self.eps - (1 - a).sqrt() * self.x0
        return self.x0


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_exact_network_output_gives_x0_back(parameterization):
    gen = torch.Generator().manual_seed(0)
    timesteps = torch.tensor(TIMESTEPS)
    x0 = torch.randn(4, 3, 5, 5, generator=gen, dtype=F64)
    eps = torch.randn(4, 3, 5, 5, generator=gen, dtype=F64)
    sigma = SCHEDULE.sigmas[timesteps]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps  # the VE point for x_t = sqrt(a) x0 + sqrt(1 - a) eps
    denoiser = DiscreteDenoiser(OracleNetwork(x0, eps, timesteps, parameterization), SCHEDULE, parameterization)
    assert_close(denoiser(x, sigma), x0, 1e-9)
    # The same sigma for the whole batch, given as a 0-d tensor and as a float.
    one = timesteps[2:3].expand(4)
    denoiser.network.timesteps = one
    x_one = x0 + SCHEDULE.sigmas[one].reshape(-1, 1, 1, 1) * eps
    assert_close(denoiser(x_one, SCHEDULE.sigmas[500]), x0, 1e-9)
    assert_close(denoiser(x_one, float(SCHEDULE.sigmas[500])), x0, 1e-9)


def test_scalings_values():
    sigma = torch.tensor([0.5, 2.0], dtype=F64)
    c_skip, c_out, c_in = get_scalings("v")(sigma)
    assert_close(c_skip, 1 / (sigma ** 2 + 1), 1e-15)
    assert_close(c_out, -sigma / (sigma ** 2 + 1).sqrt(), 1e-15)
    assert_close(c_in, 1 / (sigma ** 2 + 1).sqrt(), 1e-15)
    assert [float(c[0]) for c in get_scalings("eps")(sigma)] == [1.0, -0.5, pytest.approx(0.8 ** 0.5)]
    assert [float(c[1]) for c in get_scalings("x0")(sigma)] == [0.0, 1.0, pytest.approx(0.2 ** 0.5)]
    with pytest.raises(ValueError, match="eps"):
        get_scalings("score")


def test_timesteps_for_network_and_discrete_rounding():
    seen = []

    def network(x_in, t):
        seen.append(t)
        return torch.zeros_like(x_in)

    sigmas = get_sigmas_discrete(SCHEDULE, 50)[:-1]  # float32 sigmas of integer timesteps 981, ..., 1
    x = torch.zeros(len(sigmas), 4)
    DiscreteDenoiser(network, SCHEDULE)(x, sigmas)
    DiscreteDenoiser(network, SCHEDULE, discrete_t=True)(x, sigmas)
    assert seen[0].dtype == torch.float32
    assert_close(seen[0], torch.arange(981, 0, -20, dtype=torch.float32), 1e-3)
    assert torch.equal(seen[1], torch.arange(981, 0, -20, dtype=torch.float32))
    denoiser = DiscreteDenoiser(network, SCHEDULE)
    between = (SCHEDULE.sigmas[100] * 0.3 + SCHEDULE.sigmas[101] * 0.7).reshape(1)
    assert_close(denoiser.round_to_discrete(between), SCHEDULE.sigmas[101:102], 1e-12)
    assert denoiser.sigmas.dtype == torch.float32 and len(denoiser.sigmas) == 1000
    assert denoiser.sigma_max == SCHEDULE.sigma_max


def test_denoiser_is_a_module_with_the_network_weights_and_checks_sigma_shape():
    network = nn.Linear(4, 4)
    denoiser = DiscreteDenoiser(lambda x, t: network(x), SCHEDULE)
    assert DiscreteDenoiser(network, SCHEDULE).state_dict().keys() == {"network.weight", "network.bias"}
    with pytest.raises(ValueError, match="sigma"):
        denoiser(torch.zeros(3, 4), torch.ones(2))


def test_to_d_is_the_implied_noise():
    x0, eps = torch.randn(2, 3, 4, 4, dtype=F64), torch.randn(2, 3, 4, 4, dtype=F64)
    sigma = torch.tensor([0.3, 7.0], dtype=F64)
    assert_close(to_d(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma, x0), eps, 1e-12)


# ------------------------------------------------------------------------------------------------ guidance

class ToyNetwork(nn.Module):
    """Outputs the mean of its cross-attention context plus its class label, whatever x is; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_sizes: list[int] = []

    def forward(self, x_in, t, context, y=None, context_mask=None):
        self.batch_sizes.append(x_in.shape[0])
        if context_mask is not None:
            context = context * context_mask[..., None]
        out = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1).expand_as(x_in)
        return out + (y.reshape(-1, 1, 1, 1) if y is not None else 0)


def conditioning(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"context": torch.randn(n, 7, 8, generator=gen), "y": torch.randint(0, 10, (n,), generator=gen).float()}


def test_cfg_scale_one_is_the_conditional_model():
    network = ToyNetwork()
    denoiser = DiscreteDenoiser(network, SCHEDULE)
    x, sigma = torch.randn(3, 4, 2, 2), torch.full((3,), 2.5)
    cond, uncond = conditioning(3, 0), conditioning(3, 1)
    assert torch.equal(CFGDenoiser(denoiser)(x, sigma, cond, uncond, 1.0), denoiser(x, sigma, **cond))
    guided = CFGDenoiser(denoiser)(x, sigma, cond, uncond, torch.ones(3))  # the batched path
    assert_close(guided, denoiser(x, sigma, **cond), 1e-6)


def test_cfg_against_hand_computation_and_one_network_call():
    network = ToyNetwork()
    cfg = CFGDenoiser(DiscreteDenoiser(network, SCHEDULE))
    x, sigma, scale = torch.randn(2, 4, 3, 3), torch.tensor([1.5, 3.0]), 7.5
    cond, uncond = conditioning(2, 0), conditioning(2, 1)
    guided = cfg(x, sigma, cond, uncond, scale)
    assert network.batch_sizes == [4]
    # eps-prediction: D = x - sigma * eps, so guidance acts on eps: eps_u + s (eps_c - eps_u).
    eps_c = cond["context"].mean(dim=(1, 2)) + cond["y"]
    eps_u = uncond["context"].mean(dim=(1, 2)) + uncond["y"]
    expected = x - (sigma * (eps_u + scale * (eps_c - eps_u))).reshape(-1, 1, 1, 1)
    assert_close(guided, expected, 1e-5)
    # A per-sample scale.
    per_sample = cfg(x, sigma, cond, uncond, torch.tensor([1.0, scale]))
    assert_close(per_sample[1], expected[1], 1e-5)
    assert_close(per_sample[0], x[0] - sigma[0] * eps_c[0], 1e-5)


def test_cfg_in_a_sampler_calls_the_network_once_per_step_with_a_doubled_batch():
    network = ToyNetwork()
    cfg = CFGDenoiser(DiscreteDenoiser(network, SCHEDULE))
    sigmas = get_sigmas_discrete(SCHEDULE, 6)
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    extra = {"cond": conditioning(3, 0), "uncond": conditioning(3, 1), "scale": 5.0}
    sample_euler(cfg, x, sigmas, extra_args=extra, disable=True)
    assert network.batch_sizes == [6] * 6


def test_cfg_concatenates_every_key_and_broadcasts_a_shared_uncond():
    network = ToyNetwork()
    denoiser = DiscreteDenoiser(network, SCHEDULE)
    x, sigma = torch.randn(4, 4, 2, 2), torch.tensor(4.0)
    cond = conditioning(4, 0) | {"context_mask": (torch.arange(7) < 5).float().expand(4, 7)}
    uncond = conditioning(1, 1) | {"context_mask": torch.ones(1, 7)}  # one empty-prompt embedding for all
    guided = CFGDenoiser(denoiser)(x, sigma, cond, uncond, 3.0)
    d_cond = denoiser(x, sigma, **cond)
    d_uncond = denoiser(x, sigma, **{k: v.expand(4, *v.shape[1:]) for k, v in uncond.items()})
    assert_close(guided, d_uncond + 3.0 * (d_cond - d_uncond), 1e-5)


def test_cfg_rejects_mismatched_conditioning():
    cfg = CFGDenoiser(DiscreteDenoiser(ToyNetwork(), SCHEDULE))
    x, sigma = torch.randn(2, 4, 2, 2), torch.tensor(1.0)
    cond = conditioning(2, 0)
    with pytest.raises(ValueError, match="'y'"):
        cfg(x, sigma, cond, {"context": cond["context"]}, 7.0)
    with pytest.raises(ValueError, match="'y'"):
        cfg(x, sigma, cond, {"context": cond["context"]}, 1.0)
    with pytest.raises(ValueError, match="batch 3"):
        cfg(x, sigma, cond, conditioning(3, 1), 7.0)
