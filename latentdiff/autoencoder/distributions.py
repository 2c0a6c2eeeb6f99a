"""The diagonal Gaussian posterior of the KL-regularised autoencoder."""

from __future__ import annotations

import torch


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), built from the encoder's (mean, logvar) channel halves.

    The log-variance is clamped to [-30, 20] as in the original, which keeps exp() finite early in
    training without changing any well-behaved posterior.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.logvar = torch.zeros_like(self.mean)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised sample; noise from ``generator`` (drawn on its device, then moved)."""
        if self.deterministic:
            return self.mean
        gen_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=gen_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over the latent dimensions: shape (N,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample) per sample, summed over dimensions."""
        log_two_pi = torch.log(torch.tensor(2.0 * torch.pi, dtype=sample.dtype, device=sample.device))
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=[1, 2, 3])
