"""The oneDNN inference path of ``latentdiff.nn.onednn``: same numbers as PyTorch's plain layers, taken only where
no gradient is needed, and a packed weight that follows every change of the weight."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import platform
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from latentdiff.device import memory_available
from latentdiff.nn import onednn
from latentdiff.nn.onednn import Conv2d, Linear, onednn_active, onednn_kernels

pytestmark = pytest.mark.skipif(not onednn_active(), reason="this PyTorch has no oneDNN, or LATENTDIFF_ONEDNN=0")

CONVS = [  # (in, out, kernel, stride, padding, dilation, groups, bias)
    (8, 16, 3, 1, 1, 1, 1, True),
    (8, 16, 3, 2, 0, 1, 1, True),
    (8, 8, 1, 1, 0, 1, 1, False),
    (8, 16, 3, 1, 2, 2, 4, True),
    (4, 12, (3, 1), (2, 1), (1, 0), 1, 1, True),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _ops(fn) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("spec", CONVS)
def test_conv_matches_plain_convolution(spec) -> None:
    cin, cout, k, stride, pad, dil, groups, bias = spec
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias).eval()
    x = torch.randn(2, cin, 11, 9)
    with torch.no_grad():
        want = F.conv2d(x, conv.weight, conv.bias, stride, pad, dil, groups)
    strided = torch.randn(2, cin, 22, 9)[:, :, ::2]  # the same shape, a non-contiguous input
    wider = torch.randn(2, cin, 15, 13)  # another shape than the one the weight was packed for
    with torch.inference_mode():
        got, got_strided, got_wider = conv(x), conv(strided), conv(wider)
    with torch.no_grad():
        want_strided, want_wider = (F.conv2d(t, conv.weight, conv.bias, stride, pad, dil, groups)
                                    for t in (strided, wider))
    assert got.shape == want.shape and _rel(got, want) < 1e-5
    assert got_strided.shape == want_strided.shape and _rel(got_strided, want_strided) < 1e-5
    assert got_wider.shape == want_wider.shape and _rel(got_wider, want_wider) < 1e-5
    conv.requires_grad_(False)
    assert "mkldnn::_convolution_pointwise" in _ops(lambda: conv(x))


def test_linear_matches_plain_linear_on_any_leading_shape() -> None:
    torch.manual_seed(0)
    lin = Linear(24, 40).requires_grad_(False)
    for x in (torch.randn(5, 24), torch.randn(2, 7, 24), torch.randn(2, 24, 7).transpose(1, 2)):
        with torch.no_grad():
            assert _rel(lin(x), F.linear(x, lin.weight, lin.bias)) < 1e-5
    assert "mkldnn::_linear_pointwise" in _ops(lambda: lin(torch.randn(3, 24)))


def test_bfloat16_stays_close_to_float32() -> None:
    torch.manual_seed(0)
    conv, lin = Conv2d(16, 32, 3, padding=1).eval(), Linear(32, 48).eval()
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        want = lin(conv(x).permute(0, 2, 3, 1))
    conv, lin = conv.to(torch.bfloat16), lin.to(torch.bfloat16)
    with torch.inference_mode():
        got = lin(conv(x.bfloat16()).permute(0, 2, 3, 1))
    assert got.dtype is torch.bfloat16 and _rel(got, want) < 2e-2


def test_the_packed_weight_follows_every_change_of_the_weight() -> None:
    torch.manual_seed(0)
    conv = Conv2d(6, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 6, 8, 8)
    with torch.inference_mode():
        conv(x)
    first = conv.__dict__["_onednn_packed"][1]
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # in place: the version counter moves
        assert _rel(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
        conv.load_state_dict({"weight": torch.randn(6, 6, 3, 3), "bias": torch.zeros(6)})
        assert _rel(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
        conv.weight = torch.nn.Parameter(torch.randn(6, 6, 3, 3), requires_grad=False)  # a new tensor
        assert _rel(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
        assert conv.__dict__["_onednn_packed"][1] is not first
        again = conv.__dict__["_onednn_packed"][1]
        conv(x)
        assert conv.__dict__["_onednn_packed"][1] is again  # unchanged weight: packed once


def test_gradients_take_the_plain_path_and_stay_correct() -> None:
    torch.manual_seed(0)
    conv, lin = Conv2d(4, 4, 3, padding=1), Linear(4, 3)
    x = torch.randn(2, 4, 5, 5)
    y = lin(conv(x).mean((2, 3)))
    y.sum().backward()
    assert conv.weight.grad is not None and lin.weight.grad is not None
    assert "_onednn_packed" not in conv.__dict__
    with torch.no_grad():  # sampling between training steps packs the weight ...
        assert _rel(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
    assert "_onednn_packed" in conv.__dict__
    conv(x).sum().backward()  # ... and the next training step lets the copy go
    assert "_onednn_packed" not in conv.__dict__
    frozen = Conv2d(4, 4, 3, padding=1).requires_grad_(False)  # a frozen layer inside a differentiated graph
    xg = torch.randn(2, 4, 5, 5, requires_grad=True)
    frozen(xg).sum().backward()
    assert xg.grad is not None and "_onednn_packed" not in frozen.__dict__


def test_switches_copies_and_dtype_changes() -> None:
    torch.manual_seed(0)
    conv = Conv2d(3, 5, 3, padding=1).requires_grad_(False)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        with onednn_kernels(False):
            assert "mkldnn::_convolution_pointwise" not in _ops(lambda: conv(x))
        with onednn_kernels(True, pack=False):
            conv(x)
            assert "_onednn_packed" not in conv.__dict__
        want = conv(x)
        assert "_onednn_packed" in conv.__dict__
        twin = copy.deepcopy(conv)
        assert torch.equal(twin(x), want)
        assert torch.equal(pickle.loads(pickle.dumps(conv))(x), want)
        half = conv.to(torch.bfloat16)
        assert "_onednn_packed" not in half.__dict__
        assert _rel(half(x.bfloat16()), want) < 2e-2


def test_state_dict_names_are_torch_nn_ones() -> None:
    ours, theirs = Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours, torch.nn.Conv2d) and isinstance(Linear(2, 2), torch.nn.Linear)


def test_unet_forward_matches_the_plain_kernels(make_small_unet) -> None:
    unet = make_small_unet()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 5, 16)
    with torch.inference_mode():
        with onednn_kernels(False):
            want = unet(x, t, context=ctx)
        got = unet(x, t, context=ctx)
    assert _rel(got, want) < 1e-5


def test_a_wrong_environment_setting_is_refused() -> None:
    env = dict(os.environ, LATENTDIFF_ONEDNN="fast")
    result = subprocess.run([sys.executable, "-c", "import latentdiff.nn.onednn"], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode != 0
    assert "LATENTDIFF_ONEDNN must be 1" in result.stderr and "not 'fast'" in result.stderr


def test_low_memory_keeps_weights_unpacked_and_says_so_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(onednn, "memory_available", lambda device="cpu": 100 << 20)
    monkeypatch.setattr(onednn, "_NOTED", set())
    torch.manual_seed(0)
    convs = [Conv2d(4, 4, 3, padding=1).requires_grad_(False) for _ in range(2)]
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="latentdiff.nn.onednn"):
        for conv in convs:
            assert _rel(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
            assert conv.__dict__["_onednn_packed"][1] is None
            conv(x)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "100 MB available" in warnings[0] and "stay unpacked" in warnings[0]


def test_memory_available_reads_the_kernels_figure() -> None:
    assert memory_available("meta") is None  # a device nothing reports on
    available = memory_available("cpu")
    if not Path("/proc/meminfo").exists():
        assert available is None
    else:
        assert available is not None and 0 < available < 1 << 50


def test_weights_made_in_inference_mode_run_unpacked_with_one_warning(monkeypatch, caplog) -> None:
    monkeypatch.setattr(onednn, "_NOTED", set())
    with torch.inference_mode():
        convs = [Conv2d(3, 3, 3, padding=1) for _ in range(2)]
    x = torch.randn(1, 3, 5, 5)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="latentdiff.nn.onednn"):
        for conv in convs:
            assert _rel(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 1e-5
            assert "_onednn_packed" not in conv.__dict__
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "torch.inference_mode() stay unpacked" in warnings[0]


def test_torch_compile_traces_the_plain_operators_in_one_graph(make_small_unet) -> None:
    """Under ``torch.compile`` the layers and the UNet give dynamo the plain operators in one graph, without breaks
    (a break in a layer guards on its weight's identity: one recompilation per layer, past dynamo's limit in a
    UNet), with the same output as the eager oneDNN path."""
    unet = make_small_unet()
    layers = torch.nn.Sequential(Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(2), Linear(64, 16)).eval()
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 5, 16)
    with torch.no_grad():
        for model, args, kwargs in ((layers, (x[..., :8, :8],), {}), (unet, (x, t), {"context": ctx})):
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(*args, **kwargs)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            assert _rel(compiled(*args, **kwargs), model(*args, **kwargs)) < 1e-5


def _held_packed_only(conv: torch.nn.Module) -> bool:
    """Whether the layer's plain weight was let go (its entry is the meta-device stand-in)."""
    entry = dict.__getitem__(conv.__dict__["_parameters"], "weight")
    return entry.device.type == "meta"


@pytest.mark.parametrize("groups,channels_last", [(1, False), (4, False), (1, True)])
def test_weights_are_held_once_and_read_back_bit_for_bit(groups, channels_last) -> None:
    torch.manual_seed(0)
    conv = Conv2d(8, 16, 3, padding=1, groups=groups).requires_grad_(False)
    if channels_last:
        conv.to(memory_format=torch.channels_last)
    original = conv.weight.detach().clone()
    gone = weakref.ref(conv.weight)
    x = torch.randn(2, 8, 8, 8)
    want = F.conv2d(x, original, conv.bias, padding=1, groups=groups)
    with torch.no_grad():
        first = conv(x)
    assert _rel(first, want) < 1e-5
    assert _held_packed_only(conv) and gone() is None  # nothing holds the plain weight any more
    with torch.no_grad():
        assert torch.equal(conv(x), first)  # the packed copy alone computes the same
    weight = conv.weight  # a read brings it back, with its layout
    assert torch.equal(weight, original) and weight.stride() == original.stride() and not weight.requires_grad
    assert not _held_packed_only(conv)
    with torch.no_grad():
        conv(x)
    assert not _held_packed_only(conv)  # still referenced here: kept
    del weight
    with torch.inference_mode():
        assert torch.equal(conv(x), first)
    assert _held_packed_only(conv)  # let go again
    packed = conv.__dict__["_onednn_packed"][1]
    assert torch.equal(conv.state_dict()["weight"], original)
    with torch.no_grad():
        conv(x)
    assert conv.__dict__["_onednn_packed"][1] is packed  # a read alone packs nothing again
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias"]
    assert torch.equal(dict(conv.named_parameters())["weight"], original)


def test_every_way_of_reading_or_changing_a_weight_held_once() -> None:
    torch.manual_seed(0)
    conv = Conv2d(6, 6, 3, padding=1).requires_grad_(False)
    original = conv.weight.detach().clone()
    x = torch.randn(1, 6, 8, 8)

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = conv(x)
        assert _held_packed_only(conv)
        return out

    run()
    assert torch.equal(copy.deepcopy(conv).weight, original) and torch.equal(conv.weight, original)
    run()
    assert torch.equal(pickle.loads(pickle.dumps(conv)).weight, original)
    run()
    assert torch.equal((conv._parameters | {})["weight"], original)  # a merged copy of the dict
    run()
    assert torch.equal(dict(conv._parameters.items())["weight"], original)
    run()
    new = torch.randn(6, 6, 3, 3)
    conv.load_state_dict({"weight": new, "bias": conv.bias.detach().clone()})
    assert _rel(run(), F.conv2d(x, new, conv.bias, padding=1)) < 1e-5
    with torch.no_grad():
        conv.weight.mul_(2.0)  # in place through the attribute: packed again on the next call
    assert _rel(run(), F.conv2d(x, 2 * new, conv.bias, padding=1)) < 1e-5
    bias = conv.bias.detach().clone()
    half = conv.to(torch.bfloat16)  # the same layer, converted
    assert torch.equal(half.weight, (2 * new).bfloat16())
    with torch.no_grad():
        assert _rel(half(x.bfloat16()), F.conv2d(x, 2 * new, bias, padding=1)) < 2e-2
        assert _held_packed_only(half)
        half.float()(x)
    params = list(conv.parameters())
    assert params[0].device.type == "cpu" and torch.equal(params[0], (2 * new).bfloat16().float())


def test_weights_that_something_else_holds_keep_both_copies() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 6)
    convs = [Conv2d(4, 4, 3, padding=1).requires_grad_(False) for _ in range(4)]
    originals = [conv.weight.detach().clone() for conv in convs[:3]]
    held = [convs[0].weight, convs[1].weight.view(-1), convs[2].state_dict()]  # a reference, a view, a state dict
    trained = Conv2d(4, 4, 3, padding=1)  # requires grad: an optimiser may hold it
    with torch.no_grad():
        for conv in [*convs[:3], trained]:
            conv(x)
            assert "_onednn_packed" in conv.__dict__ and not _held_packed_only(conv)
        with onednn_kernels(True, once=False):
            convs[3](x)
        assert not _held_packed_only(convs[3])
        convs[3](x)
        assert _held_packed_only(convs[3])
    # what the caller holds is still the layers' live weight, with its values
    assert held[0] is convs[0].weight and torch.equal(held[0], originals[0])
    assert held[1].data_ptr() == convs[1].weight.data_ptr() and torch.equal(held[1], originals[1].view(-1))
    assert held[2]["weight"].data_ptr() == convs[2].weight.data_ptr() and torch.equal(held[2]["weight"], originals[2])


def _run_frozen_conv(batch: int, side: int) -> tuple[Conv2d, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded frozen 4-channel 3x3 convolution after one call without gradients (its weight now held only
    packed): the layer, its original weight, the input and the output."""
    torch.manual_seed(0)
    conv = Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    original = conv.weight.detach().clone()
    x = torch.randn(batch, 4, side, side)
    with torch.no_grad():
        out = conv(x)
    assert _held_packed_only(conv)
    return conv, original, x, out


def test_training_after_sampling_brings_the_weight_back() -> None:
    frozen, original, x, _ = _run_frozen_conv(2, 5)
    xg = x.clone().requires_grad_(True)
    out = frozen(xg)  # differentiated: the plain path, on the plain weight
    out.square().sum().backward()
    xr = x.clone().requires_grad_(True)
    F.conv2d(xr, original, frozen.bias, padding=1).square().sum().backward()
    assert torch.equal(xg.grad, xr.grad) and not _held_packed_only(frozen)
    assert "_onednn_packed" not in frozen.__dict__


def test_a_unet_holds_its_convolution_weights_once(make_small_unet) -> None:
    """After one inference call every convolution of the UNet holds its weight only packed; its state dict is the
    same, and compiling it afterwards traces the plain weights."""
    unet = make_small_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 5, 16)
    with torch.inference_mode():
        with onednn_kernels(False):
            want = unet(x, t, context=ctx)
        got = unet(x, t, context=ctx)
    convs = [m for m in unet.modules() if isinstance(m, Conv2d)]
    assert convs and all(_held_packed_only(m) for m in convs)
    with torch.inference_mode():
        assert torch.equal(unet(x, t, context=ctx), got)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(unet, backend="eager", fullgraph=True)
        assert _rel(compiled(x, t, context=ctx), want) < 1e-5
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_let_go_are_handed_back_to_the_system(monkeypatch) -> None:
    """glibc keeps freed blocks below its mmap threshold (most bf16 weights) as resident memory until trimmed: past
    every ``_TRIM_EVERY`` bytes of weights let go, the heap is trimmed."""
    calls: list[int] = []
    monkeypatch.setattr(onednn, "_TRIM", calls.append)
    monkeypatch.setattr(onednn, "_TRIM_EVERY", 3 * 8 * 8 * 9 * 4)  # three of these weights
    monkeypatch.setattr(onednn, "_untrimmed", [0])
    torch.manual_seed(0)
    convs = [Conv2d(8, 8, 3, padding=1).requires_grad_(False) for _ in range(7)]
    with torch.no_grad():
        for conv in convs:
            conv(torch.randn(1, 8, 4, 4))
    assert all(_held_packed_only(c) for c in convs)
    assert calls == [0, 0] and onednn._untrimmed == [8 * 8 * 9 * 4]
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert callable(onednn._malloc_trim())  # the real trim is found where there is one
    else:
        assert onednn._malloc_trim() is None


def test_a_failed_read_back_keeps_the_packed_weight() -> None:
    """Bringing the plain weight back needs its memory again; where that fails, the packed copy stays the weight."""
    conv, original, x, want = _run_frozen_conv(1, 6)
    params = conv.__dict__["_parameters"]
    packed = params.packed

    class OutOfMemory:
        def to_dense(self) -> torch.Tensor:
            raise RuntimeError("DefaultCPUAllocator: not enough memory")

    params.packed = OutOfMemory()
    with pytest.raises(RuntimeError, match="not enough memory"):
        conv.state_dict()
    assert _held_packed_only(conv) and isinstance(params.packed, OutOfMemory)
    params.packed = packed
    with torch.no_grad():
        assert torch.equal(conv(x), want)
    assert torch.equal(conv.weight, original)
