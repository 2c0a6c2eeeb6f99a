"""Atomic writes: every file and folder latentdiff writes appears complete or not at all.

A file is written to a temporary name in its own folder (``.NAME.tmp-<pid>-<n>``), flushed to disk (``fsync``) and
renamed over ``NAME`` (``os.replace``, atomic on POSIX); a folder is built as ``NAME.tmp-<pid>`` beside it and
renamed into place. On any error the temporary is removed; after a ``kill -9`` it is left, and the next write of
the same ``NAME`` removes the temporaries of processes that no longer run. A full disk, an exceeded quota or a
read-only file system (also as safetensors' ``SafetensorError`` or torch's ``[enforce fail at
inline_container.cc]``, which carry no errno) ends in one ``WriteError`` naming the path.

An existing folder is replaced only when asked (``overwrite``): the old one is moved aside, the new one renamed
into place, the old one deleted, so a crash leaves either the old folder, the new one, or neither beside a
``NAME.tmp-`` / ``NAME.old-`` folder the next write clears. This module imports nothing of latentdiff but its errors.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from latentdiff.io.errors import WriteError

_REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system"}
# The same conditions in the text of errors that carry no errno (safetensors' Rust I/O errors, torch's writer).
_REASON_TEXTS = {"disk full": ("No space left on device", "os error 28", "StorageFull"),
                 "disk quota exceeded": ("Disk quota exceeded", "os error 122"),
                 "read-only file system": ("Read-only file system", "os error 30")}
_TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter failed")
_LOW_SPACE = 1 << 20  # torch says only "unexpected pos": less free than this on the file system means a full disk
_TEMP = re.compile(r"\.?(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-\d+)?")
_counter = itertools.count()


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(error: BaseException, path: Path, writing: bool) -> str | None:
    """What ``error`` says went wrong writing ``path`` when it is a condition of the disk, else None; with
    ``writing`` (the block only writes) also a folder in the way and torch's writer failing."""
    if isinstance(error, OSError) and error.errno in _REASONS:
        return _REASONS[error.errno]
    text = str(error)
    for reason, needles in _REASON_TEXTS.items():
        if any(needle in text for needle in needles):
            return reason
    if not writing:
        return None
    if isinstance(error, IsADirectoryError) or (isinstance(error, OSError) and error.errno == errno.EISDIR):
        return "a folder is in the way"
    if isinstance(error, RuntimeError) and any(needle in text for needle in _TORCH_WRITE_FAILED):
        if "Is a directory" in text:
            return "a folder is in the way"
        try:
            stats = os.statvfs(path.parent if path.parent.exists() else ".")
            full = stats.f_bavail * stats.f_frsize < _LOW_SPACE
        except OSError:
            full = False
        return "disk full" if full else f"torch failed ({text.splitlines()[0]})"
    return None


@contextmanager
def write_errors(path: str | os.PathLike[str], writing: bool = True) -> Iterator[None]:
    """Within the block, a full disk, exceeded quota or read-only file system becomes one ``WriteError`` naming
    ``path``; so do a folder in the way and torch's failed writes when the block only ``writing`` (not around
    code that also reads). Other errors pass unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        reason = _reason(e, Path(path), writing)
        if reason is None:
            raise
        raise WriteError(f"{reason} while writing {path}") from e


def remove_path(path: Path) -> None:
    """Delete a file, link or folder (with what is in it); nothing when absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(path: str | os.PathLike[str], every: bool = False) -> list[Path]:
    """Remove the temporaries that killed processes left while writing ``path`` (``.NAME.tmp-<pid>-<n>`` files,
    ``NAME.tmp-<pid>`` / ``NAME.old-<pid>`` folders of processes no longer running); with ``every``, those of
    everything in the folder ``path``. Returns what was removed."""
    path = Path(path)
    folder, name = (path, None) if every else (path.parent, path.name)
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else []:
        match = _TEMP.fullmatch(entry.name)
        if match and (name is None or match["name"] == name):
            pid = int(match["pid"])
            if pid != os.getpid() and not pid_alive(pid):
                remove_path(entry)
                removed.append(entry)
    return removed


_CLEANED_FOLDERS: set[Path] = set()  # folders this process has swept of dead processes' temporaries


def _clean_folder_once(folder: Path) -> None:
    """``remove_stale_temps`` over the whole of ``folder``, the first time this process writes into it (not on every
    write: a run of many files into one folder would list it once per file)."""
    key = folder.resolve()
    if key not in _CLEANED_FOLDERS:
        remove_stale_temps(folder, every=True)
        _CLEANED_FOLDERS.add(key)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; when the block ends without error it is flushed and
    renamed over ``path`` (an existing file is replaced), else removed. Parent folders are created."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_counter)}")
    try:
        with write_errors(path):
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            _clean_folder_once(path.parent)
            yield temp
            _fsync(temp)
            os.replace(temp, path)
            _fsync(path.parent)
    finally:
        if os.path.lexists(temp):
            temp.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return write_bytes(path, text.encode("utf-8"))


def is_occupied(path: Path) -> bool:
    """Whether writing ``path`` would replace something: a file, or a folder with anything in it."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return os.path.lexists(path)


def check_destination(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse (``FileExistsError``) to replace an existing file or non-empty folder unless ``overwrite``."""
    path = Path(path)
    if not overwrite and is_occupied(path):
        raise FileExistsError(f"{path} already exists: give --overwrite to replace it")


@contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A path to write ``path``'s new content to (a file or a folder, as the writer makes it), inside a temporary
    folder ``NAME.tmp-<pid>`` beside ``path``; when the block ends without error it is flushed and renamed to
    ``path``, else removed. An existing ``path`` (a file, or a folder with anything in it) is refused unless
    ``overwrite``; then it is moved aside, the new one renamed into place and the old one deleted, so no file of
    an old folder survives in the new one."""
    path = Path(path)
    check_destination(path, overwrite)
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            _clean_folder_once(path.parent)
            remove_path(staging)
            staging.mkdir()
            yield staging / path.name
            _fsync_tree(staging)
            _swap_in(staging / path.name, path)
    finally:
        remove_path(staging)


@contextmanager
def atomic_folder(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """``atomic_output`` for a folder: the path it yields is an empty folder to fill."""
    with atomic_output(path, overwrite) as folder:
        folder.mkdir()
        yield folder


def _swap_in(new: Path, path: Path) -> None:
    """Rename ``new`` (a file or folder) to ``path``; what is at ``path`` is moved aside first and deleted after."""
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    had_old = os.path.lexists(path)
    if not os.path.lexists(new):
        raise FileNotFoundError(f"nothing was written to {path}")
    if had_old:
        remove_path(old)
        os.replace(path, old)
    os.replace(new, path)
    _fsync(path.parent)
    if had_old:
        remove_path(old)


__all__ = ["atomic_folder", "atomic_output", "atomic_path", "check_destination", "is_occupied", "pid_alive",
           "remove_path", "remove_stale_temps", "write_bytes", "write_errors", "write_text"]
