"""Winograd's F(4x4, 3x3) for fp32 3x3 convolutions (latentdiff/nn/winograd.c, .py): the same convolution as
PyTorch's, where it applies, and the direct convolution elsewhere."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from latentdiff.nn import winograd
from latentdiff.nn.onednn import Conv2d

# Where a C compiler is on the path the transforms must build: a failed build fails these.
needs_compiler = pytest.mark.skipif(winograd._compiler() is None, reason="no C compiler here")


def exact(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).abs().max() / b.abs().max())


def layer(c: int, k: int, seed: int = 0, bias: bool = True, **kwargs) -> Conv2d:
    torch.manual_seed(seed)
    conv = Conv2d(c, k, kwargs.pop("kernel_size", 3), padding=kwargs.pop("padding", 1), bias=bias, **kwargs)
    with torch.no_grad():
        conv.weight.normal_(0, 1 / (3 * c ** 0.5))
        if bias:
            conv.bias.normal_()
    return conv.requires_grad_(False)


@pytest.fixture
def everywhere(monkeypatch):
    """Winograd for every 3x3 convolution, however small."""
    for name in ("MIN_CHANNELS", "MIN_TILES", "MIN_WORK"):
        monkeypatch.setattr(winograd, name, 0)


@needs_compiler
@pytest.mark.parametrize("n,c,k,h,w,bias", [
    (1, 3, 5, 7, 9, True),      # every tail: rows and columns not multiples of 4
    (2, 4, 6, 1, 1, True),      # one pixel: all but the centre tap padding
    (3, 8, 3, 13, 4, False),    # no bias, more images than tile rows per band
    (2, 17, 33, 16, 16, True),  # channels past the weight transform's blocks of 16
    (1, 2, 2, 5, 70, True),     # wide rows
])
def test_matches_the_exact_convolution(everywhere, n, c, k, h, w, bias):
    conv = layer(c, k, bias=bias)
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1))
    assert winograd.applies(conv, x)
    got = winograd.convolve(x, conv.weight, conv.bias)
    assert got.shape == (n, k, h, w) and got.dtype == torch.float32
    assert rel(got, exact(x, conv)) < 2e-5


@needs_compiler
def test_bands_and_channel_blocks_give_the_same_result(everywhere, monkeypatch):
    """A budget of one tile row and 16 output channels per buffer: many bands across the two images, many blocks
    (the products then run in other sizes, so the rounding may differ)."""
    conv = layer(24, 40)
    x = torch.randn(2, 24, 19, 23, generator=torch.Generator().manual_seed(2))
    whole = winograd.convolve(x, conv.weight, conv.bias)
    monkeypatch.setattr(winograd, "BUDGET", 1)
    pieces = winograd.convolve(x, conv.weight, conv.bias)
    assert rel(pieces, whole.double()) < 1e-5
    assert rel(pieces, exact(x, conv)) < 2e-5


@needs_compiler
@pytest.mark.parametrize("layout", ["channels_last", "every_other_column", "every_other_image"])
def test_strided_inputs_are_read_in_place(everywhere, layout):
    """Channels-last maps (what ``F.interpolate`` may return) and other strides: the same result as contiguous."""
    conv = layer(6, 5)
    x = torch.randn(4, 6, 11, 18, generator=torch.Generator().manual_seed(5))
    strided = {"channels_last": x.contiguous(memory_format=torch.channels_last), "every_other_column": x[..., ::2],
               "every_other_image": x[::2]}[layout]
    assert not strided.is_contiguous()
    got = winograd.convolve(strided, conv.weight, conv.bias)
    assert rel(got, exact(strided, conv)) < 2e-5
    # the output keeps a channels-last input's layout (as oneDNN's does), else it is contiguous
    layout_out = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got.is_contiguous(memory_format=layout_out)


@needs_compiler
def test_sd_shape_error():
    """SD's 64x64 level at batch 2: taken by default, within 2e-5 of the exact result."""
    conv = layer(320, 320)
    x = torch.randn(2, 320, 64, 64, generator=torch.Generator().manual_seed(3))
    assert winograd.applies(conv, x)
    assert rel(winograd.convolve(x, conv.weight, conv.bias), exact(x, conv)) < 2e-5


@needs_compiler
def test_transforms_give_the_same_bits_for_any_thread_count():
    """Each thread transforms whole rows, so 1, 2 or 3 threads write the same numbers (the products between are
    PyTorch's)."""
    lib = winograd._load()
    g = torch.Generator().manual_seed(4)
    n, c, k, h, w = 2, 5, 7, 13, 11
    x, weight, bias = torch.randn(n, c, h, w, generator=g), torch.randn(k, c, 3, 3, generator=g), torch.randn(k)
    rows, tw = n * 4, 3
    products = torch.randn(36, k, rows * tw, generator=g)
    results = []
    for threads in (1, 2, 3):
        u, v, y = torch.empty(36, k, c), torch.empty(36, c, rows * tw), torch.empty(n, k, h, w)
        assert lib.latentdiff_winograd_weight(weight.data_ptr(), k, c, 0, k, u.data_ptr(), threads) == 0
        assert lib.latentdiff_winograd_input(x.data_ptr(), winograd._STRIDES(*x.stride()), n, c, h, w, 0, rows,
                                             v.data_ptr(), threads) == 0
        assert lib.latentdiff_winograd_output(products.data_ptr(), bias.data_ptr(), n, k, h, w, 0, k, 0, rows,
                                              y.data_ptr(), winograd._STRIDES(*y.stride()), threads) == 0
        results.append((u, v, y))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


def test_applies_only_where_it_pays_and_fits():
    x = torch.randn(2, 320, 64, 64)
    conv = layer(320, 320)
    if winograd._load() is not None:
        assert winograd.applies(conv, x)
    assert not winograd.applies(conv, x.bfloat16())  # bf16: oneDNN's direct convolution
    assert not winograd.applies(conv, x[:, :, :8, :8])  # 32 tiles: too few
    assert not winograd.applies(layer(64, 64), torch.randn(2, 64, 64, 64))  # too few channels
    assert not winograd.applies(layer(320, 320, stride=2), x)
    assert not winograd.applies(layer(320, 320, padding=0), x)
    assert not winograd.applies(layer(320, 320, dilation=2, padding=2), x)
    assert not winograd.applies(layer(320, 320, groups=2), x)
    assert not winograd.applies(layer(320, 320, kernel_size=1, padding=0), x)
    assert not winograd.applies(layer(320, 320, padding_mode="reflect"), x)
    with winograd.winograd_kernels(False):
        assert not winograd.applies(conv, x)


@needs_compiler
def test_conv2d_routes_to_it_and_keeps_one_weight(monkeypatch):
    """``Conv2d`` takes Winograd where it applies and oneDNN's packed direct path elsewhere; switching between the
    two (another input size) gives the plain weight back first and holds one copy at a time."""
    conv = layer(320, 320)
    calls = []
    convolve = winograd.convolve
    monkeypatch.setattr(winograd, "convolve", lambda *a: calls.append(1) or convolve(*a))
    big, small = torch.randn(2, 320, 64, 64), torch.randn(2, 320, 8, 8)
    with torch.inference_mode():
        direct_small = conv(small)  # packs the weight; the plain one is let go
        assert "_onednn_packed" in conv.__dict__
        out = conv(big)  # Winograd: the plain weight back, the packed copy dropped
        assert calls == [1] and "_onednn_packed" not in conv.__dict__
        assert rel(out, exact(big, conv)) < 2e-5
        with winograd.winograd_kernels(False):
            assert rel(conv(big), exact(big, conv)) < 1e-5
        assert calls == [1]
        assert torch.equal(conv(small), direct_small)
    conv.requires_grad_(True)
    conv(big).sum().backward()  # training: PyTorch's convolution, with gradients
    assert calls == [1] and conv.weight.grad is not None


@needs_compiler
def test_no_compiler_means_the_direct_path_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(winograd, "_library", [])
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(winograd, "_compiler", lambda: None)
    conv = layer(320, 320)
    x = torch.randn(2, 320, 64, 64)
    with caplog.at_level(logging.WARNING, logger="latentdiff.nn.winograd"), torch.inference_mode():
        assert not winograd.applies(conv, x)
        out = conv(x)
        conv(x)
    ours = [r.getMessage() for r in caplog.records if r.name == "latentdiff.nn.winograd"]
    assert len(ours) == 1 and ours[0].startswith("no C compiler")
    assert rel(out, exact(x, conv)) < 1e-5


@needs_compiler
def test_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(winograd, "_library", [])
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    assert winograd._load() is not None
    (built,) = (tmp_path / "kernels").iterdir()
    assert built.name.startswith("winograd-") and built.suffix == ".so"
    monkeypatch.setattr(winograd, "_library", [])
    monkeypatch.setattr(winograd, "_build", lambda *a: pytest.fail("rebuilt transforms that were in the cache"))
    assert winograd._load() is not None


@needs_compiler
def test_refused_arguments_are_an_error():
    lib = winograd._load()
    out = torch.empty(36 * 4 * 4)
    assert lib.latentdiff_winograd_weight(torch.zeros(4, 4, 3, 3).data_ptr(), 4, 4, 2, 1, out.data_ptr(), 1) == 1
    with pytest.raises(ValueError, match="refused"):
        winograd._call(1, "input")
    with pytest.raises(MemoryError):
        winograd._call(2, "output")


def test_setting_is_checked():
    env = dict(os.environ, LATENTDIFF_WINOGRAD="maybe")
    done = subprocess.run([sys.executable, "-c", "import latentdiff.nn.winograd"], env=env, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "LATENTDIFF_WINOGRAD must be" in done.stderr
