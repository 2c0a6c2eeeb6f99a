"""Our C kernels (``*.c`` beside this file): compiled on first use with the C compiler on the path, cached, loaded
through ctypes.

The compiler is ``$CC``, else ``cc``, ``gcc`` or ``clang``. The library goes to ``$LATENTDIFF_CACHE`` (default
``$XDG_CACHE_HOME/latentdiff``, ``~/.cache/latentdiff``)``/kernels``, named after the source and a hash of its text,
the compiler and the flags, so a changed source or another machine's flags never load a stale file. It is written
under a temporary name in that folder and renamed when complete: a second process building at the same moment never
loads half a file. Callers keep the loaded library (or ``None``: it cannot be had here) once per process and fall
back to PyTorch's operators with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

COMMON_FLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing"]


def cpu_flags() -> set[str]:
    """The processor's feature flags as Linux reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS_HERE = cpu_flags()
X86_64 = platform.machine() in ("x86_64", "AMD64")
AVX512 = X86_64 and {"avx512f", "avx512bw", "avx512vl", "fma"} <= FLAGS_HERE
AVX512_BF16 = AVX512 and "avx512_bf16" in FLAGS_HERE
AVX2 = X86_64 and {"avx2", "fma"} <= FLAGS_HERE


def vector_flags() -> list[str]:
    """Flags that let the compiler vectorise portable C for this processor (x86-64: AVX-512 or AVX2 with FMA)."""
    if AVX512:
        return ["-mavx512f", "-mavx512vl", "-mfma"]
    if AVX2:
        return ["-mavx2", "-mfma"]
    return []


def cache_dir() -> Path:
    root = os.environ.get("LATENTDIFF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "latentdiff")
    return Path(root) / "kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(compiler: str, source: Path, flags: list[str], target: Path) -> None:
    """Compile ``source`` into ``target``: a temporary file in the same folder, renamed when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(source: Path, flags: list[str], compiler: str, declare: Callable[[ctypes.CDLL], None],
         builder: Callable[[str, Path, list[str], Path], None] = build) -> ctypes.CDLL:
    """The library built from ``source`` (built now if the cache has no copy), its functions typed by ``declare``.
    Raises OSError or SubprocessError where it cannot be built or loaded."""
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        builder(compiler, source, flags, target)
    lib = ctypes.CDLL(str(target))
    declare(lib)
    return lib


def load_once(cache: list[ctypes.CDLL | None], source: Path, flags: list[str], compiler: Callable[[], str | None],
              declare: Callable[[ctypes.CDLL], None], builder: Callable[[str, Path, list[str], Path], None],
              logger: logging.Logger, what: str, fallback: str) -> ctypes.CDLL | None:
    """The library in ``cache`` (a kernel module's one-element list), else ``load``-ed now and kept there: or None,
    with one warning (``what`` could not be had: ``fallback`` happens instead), where there is no compiler or the
    build or load fails. Looked for once per process (per ``cache``)."""
    if cache:
        return cache[0]
    lib = None
    found = compiler()
    if found is None:
        logger.warning("no C compiler (cc, gcc, clang or $CC) on the path: %s", fallback)
    else:
        try:
            lib = load(source, flags, found, declare, builder)
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("%s could not be built or loaded (%s): %s", what, e, fallback)
    cache.append(lib)
    return lib


@contextmanager
def switched(setting: ContextVar[bool], enabled: bool) -> Iterator[None]:
    """Within the block, ``setting`` (a kernel's on/off switch) is ``enabled``."""
    token = setting.set(enabled)
    try:
        yield
    finally:
        setting.reset(token)
