"""Convolutions and linears through oneDNN for inference on CPUs: the same numbers, in less time.

``Conv2d`` and ``Linear`` are ``torch.nn``'s layers with the same parameters, state-dict names and training
behaviour; every model of this package is built from them. When a forward needs no gradient and runs on a CPU in
float32 or bfloat16, they call oneDNN directly:

- ``Conv2d`` reorders its weight once into the blocked layout oneDNN computes in (chosen for the first input's
  shape) and keeps it until the weight changes, instead of reordering it at every call as ``F.conv2d`` does. That
  reorder is what makes the small feature maps of a UNet's deep levels slow: on the 2-core AVX-512 machine a 3x3
  1280-channel convolution on 8x8 pixels runs at 92 GFLOP/s through ``F.conv2d`` and at 222 with the packed weight
  (``benchmarks/cpu_kernels.py``).
  Weights are held once: where nothing else refers to a frozen weight (no other tensor on its memory, no other
  reference to the parameter), the plain copy is let go once packed, and the packed copy is the only one. Any read
  of the weight (the attribute, ``parameters()``, ``state_dict()``, ``load_state_dict()``, ``.to()``, pickling, a
  forward with gradients) first brings the plain weight back, bit for bit, from the packed one; the next inference
  call lets it go again. An in-place change of the weight, ``.to()``, a new state dict or LoRA merge packs it again
  on the next call; a forward with gradients, training again, lets the packed copy go. Weights that something else
  holds keep both copies (the memory of the weight once more); where less than two copies plus 1 GiB is available
  (``MemAvailable``), the weight stays unpacked and a warning says so once.
- ``Linear`` calls oneDNN's matrix product instead of MKL's ``addmm`` (fp32: 132-216 GFLOP/s against 120-180 for
  the UNet's shapes, ``benchmarks/cpu_kernels.py``), on the weight as it is, without a second copy.

Both compute the same products in another order: outputs differ from the plain layers by float rounding (relative
1e-6 in fp32). Gradients, autocast, tracing/export/``torch.compile`` and other devices take the plain path.
``onednn_kernels(False)`` (a context manager) or ``LATENTDIFF_ONEDNN=0`` in the environment switch the fast path
off, to compare or to debug; ``onednn_kernels(True, pack=False)`` or ``LATENTDIFF_ONEDNN=nopack`` keep oneDNN but
not the packed copies (slower); ``onednn_kernels(True, once=False)`` or ``LATENTDIFF_ONEDNN=keep`` keep the plain
weights beside the packed ones (the memory of the convolution weights twice, for code that reads them behind
``torch.nn``'s back).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from latentdiff.device import memory_available
from latentdiff.nn import winograd

_SETTING = os.environ.get("LATENTDIFF_ONEDNN", "1").strip().lower()
if _SETTING not in ("0", "1", "keep", "nopack"):
    raise ImportError(f"LATENTDIFF_ONEDNN must be 1 (oneDNN kernels, convolution weights held once, packed), keep "
                      f"(the plain convolution weights kept beside the packed ones), nopack (oneDNN kernels on the "
                      f"weights as they are) or 0 (PyTorch's plain kernels), not {_SETTING!r}")
_ENABLED: ContextVar[bool] = ContextVar("latentdiff_onednn", default=_SETTING != "0")
_PACK: ContextVar[bool] = ContextVar("latentdiff_onednn_pack", default=_SETTING in ("1", "keep"))
_ONCE: ContextVar[bool] = ContextVar("latentdiff_onednn_once", default=_SETTING == "1")
_AVAILABLE = torch.backends.mkldnn.is_available()
_BF16 = _AVAILABLE and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
_CACHE = "_onednn_packed"
_RESERVE = 1 << 30  # packing leaves at least this much memory available (bytes), besides the copy it makes
_NOTED: set[str] = set()  # the warnings given in this process (each once)
_TRIM_EVERY = 64 << 20  # bytes of weights let go between two trims of the C heap
_untrimmed = [0]  # bytes let go since the last trim
logger = logging.getLogger(__name__)


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None (another C library). glibc keeps freed blocks under its mmap threshold
    (up to 32 MB: most bf16 weights) in its heap, where they still count as resident memory until trimmed."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


_TRIM = _malloc_trim()


def _let_go(nbytes: int) -> None:
    """Account for ``nbytes`` freed; every ``_TRIM_EVERY`` of them, hand the C heap's free pages back."""
    _untrimmed[0] += nbytes
    if _untrimmed[0] >= _TRIM_EVERY and _TRIM is not None:
        _untrimmed[0] = 0
        _TRIM(0)


def _warn_once(what: str, message: str, *args: object) -> None:
    if what not in _NOTED:
        _NOTED.add(what)
        logger.warning(message, *args)


@contextmanager
def onednn_kernels(enabled: bool, pack: bool = True, once: bool = True) -> Iterator[None]:
    """Within the block, ``Conv2d`` and ``Linear`` use oneDNN's kernels (True) or only PyTorch's plain ones; with
    ``pack=False`` convolutions use their weights as they are (no second copy, slower on small feature maps); with
    ``once=False`` the convolutions packed in the block keep their plain weights beside the packed ones."""
    tokens = _ENABLED.set(bool(enabled)), _PACK.set(bool(pack)), _ONCE.set(bool(once))
    try:
        yield
    finally:
        _ENABLED.reset(tokens[0])
        _PACK.reset(tokens[1])
        _ONCE.reset(tokens[2])


def onednn_active() -> bool:
    """Whether the oneDNN path is switched on here and this PyTorch has it."""
    return _AVAILABLE and _ENABLED.get()


def _fast(x: torch.Tensor, params: tuple[torch.Tensor | None, ...]) -> bool:
    """True where an inference call can take oneDNN's path: CPU, fp32/bf16 throughout, nothing to differentiate,
    no autocast, no tracing or compiling (those see the plain operators; the compiling check comes first, so that
    ``torch.compile`` traces none of the rest)."""
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return False
    if not onednn_active() or type(x) is not torch.Tensor or x.device.type != "cpu":
        return False
    if x.dtype is not torch.float32 and not (x.dtype is torch.bfloat16 and _BF16):
        return False
    if x.layout is not torch.strided or x.numel() == 0:
        return False
    for p in params:  # plain tensors only: subclasses (FSDP's, quantised ones) keep their own dispatch
        if p is not None and (type(p) not in (torch.Tensor, nn.Parameter) or p.dtype is not x.dtype
                              or p.device.type != "cpu"):
            return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return False
    return not (torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.jit.is_scripting())


class Linear(nn.Linear):
    """``nn.Linear`` whose inference forward on a CPU runs oneDNN's matrix product (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and _fast(x, (self.weight, self.bias)):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)


class _PackedOnly(dict):
    """A ``Conv2d``'s ``_parameters`` while its weight is held only in oneDNN's packed layout (the entry holds a
    meta-device stand-in). Whatever reads the weight through ``torch.nn`` (the attribute, ``parameters()``,
    ``state_dict()``, ``load_state_dict()``, assignment, copying) first gets the plain weight back, bit for bit, and
    the layer its plain dict: ``torch.nn.Module`` reaches its parameters only through these methods."""

    def __init__(self, owner: Conv2d, packed: torch.Tensor) -> None:
        super().__init__(owner.__dict__["_parameters"])
        self.owner = weakref.ref(owner)
        self.packed: torch.Tensor | None = packed

    def restore(self) -> None:
        packed = self.packed
        if packed is None:
            return
        stand_in = dict.__getitem__(self, "weight")
        with torch.inference_mode(False), torch.no_grad():  # a failure here (out of memory) keeps the packed copy
            dense = packed.to_dense().reshape(stand_in.shape)  # a reorder back: the same numbers
            if dense.stride() != stand_in.stride():
                dense = torch.empty_strided(stand_in.shape, stand_in.stride(), dtype=dense.dtype).copy_(dense)
            weight = nn.Parameter(dense, requires_grad=False)
        self.packed = None
        dict.__setitem__(self, "weight", weight)
        owner = self.owner()
        if owner is not None and owner.__dict__.get("_parameters") is self:
            owner.__dict__["_parameters"] = dict(self)
            cached = owner.__dict__.get(_CACHE)
            if cached is not None and cached[1] is packed:  # the packed copy is still this weight's
                owner.__dict__[_CACHE] = ((weight.data_ptr(), weight._version, weight.dtype), packed)

    def __getitem__(self, name: str) -> Any:
        if name == "weight":
            self.restore()
        return dict.__getitem__(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default

    def __reduce_ex__(self, protocol: Any) -> Any:  # copies and pickles are plain dicts of plain weights
        return dict, (dict(self.items()),)


def _restoring(name: str) -> Any:
    base = getattr(dict, name)

    def method(self: _PackedOnly, *args: Any, **kwargs: Any) -> Any:
        self.restore()
        return base(self, *args, **kwargs)

    method.__name__ = name
    return method


for _name in ("items", "values", "copy", "pop", "popitem", "setdefault", "update", "__setitem__", "__delitem__",
              "__or__", "__ior__", "__eq__", "__repr__"):
    setattr(_PackedOnly, _name, _restoring(_name))


def _only_the_layer_holds(params: dict[str, Any]) -> bool:
    """Whether the weight in ``params`` is frozen, nothing but that dict refers to it and nothing else uses its
    memory (no views, no state-dict tensors, no optimiser): then letting it go loses nothing."""
    weight = params.get("weight")
    if type(weight) is not nn.Parameter or weight.requires_grad or weight.is_inference():
        return False
    if sys.getrefcount(weight) != 3:  # the dict, the name ``weight`` and the call's argument
        return False
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count is not None and use_count(weight.untyped_storage()._cdata) == 2  # the parameter, this query


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose inference forward on a CPU runs oneDNN on a weight packed once and, where nothing else
    holds it, held once (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # first: dynamo traces none of the rest
            return super().forward(x)
        params = self.__dict__["_parameters"]
        if type(params) is _PackedOnly:  # the weight is held only packed
            packed = params.packed
            bias = dict.__getitem__(params, "bias")
            if (packed is not None and x.dim() == 4 and x.dtype is packed.dtype and self.padding_mode == "zeros"
                    and _PACK.get() and _fast(x, (bias,)) and not winograd.applies(self, x)):
                return self._convolve(x, packed, bias)
            params.restore()  # any other path needs the plain weight
        if (x.dim() == 4 and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and _fast(x, (self.weight, self.bias))):
            if winograd.applies(self, x):  # transforms the plain weight at each call: no packed copy to hold
                self.__dict__.pop(_CACHE, None)
                return winograd.convolve(x, self.weight, self.bias)
            return self._convolve(x, self._packed(x), self.bias)
        if torch.is_grad_enabled() and _CACHE in self.__dict__:
            # training again (after sampling between steps): the weight will change, its packed copy only holds memory
            del self.__dict__[_CACHE]
        return super().forward(x)

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, list(self.padding), list(self.stride), list(self.dilation), self.groups, "none", [], "")

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in oneDNN's layout, packed again only when the weight tensor or its contents changed; the
        plain weight is then let go where nothing else holds it. Weights made under ``torch.inference_mode`` have no
        version counter to tell a change: they are used as they are, unpacked (build models outside it, as the
        pipelines do, and run them inside it)."""
        w = self.weight
        if not _PACK.get():
            return w
        if w.is_inference():
            _warn_once("inference", "convolution weights made under torch.inference_mode() stay unpacked (slower): "
                       "build or load the model outside it and run it inside it")
            return w
        key = (w.data_ptr(), w._version, w.dtype)
        cached = self.__dict__.get(_CACHE)
        if cached is None or cached[0] != key:
            self.__dict__[_CACHE] = None  # free the stale copy before making the new one
            available = memory_available()
            if available is not None and available < 2 * w.numel() * w.element_size() + _RESERVE:
                _warn_once("memory", "little memory left (%d MB available): convolution weights stay unpacked "
                           "from here on (slower, no second copy)", available >> 20)
                self.__dict__[_CACHE] = (key, None)  # decided for this weight: no re-check at every call
                return w
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
            self.__dict__[_CACHE] = cached = (key, packed)
        if cached[1] is None:
            return w
        del w
        if _ONCE.get() and _only_the_layer_holds(self.__dict__["_parameters"]):
            _let_go(self._hold_packed_only(cached[1]))
        return cached[1]

    def _hold_packed_only(self, packed: torch.Tensor) -> int:
        """Let the plain weight go (its bytes are returned): a meta-device stand-in takes its place until something
        reads it."""
        params = _PackedOnly(self, packed)
        weight = dict.__getitem__(params, "weight")
        with torch.inference_mode(False):
            stand_in = torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype, device="meta")
        dict.__setitem__(params, "weight", nn.Parameter(stand_in, requires_grad=False))
        self.__dict__["_parameters"] = params
        return weight.numel() * weight.element_size()

    def _restore_weight(self) -> None:
        params = self.__dict__.get("_parameters")
        if type(params) is _PackedOnly:
            params.restore()

    def _apply(self, fn: Any, recurse: bool = True) -> Conv2d:
        self._restore_weight()
        self.__dict__.pop(_CACHE, None)  # .to(), .float(), .share_memory(): the packed copy would be stale
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # oneDNN's opaque tensors neither pickle nor deep-copy; the copy packs its own weight when it runs.
        self._restore_weight()
        state = dict(super().__getstate__())
        state.pop(_CACHE, None)
        return state
