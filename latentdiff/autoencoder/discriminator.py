"""PatchGAN discriminator (pix2pix / VQGAN): a conv stack that scores overlapping patches as real or fake."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """``n_layers`` stride-2 4x4 convs with BatchNorm and LeakyReLU, then two stride-1 convs to one logit map.

    Each output logit sees a patch of the input (70x70 for n_layers=3), so the adversarial loss judges
    local texture and leaves global structure to the pixel and perceptual losses.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1)]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The pix2pix initialisation: N(0, 0.02) convs, N(1, 0.02) BatchNorm scales.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss: "hinge" or "non_saturating" (the original GAN's cross-entropy)."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"unknown GAN loss {kind!r}; choose 'hinge' or 'non_saturating'")


def generator_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's adversarial loss: -E[D(G)] for hinge, -log sigmoid(D(G)) for non-saturating."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose 'hinge' or 'non_saturating'")
