"""The first-stage training loss: pixel + perceptual + regulariser + PatchGAN with an adaptive weight."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.autoencoder.discriminator import NLayerDiscriminator, discriminator_loss, generator_loss
from latentdiff.autoencoder.perceptual import build_perceptual_loss


@dataclass
class AutoencoderLossConfig:
    pixel_loss: str = "l1"  # "l1" or "l2"
    perceptual: str = "efficientnet"  # "efficientnet" (offline default), "lpips" (needs local weights), "none"
    perceptual_weight: float = 1.0
    perceptual_min_size: int = 64  # small images are upsampled to this before the perceptual trunk
    lpips_vgg_weights: str = ""  # local files for perceptual: lpips (else env vars / ~/.cache defaults)
    lpips_head_weights: str = ""
    kl_weight: float = 1e-6  # same meaning as CompVis' kl_weight (see AutoencoderLoss)
    codebook_weight: float = 1.0
    disc_start: int = 0  # generator/discriminator adversarial training starts at this step
    disc_weight: float = 0.5  # 0 turns the GAN off
    disc_loss: str = "hinge"  # "hinge" or "non_saturating"
    disc_layers: int = 3
    disc_ndf: int = 64
    disc_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {self.pixel_loss!r}")
        if self.disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"disc_loss must be 'hinge' or 'non_saturating', got {self.disc_loss!r}")

    @property
    def use_gan(self) -> bool:
        return self.disc_weight > 0 and self.disc_factor > 0


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """VQGAN's lambda = ||grad rec|| / (||grad gan|| + 1e-4) at the decoder's last layer, clamped to [0, 1e4].

    Balancing the two gradients at the output layer makes the GAN weight insensitive to the scale of the
    reconstruction loss, so one ``disc_weight`` works across datasets and resolutions.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


class AutoencoderLoss(nn.Module):
    """Loss of both players; the discriminator lives here (``loss.discriminator``), as in the original.

    Reconstruction terms are means over pixels. The KL term is the per-sample KL divided by the number of
    pixel values, which makes this loss exactly CompVis' (pixel sums over the batch + kl_weight * KL) divided
    by C*H*W: ``kl_weight`` keeps its published meaning (1e-6 for SD's VAE) while the loss stays O(1).
    """

    def __init__(self, config: AutoencoderLossConfig, image_channels: int) -> None:
        super().__init__()
        self.config = config
        self.perceptual = None
        if config.perceptual != "none" and config.perceptual_weight > 0:
            kwargs = {}
            if config.perceptual == "efficientnet":
                kwargs["min_size"] = config.perceptual_min_size
            elif config.perceptual == "lpips":
                kwargs = {"vgg_weights": config.lpips_vgg_weights or None,
                          "lpips_weights": config.lpips_head_weights or None}
            self.perceptual = build_perceptual_loss(config.perceptual, **kwargs)
        self.discriminator = (NLayerDiscriminator(image_channels, config.disc_ndf, config.disc_layers)
                              if config.use_gan else None)

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.disc_start

    def reconstruction_terms(self, inputs: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.config.pixel_loss == "l1":
            pixel = (inputs - recon).abs().mean()
        else:
            pixel = F.mse_loss(recon, inputs)
        terms = {"pixel": pixel}
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(inputs.contiguous(), recon.contiguous()).mean()
        return terms

    def generator_loss(self, inputs: torch.Tensor, recon: torch.Tensor, reg_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor, regularizer: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's total loss at ``step`` and every term, for logging."""
        c = self.config
        terms = self.reconstruction_terms(inputs, recon)
        rec = terms["pixel"] + c.perceptual_weight * terms.get("perceptual", torch.zeros((), device=inputs.device))
        if regularizer == "kl":
            reg = c.kl_weight * reg_loss / inputs[0].numel()
            logs = {"kl": reg_loss.detach()}
        else:
            reg = c.codebook_weight * reg_loss
            logs = {"vq": reg_loss.detach()}
        total = rec + reg
        if self.gan_active(step):
            g_loss = generator_loss(self.discriminator(recon.contiguous()), c.disc_loss)
            if self.training and last_layer.requires_grad:
                d_weight = adaptive_weight(rec, g_loss, last_layer, c.disc_weight)
            else:
                d_weight = torch.tensor(0.0, device=inputs.device)
            total = total + d_weight * c.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs.update({k: v.detach() for k, v in terms.items()}, rec=rec.detach(), loss=total.detach())
        return total, logs

    def discriminator_step_loss(self, inputs: torch.Tensor, recon: torch.Tensor,
                                discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss; ``discriminator`` may be a DDP wrapper of ``self.discriminator``."""
        disc = self.discriminator if discriminator is None else discriminator
        logits_real = disc(inputs.contiguous().detach())
        logits_fake = disc(recon.contiguous().detach())
        d_loss = self.config.disc_factor * discriminator_loss(logits_real, logits_fake, self.config.disc_loss)
        return d_loss, {"d_loss": d_loss.detach(), "logits_real": logits_real.detach().mean(),
                        "logits_fake": logits_fake.detach().mean()}
