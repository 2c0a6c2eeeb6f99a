"""Perceptual distances for autoencoder training: LPIPS (VGG) and an offline EfficientNet distance.

Two distances are provided, both taking images in [-1, 1] of shape (N, C, H, W) with C in {1, 3}
and returning one distance per image, shape (N,):

* ``LPIPS``: the learned perceptual metric of Zhang et al. 2018 ("The Unreasonable Effectiveness
  of Deep Features as a Perceptual Metric"), VGG16 trunk with the "lin" v0.1 heads. It needs two
  weight files that cannot be shipped or downloaded here; see ``LPIPS`` for where to put them.
* ``EfficientNetPerceptualDistance``: the same construction (channel-normalised feature
  differences averaged over space) on an EfficientNet-Lite0 ImageNet trunk whose weights come with
  a pip package, so it works offline. It has no learned per-channel heads (none were ever trained
  for this trunk), so it is the analogue of LPIPS's uncalibrated "baseline" variant, *not* LPIPS,
  and its values are not comparable to LPIPS numbers.

``build_perceptual_loss`` picks one by name for configs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentdiff.autoencoder.backbones import (
    VGG16Features,
    _as_rgb,
    load_efficientnet_lite0,
    load_state_dict_file,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LPIPS_HEADS_PATH",
    "DEFAULT_VGG16_PATH",
    "EfficientNetPerceptualDistance",
    "LPIPS",
    "LPIPS_WEIGHTS_ENV",
    "VGG16_WEIGHTS_ENV",
    "build_perceptual_loss",
    "normalize_channels",
]

VGG16_WEIGHTS_ENV = "LATENTDIFF_VGG16_WEIGHTS"
LPIPS_WEIGHTS_ENV = "LATENTDIFF_LPIPS_WEIGHTS"
DEFAULT_VGG16_PATH = os.path.join("~", ".cache", "latentdiff", "lpips", "vgg16-397923af.pth")
DEFAULT_LPIPS_HEADS_PATH = os.path.join("~", ".cache", "latentdiff", "lpips", "vgg.pth")


def normalize_channels(feat: Tensor, eps: float = 1e-10) -> Tensor:
    """Scale each spatial feature vector to unit L2 norm over channels (LPIPS's normalisation).

    The eps is added to the norm, not under the square root, as in LPIPS: the gradient stays finite
    at all-zero vectors (which ReLU features do produce). Half-precision features (autocast) are
    promoted to float32 first: a sum of hundreds of squared activations overflows float16, and
    1e-10 underflows to 0.
    """
    if feat.dtype in (torch.float16, torch.bfloat16):
        feat = feat.float()
    norm = torch.sqrt(torch.sum(feat * feat, dim=1, keepdim=True))
    return feat / (norm + eps)


class _FrozenLoss(nn.Module):
    """Base for loss modules whose networks must never leave eval mode.

    A parent model's ``.train()`` would otherwise switch the backbone's BatchNorm to batch statistics
    (changing the distance with the batch composition) and update its running statistics.
    """

    def train(self, mode: bool = True) -> _FrozenLoss:
        return super().train(False)

    @staticmethod
    def _run(fn: Callable[[Tensor], list[Tensor]], x: Tensor) -> list[Tensor]:
        # Typical use compares a reconstruction with a fixed target: the side that needs no
        # gradient runs without recording a graph, so backward goes through one network, not two.
        if x.requires_grad:
            return fn(x)
        with torch.no_grad():
            return fn(x)


# ----------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------


class _LinHead(nn.Module):
    """A 1x1 conv with one output channel and no bias.

    Wrapped in ``model`` at index 1 so parameter names are ``linK.model.1.weight`` as in the lpips
    package's ``weights/v0.1/vgg.pth``; index 0 is dropout there, which is a no-op at inference.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _resolve(path: str | None, env: str, default: str) -> str:
    if path is None:
        path = os.environ.get(env) or default
    return os.path.expanduser(path)


class LPIPS(_FrozenLoss):
    """LPIPS distance (Zhang et al. 2018), VGG16 trunk, "lin" heads v0.1.

    d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 ), where f_l are the relu1_2 ...
    relu5_3 activations of ImageNet VGG16 applied after LPIPS's scaling layer, n() normalises each
    feature vector to unit length over channels, and w_l >= 0 are the learned per-channel heads.

    Weights (neither can be downloaded by latentdiff):

    * ``vgg_weights``: torchvision's ImageNet VGG16 checkpoint ``vgg16-397923af.pth``
      (``torchvision.models.vgg16(weights="IMAGENET1K_V1")``); env ``LATENTDIFF_VGG16_WEIGHTS``,
      default ``~/.cache/latentdiff/lpips/vgg16-397923af.pth``.
    * ``lpips_weights``: the heads ``lpips/weights/v0.1/vgg.pth`` from the ``lpips`` pip package;
      env ``LATENTDIFF_LPIPS_WEIGHTS``, default ``~/.cache/latentdiff/lpips/vgg.pth``.

    ``.pth`` files are read with ``torch.load(weights_only=True)``; ``.safetensors`` work too.
    """

    # LPIPS's ScalingLayer: maps [-1, 1] inputs to (roughly) torchvision's ImageNet normalisation.
    SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
    SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)

    def __init__(self, vgg_weights: str | None = None, lpips_weights: str | None = None) -> None:
        super().__init__()
        vgg_path = _resolve(vgg_weights, VGG16_WEIGHTS_ENV, DEFAULT_VGG16_PATH)
        heads_path = _resolve(lpips_weights, LPIPS_WEIGHTS_ENV, DEFAULT_LPIPS_HEADS_PATH)
        missing = []
        if not os.path.isfile(vgg_path):
            missing.append(
                f"  - VGG16 ImageNet weights (torchvision's vgg16-397923af.pth) expected at {vgg_path}; "
                f"pass vgg_weights= or set {VGG16_WEIGHTS_ENV}"
            )
        if not os.path.isfile(heads_path):
            missing.append(
                f"  - LPIPS linear heads (lpips/weights/v0.1/vgg.pth from the `lpips` pip package) "
                f"expected at {heads_path}; pass lpips_weights= or set {LPIPS_WEIGHTS_ENV}"
            )
        if missing:
            raise FileNotFoundError(
                "LPIPS needs weight files that are not available:\n"
                + "\n".join(missing)
                + "\nCopy them there (no download is attempted), or use the offline "
                "EfficientNet perceptual distance (perceptual loss kind 'efficientnet')."
            )

        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.net.load_torchvision_state_dict(load_state_dict_file(vgg_path))
        self.lins = nn.ModuleList(_LinHead(c) for c in VGG16Features.TAP_CHANNELS)
        heads = load_state_dict_file(heads_path)
        try:
            for i, lin in enumerate(self.lins):
                lin.model[1].weight.data.copy_(heads[f"lin{i}.model.1.weight"])
        except (KeyError, RuntimeError) as err:
            raise ValueError(
                f"{heads_path} is not an LPIPS v0.1 VGG heads file (expected lin0.model.1.weight ... "
                f"lin4.model.1.weight of shapes (1, C, 1, 1), C = {VGG16Features.TAP_CHANNELS}): {err}"
            ) from err
        self.requires_grad_(False)
        self.eval()
        logger.info("LPIPS loaded: VGG16 from %s, heads from %s", vgg_path, heads_path)

    def _taps(self, x: Tensor) -> list[Tensor]:
        return self.net((_as_rgb(x) - self.shift) / self.scale)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance between [-1, 1] images x and y, shape (N,)."""
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx = self._run(self._taps, x)
        fy = self._run(self._taps, y)
        total = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        for lin, a, b in zip(self.lins, fx, fy, strict=True):
            diff = (normalize_channels(a) - normalize_channels(b)) ** 2
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 perceptual distance
# ----------------------------------------------------------------------------------------------


class EfficientNetPerceptualDistance(_FrozenLoss):
    """LPIPS-style distance on frozen EfficientNet-Lite0 ImageNet features (no learned heads).

    d(x, y) = sum_l w_l * mean_hw( sum_c (n(f_l(x)) - n(f_l(y)))^2 ), with f_l the outputs of the
    five resolution stages of EfficientNet-Lite0 (strides 2, 4, 8, 16, 32; 16 ... 320 channels),
    n() the unit normalisation over channels, and w_l = 1 / L by default. Each layer term lies in
    [0, 4], so with the default weights the distance does too; uniform weights are the choice of
    LPIPS's unlearned baseline (it sums over channels and layers with no weights), divided by L so
    the scale does not depend on how many layers are used. Without learned heads, shallow (16-24
    channel) and deep (112-320 channel) stages count equally, i.e. edges/texture and object-level
    structure are balanced.

    Images smaller than ``min_size`` on their short side are upsampled (bilinear, aspect ratio
    kept) so that the stride-32 stage still has spatial extent: at the default 64, a 32x32 image
    gives 2x2 maps there. Measured on one CPU core (torch 2.13, batch of 32 images of 32x32, one
    side needing gradients, forward + backward): no upsampling 0.29 s, 64 -> 0.32 s, 96 -> 0.70 s,
    128 -> 1.3 s. 64 is the default: the deepest stage keeps spatial extent for 13% extra cost.
    Larger images are used at their own size.

    The network is frozen (no parameter gradients) and kept in eval mode; gradients flow to x and y.
    """

    def __init__(
        self,
        weights_path: str | None = None,
        min_size: int = 64,
        layer_weights: Sequence[float] | None = None,
        include_head: bool = False,
    ) -> None:
        super().__init__()
        if min_size < 1:
            raise ValueError(f"min_size must be positive, got {min_size}")
        self.min_size = int(min_size)
        self.include_head = bool(include_head)
        self.net = load_efficientnet_lite0(weights_path)
        num_layers = len(self.net.STAGE_CHANNELS) + int(self.include_head)
        if layer_weights is None:
            layer_weights = [1.0 / num_layers] * num_layers
        if len(layer_weights) != num_layers:
            raise ValueError(f"expected {num_layers} layer weights, got {len(layer_weights)}")
        self.register_buffer(
            "layer_weights", torch.tensor([float(w) for w in layer_weights]), persistent=False
        )
        self.requires_grad_(False)
        self.eval()

    def _resize(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        short = min(h, w)
        if short >= self.min_size:
            return x
        factor = self.min_size / short
        size = (max(self.min_size, round(h * factor)), max(self.min_size, round(w * factor)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def _features(self, x: Tensor) -> list[Tensor]:
        feats = self.net.forward_features(self._resize(_as_rgb(x)), include_head=self.include_head)
        return [normalize_channels(f) for f in feats]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance between [-1, 1] images x and y, shape (N,)."""
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx = self._run(self._features, x)
        fy = self._run(self._features, y)
        total = torch.zeros(x.shape[0], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        for weight, a, b in zip(self.layer_weights, fx, fy, strict=True):
            total = total + weight * ((a - b) ** 2).sum(dim=1).mean(dim=(1, 2))
        return total


def build_perceptual_loss(kind: str, **kwargs: object) -> nn.Module | None:
    """Perceptual distance module by name: "efficientnet" (offline default), "lpips", or "none".

    Keyword arguments go to the chosen class (``EfficientNetPerceptualDistance`` or ``LPIPS``).
    """
    key = kind.strip().lower()
    if key == "efficientnet":
        return EfficientNetPerceptualDistance(**kwargs)  # type: ignore[arg-type]
    if key == "lpips":
        return LPIPS(**kwargs)  # type: ignore[arg-type]
    if key == "none":
        return None
    raise ValueError(f"unknown perceptual loss kind {kind!r}; expected 'efficientnet', 'lpips' or 'none'")
