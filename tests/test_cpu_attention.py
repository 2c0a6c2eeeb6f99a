"""Our CPU attention kernel (latentdiff/nn/cpu_attention.c): the same attention as SDPA, and SDPA where it does not
apply or cannot be built."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from latentdiff.nn import cpu_attention
from latentdiff.nn.attention import attention

# Where the processor has AVX-512 and a C compiler is on the path the kernel must build: a failed build fails these.
needs_kernel = pytest.mark.skipif(not cpu_attention._FP32_OK or cpu_attention._compiler() is None,
                                  reason="no AVX-512 or no C compiler here: the kernel does not apply")
needs_bf16 = pytest.mark.skipif(not cpu_attention._BF16_OK or cpu_attention._compiler() is None,
                                reason="no AVX-512 BF16 or no C compiler here")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, lq, inner = q.shape
    split = [x.reshape(b, x.shape[1], heads, inner // heads).transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, lq, inner)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def qkv(b: int, lq: int, lk: int, heads: int, d: int, seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, lq, heads * d, generator=g) * spread, torch.randn(b, lk, heads * d, generator=g) * spread,
            torch.randn(b, lk, heads * d, generator=g))


# batch, queries, keys, heads, width: SD's shapes, odd counts of queries and keys (the tails of every block and
# vector), the smallest and largest widths, one head and many
SHAPES = [(2, 1024, 1024, 8, 40), (2, 1000, 77, 8, 40), (1, 300, 333, 2, 80), (1, 97, 129, 1, 160), (3, 49, 17, 4, 64),
          (1, 1, 1, 1, 2), (1, 130, 5, 2, 256), (2, 64, 1, 3, 48)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_sdpa(shape):
    q, k, v = qkv(*shape)
    with torch.inference_mode():
        ours = cpu_attention.attend(q, k, v, shape[3])
        exact = sdpa(q.double(), k.double(), v.double(), shape[3])
        theirs = sdpa(q, k, v, shape[3])
    assert ours.shape == q.shape and ours.dtype == torch.float32
    assert rel(ours, exact) < 4e-6
    assert rel(ours, exact) < 3 * rel(theirs, exact) + 1e-7


@needs_bf16
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_as_close_as_sdpa(shape):
    q, k, v = qkv(*shape)
    q16, k16, v16 = (x.bfloat16() for x in (q, k, v))
    with torch.inference_mode():
        ours = cpu_attention.attend(q16, k16, v16, shape[3])
        # the exact attention of the bf16 inputs: what both kernels approximate
        exact = sdpa(q16.double(), k16.double(), v16.double(), shape[3])
        theirs = sdpa(q16, k16, v16, shape[3])
    assert ours.dtype == torch.bfloat16
    assert rel(ours, exact) < 1.1 * rel(theirs, exact) + 1e-4


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_scores_stay_finite(dtype):
    """Scores in the hundreds (the online softmax's running maximum moves by large steps between key blocks)."""
    if dtype == torch.bfloat16 and not cpu_attention._BF16_OK:  # (the compiler: needs_kernel)
        pytest.skip("no AVX-512 BF16 here")
    q, k, v = qkv(2, 200, 700, 2, 40, seed=3, spread=6.0)
    k[:, 600:] *= 3  # the last block holds the largest scores
    q, k, v = (x.to(dtype) for x in (q, k, v))
    ours = cpu_attention.attend(q, k, v, 2)
    exact = sdpa(q.double(), k.double(), v.double(), 2)
    assert torch.isfinite(ours).all()
    assert rel(ours, exact) < (1e-5 if dtype == torch.float32 else 2e-2)


@needs_kernel
def test_strided_inputs_and_threads():
    """q, k and v as column slices of one fused projection (row stride 3 x width), and the same bits with 1 thread as
    with 2: every block of queries is one thread's work, in the same order."""
    fused = torch.randn(2, 300, 3 * 4 * 40)
    q, k, v = fused.chunk(3, dim=-1)
    assert q.stride(1) == 3 * 160 and not q.is_contiguous()
    ours = cpu_attention.attend(q, k, v, 4)
    assert rel(ours, sdpa(q.double(), k.double(), v.double(), 4)) < 4e-6
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.attend(q, k, v, 4)
        torch.set_num_threads(2)
        two = cpu_attention.attend(q, k, v, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, ours)


@needs_kernel
def test_applies_only_where_it_should():
    big = qkv(2, 1024, 1024, 8, 40)
    assert cpu_attention.applies(*big, 8)
    with cpu_attention.attention_kernel(False):
        assert not cpu_attention.applies(*big, 8)
    assert not cpu_attention.applies(*qkv(2, 64, 64, 8, 40), 8)  # small: SDPA
    assert not cpu_attention.applies(*(x.half() for x in big), 8)
    assert not cpu_attention.applies(*qkv(2, 1024, 1024, 8, 41), 8)  # odd width
    assert not cpu_attention.applies(*qkv(1, 1024, 1024, 1, 258), 1)  # wider than 256
    wide = qkv(2, 1024, 1024, 8, 160)
    assert not cpu_attention.applies(*wide, 8)  # fp32 wider than 128: SDPA
    assert cpu_attention.applies(*(x.bfloat16() for x in wide), 8) == cpu_attention._BF16_OK
    needs_grad = [x.clone().requires_grad_() for x in big]
    assert not cpu_attention.applies(*needs_grad, 8)
    with torch.no_grad():
        assert cpu_attention.applies(*needs_grad, 8)
    q, k, v = big
    assert not cpu_attention.applies(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, 8)  # width not contiguous


@needs_kernel
def test_attention_routes_to_the_kernel(monkeypatch):
    q, k, v = qkv(2, 1024, 1024, 8, 40)
    calls = []
    attend = cpu_attention.attend
    monkeypatch.setattr(cpu_attention, "attend", lambda *a: calls.append(a[3]) or attend(*a))
    with torch.inference_mode():
        ours = attention(q, k, v, heads=8)
        assert calls == [8]
        with cpu_attention.attention_kernel(False):
            theirs = attention(q, k, v, heads=8)
        masked = attention(q, k, v, heads=8, mask=torch.ones(2, 1024, dtype=torch.bool))
    assert calls == [8]  # neither the switch nor a mask reached the kernel
    assert rel(ours, theirs) < 4e-6 and rel(masked, theirs) < 1e-7
    q.requires_grad_()
    attention(q, k, v, heads=8).sum().backward()  # training: SDPA, with gradients
    assert calls == [8] and q.grad is not None


@needs_kernel
def test_no_compiler_means_sdpa_with_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_attention, "_library", [])
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: None)
    q, k, v = qkv(2, 1024, 1024, 8, 40)
    with caplog.at_level(logging.WARNING, logger="latentdiff.nn.cpu_attention"):
        assert not cpu_attention.applies(q, k, v, 8)
        out = attention(q, k, v, heads=8)
        attention(q, k, v, heads=8)
    ours = [r.getMessage() for r in caplog.records if r.name == "latentdiff.nn.cpu_attention"]
    assert len(ours) == 1 and ours[0].startswith("no C compiler")
    assert rel(out, sdpa(q, k, v, 8)) < 1e-7


@needs_kernel
def test_a_failing_compiler_leaves_nothing_behind(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_attention, "_library", [])
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "_compiler", lambda: "false")  # exits 1
    with caplog.at_level(logging.WARNING, logger="latentdiff.nn.cpu_attention"):
        assert cpu_attention._load() is None
    assert "could not be built" in caplog.text
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library, no temporary file


@needs_kernel
def test_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_attention, "_library", [])
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path))
    lib = cpu_attention._load()
    assert lib is not None
    (built,) = (tmp_path / "kernels").iterdir()
    assert built.name.startswith("cpu_attention-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(cpu_attention, "_library", [])
    monkeypatch.setattr(cpu_attention, "_build", lambda *a: pytest.fail("rebuilt a kernel that was in the cache"))
    assert cpu_attention._load() is not None
    assert built.stat().st_mtime_ns == stamp and list((tmp_path / "kernels").iterdir()) == [built]


def test_setting_is_checked():
    env = {**os.environ, "LATENTDIFF_ATTENTION": "fast"}
    done = subprocess.run([sys.executable, "-c", "import latentdiff.nn.cpu_attention"], env=env, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "LATENTDIFF_ATTENTION must be kernel" in done.stderr


@needs_kernel
def test_arguments_it_does_not_take_raise():
    """Called directly past ``applies`` (odd width 3; one past the widest, where the C file's MAX_D and the Python
    side's MAX_WIDTH must agree): the kernel refuses, and says what it was given."""
    for width in (3, cpu_attention.MAX_WIDTH + 2):
        q, k, v = qkv(1, 8, 8, 2, width)
        with pytest.raises(ValueError, match="refused its arguments"):
            cpu_attention.attend(q, k, v, 2)
