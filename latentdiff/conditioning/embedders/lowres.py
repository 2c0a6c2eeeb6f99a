"""The ``lowres`` embedder (super-resolution): a low-res image at the latent size, appended to the UNet's input.

The low-res image is the batch's ``lowres``, or its ``image`` downsampled to ``size`` with antialiased bicubic.
At the latent size it is, in ``space`` "pixels": as is when it has the latent size, space-to-depth when it is
larger (so no pixel is lost), bicubic upsampling when smaller; in "latents": upsampled to the image size and encoded
by the first stage. The unconditional version is all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from latentdiff.conditioning.embedders.base import Embedder, EmbedderConfig, Encode, Geometry, zero_where_dropped

LOWRES_SPACES = ("pixels", "latents")


def lowres_unshuffle_factor(lowres_size: int, latent_size: int) -> int:
    """The space-to-depth factor that brings a low-res image larger than the latent to the latent size (else 1)."""
    if lowres_size <= latent_size:
        return 1
    if lowres_size % latent_size:
        raise ValueError(f"conditioner.lowres_size {lowres_size} must be a multiple of the latent size {latent_size} "
                         "(or at most it)")
    return lowres_size // latent_size


@dataclass
class LowResConfig(EmbedderConfig, output="concat", default_name="image"):
    """The low-res image is ``size`` pixels square, given to the UNet in ``space`` "pixels" or "latents"."""

    kind: str = field(default="lowres", init=False)
    size: int = 8
    space: str = "pixels"

    def check(self) -> None:
        if self.size < 1:
            raise ValueError(f"the low-res image size must be positive, got {self.size}")
        if self.space not in LOWRES_SPACES:
            raise ValueError(f"the low-res space must be one of {', '.join(LOWRES_SPACES)}, got {self.space!r}")

    def channels(self, geometry: Geometry) -> int:
        if self.space == "latents":
            return geometry.latent_channels
        return geometry.image_channels * lowres_unshuffle_factor(self.size, geometry.latent_size) ** 2

    def cache_signature(self) -> dict[str, Any]:
        return {"lowres_size": self.size}


class LowResEmbedder(Embedder):
    config_class = LowResConfig
    keys = ("lowres", "image")

    def __init__(self, config: LowResConfig, geometry: Geometry) -> None:
        super().__init__(config, geometry)
        lowres_unshuffle_factor(config.size, geometry.latent_size)  # validates the size

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        size, channels = self.config.size, self.geometry.image_channels
        if batch.get("lowres") is not None:
            lowres = torch.as_tensor(batch["lowres"]).float()
        elif batch.get("image") is not None:
            image = torch.as_tensor(batch["image"]).float()
            lowres = F.interpolate(image, size=(size, size), mode="bicubic", antialias=True,
                                   align_corners=False).clamp(-1, 1)
        else:
            return {}
        if lowres.ndim != 4 or lowres.shape[1:] != (channels, size, size):
            raise ValueError(f"the low-res image must be (N, {channels}, {size}, {size}), got {tuple(lowres.shape)}")
        return {"lowres": lowres}

    def forward(self, prepared: dict[str, torch.Tensor], dropped: torch.Tensor,
                encode: Encode | None = None) -> torch.Tensor:
        g, lowres, device = self.geometry, prepared.get("lowres"), dropped.device
        latent = (g.latent_size, g.latent_size)
        if lowres is None:
            return torch.zeros(len(dropped), self.config.channels(g), *latent, device=device)
        lowres = lowres.to(device).float()
        if self.config.space == "latents":
            if encode is None:
                raise ValueError("low-res conditioning in latents needs the first stage (encode)")
            up = F.interpolate(lowres, size=(g.image_size, g.image_size), mode="bicubic",
                               align_corners=False).clamp(-1, 1)
            with torch.no_grad():
                out = encode(up).float()
        else:
            factor = lowres_unshuffle_factor(self.config.size, g.latent_size)
            if factor > 1:
                out = F.pixel_unshuffle(lowres, factor)
            elif self.config.size < g.latent_size:
                out = F.interpolate(lowres, size=latent, mode="bicubic", align_corners=False)
            else:
                out = lowres
        return zero_where_dropped(out, dropped)


__all__ = ["LOWRES_SPACES", "LowResConfig", "LowResEmbedder", "lowres_unshuffle_factor"]
