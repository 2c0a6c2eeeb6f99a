"""Device selection: the one place that names accelerator back-ends.

Everything else receives a ``torch.device`` and stays back-end agnostic, so every code path runs on the
CPU and on a GPU unchanged.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def select_device(name: str = "auto") -> torch.device:
    """Return the device for ``name``: "auto" picks a GPU when one is usable, else the CPU."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was requested but no CUDA GPU is available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def memory_available(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for new allocations on ``device``: the kernel's ``MemAvailable`` (/proc/meminfo) for the CPU, the
    driver's free memory for a CUDA GPU; None where neither says (another OS, another back-end)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def autocast_context(device: torch.device, precision: str):
    """An autocast context for ``precision`` in {"fp32", "bf16", "fp16"} on ``device``."""
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The loss scaler of ``precision``: enabled for fp16 only (its narrow exponent range underflows small
    gradients; bf16 has float32's range and needs none). torch's scaler works on CUDA and on the CPU (where fp16
    autocast runs, slowly: it is for testing); elsewhere it disables itself with a warning."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
