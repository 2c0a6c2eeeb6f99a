"""The ``inpaint`` embedder: the mask and the first stage's latents of the masked image, appended to the UNet's input.

As Stable Diffusion's inpainting models: ``concat`` = [mask, masked-image latents], the mask 1 where to fill in,
max-pooled to the latent size (so a latent cell the mask touches is regenerated), the hole 0 (mid-grey in [-1, 1]).
In training the masks are random boxes (or, with probability ``full_prob``, everything) drawn from the step's
generator (``draw``'s "inpaint_box"); at sampling the caller gives ``mask``. The unconditional version is all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from latentdiff.conditioning.embedders.base import Embedder, EmbedderConfig, Encode, Geometry, zero_where_dropped

NEEDS_A_MASK = "inpainting needs a mask (N, 1, H, W), 1 where to fill in, with the image"


def inpaint_boxes(uniform: torch.Tensor, size: int, full_prob: float, min_box: float,
                  max_box: float) -> torch.Tensor:
    """Masks (N, 1, size, size), 1 inside a random box, from uniforms (N, 5): [full?, height, width, top, left]."""
    n = uniform.shape[0]
    u = uniform.float()
    side = min_box + (max_box - min_box) * u[:, 1:3]
    hw = (side * size).round().clamp(1, size).long()
    top = (u[:, 3] * (size - hw[:, 0] + 1)).floor().long().clamp(max=size - 1)
    left = (u[:, 4] * (size - hw[:, 1] + 1)).floor().long().clamp(max=size - 1)
    rows = torch.arange(size, device=uniform.device)
    inside_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + hw[:, 0])[:, None])
    inside_cols = (rows[None] >= left[:, None]) & (rows[None] < (left + hw[:, 1])[:, None])
    mask = inside_rows[:, :, None] & inside_cols[:, None, :]
    mask = mask | (u[:, 0] < full_prob)[:, None, None]
    return mask.float().view(n, 1, size, size)


@dataclass
class InpaintConfig(EmbedderConfig, output="concat", default_name="image"):
    """Training masks: everything with probability ``full_prob`` (SD inpainting: 25%), else a box whose sides are
    uniform between ``min_box`` and ``max_box`` of the image side."""

    kind: str = field(default="inpaint", init=False)
    full_prob: float = 0.25
    min_box: float = 0.25
    max_box: float = 0.75

    def check(self) -> None:
        if not 0.0 <= self.full_prob <= 1.0:
            raise ValueError(f"inpainting full_prob must be in [0, 1], got {self.full_prob}")
        if not 0.0 < self.min_box <= self.max_box <= 1.0:
            raise ValueError("inpainting min_box and max_box must satisfy 0 < min <= max <= 1")

    def channels(self, geometry: Geometry) -> int:
        return 1 + geometry.latent_channels


class InpaintEmbedder(Embedder):
    config_class = InpaintConfig
    keys = ("image", "mask")

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        size, channels, out = self.geometry.image_size, self.geometry.image_channels, {}
        if batch.get("image") is not None:
            image = torch.as_tensor(batch["image"]).float()
            if image.ndim != 4 or image.shape[1:] != (channels, size, size):
                raise ValueError(f"the image to inpaint must be (N, {channels}, {size}, {size}), got "
                                 f"{tuple(image.shape)}")
            out["image"] = image
        if batch.get("mask") is not None:
            mask = torch.as_tensor(batch["mask"]).float()
            if mask.ndim == 3:
                mask = mask[:, None]
            if mask.ndim != 4 or mask.shape[1:] != (1, size, size):
                raise ValueError(f"the inpainting mask must be (N, 1, {size}, {size}), 1 where to fill in, got "
                                 f"{tuple(mask.shape)}")
            out["mask"] = (mask > 0.5).float()
        return out

    def draw(self, n: int, generator: torch.Generator | None, device: torch.device) -> dict[str, torch.Tensor]:
        return {"inpaint_box": torch.rand((n, 5), generator=generator, device=device)}

    def training_masks(self, uniform: torch.Tensor) -> torch.Tensor:
        """Masks (n, 1, H, W) from ``draw``'s "inpaint_box" uniforms."""
        c = self.config
        return inpaint_boxes(uniform, self.geometry.image_size, c.full_prob, c.min_box, c.max_box)

    def complete(self, prepared: dict[str, torch.Tensor], draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An image without a mask gets the random boxes of ``draws["inpaint_box"]`` (training batches)."""
        if "image" not in prepared or "mask" in prepared:
            return prepared
        if draws.get("inpaint_box") is None:
            raise ValueError(NEEDS_A_MASK)
        return {**prepared, "mask": self.training_masks(draws["inpaint_box"])}

    def forward(self, prepared: dict[str, torch.Tensor], dropped: torch.Tensor,
                encode: Encode | None = None) -> torch.Tensor:
        g, device = self.geometry, dropped.device
        image, mask = prepared.get("image"), prepared.get("mask")
        if image is None:
            return torch.zeros(len(dropped), 1 + g.latent_channels, g.latent_size, g.latent_size, device=device)
        if mask is None:
            raise ValueError(NEEDS_A_MASK)
        if encode is None:
            raise ValueError("inpainting conditioning needs the first stage (encode)")
        image, mask = image.to(device).float(), mask.to(device).float()
        masked = image * (1.0 - mask)  # the hole is 0: mid-grey in [-1, 1], as Stable Diffusion's inpainting
        with torch.no_grad():
            latents = encode(masked).float()
        factor = g.image_size // g.latent_size
        small_mask = F.max_pool2d(mask, factor) if factor > 1 else mask
        return zero_where_dropped(torch.cat([small_mask, latents], dim=1), dropped)


__all__ = ["NEEDS_A_MASK", "InpaintConfig", "InpaintEmbedder", "inpaint_boxes"]
