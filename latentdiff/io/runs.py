"""Run folders: one training process per folder (``RUN/.lock``), and no fresh run over an old one.

``claim_run`` is held for the whole of ``Trainer.run`` (rank 0 only):

- It takes ``RUN/.lock``, created with ``O_CREAT | O_EXCL`` and holding the process id, host and start time. A
  second process on the folder is refused in one line naming the holder; a lock whose process no longer runs on
  this host (a killed run) is taken over with a warning. The lock is removed when the run ends, also on errors.
- A fresh run (no ``--resume``) into a folder that already holds a run (config.yaml, checkpoints, a log) is
  refused unless ``overwrite``; with it, the old run's files are deleted (after the lock is taken, before anything
  new is written: the new run never mixes with the old one, and the disk need not hold both).
- A folder the claim created is removed again when the run leaves nothing in it (a data error before any file).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from latentdiff.io.atomic import pid_alive, remove_path, remove_stale_temps, write_errors
from latentdiff.io.errors import RunLockedError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RUN_FILES = ("config.yaml", "checkpoints", "log.csv", "log.jsonl")  # any of these: the folder holds a run
_UNREADABLE_GRACE_S = 10.0  # a lock being written right now is briefly empty


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a training run."""
    return any(os.path.lexists(run_dir / name) for name in RUN_FILES)


def _read_lock(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _stale(lock: Path, holder: dict | None) -> bool:
    """Whether the lock's process is gone: it ran on this host and runs no more (or the lock is unreadable and
    older than a moment)."""
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > _UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    return holder.get("host") == socket.gethostname() and not pid_alive(holder["pid"])


def take_lock(run_dir: Path) -> Path:
    """Create ``run_dir/.lock`` for this process; a ``RunLockedError`` when another live process holds it."""
    lock = run_dir / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if not _stale(lock, holder):
                who = (f"process {holder['pid']} on {holder.get('host')} (since {holder.get('started')})"
                       if holder else "another process")
                raise RunLockedError(f"{run_dir} is in use by {who}; wait for it to end, or remove {lock} if that "
                                     "process is gone") from None
            logger.warning("taking over %s: its process %s is gone", lock,
                           holder["pid"] if holder else "(unknown)")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        return lock
    raise RunLockedError(f"{run_dir}: could not take {lock} (other processes keep taking it)")


def release_lock(lock: Path) -> None:
    """Remove ``lock`` when it is still this process's."""
    holder = _read_lock(lock)
    if holder is not None and holder["pid"] == os.getpid():
        lock.unlink(missing_ok=True)


def _clear_run(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but the lock (``--overwrite``)."""
    logger.warning("--overwrite: deleting the run in %s", run_dir)
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            remove_path(entry)


@contextmanager
def claim_run(run_dir: str | Path, resume: str | Path | None = None, overwrite: bool = False,
              main: bool = True) -> Iterator[None]:
    """Hold ``run_dir`` for a training run (see the module docstring); ``main``: only rank 0 claims."""
    if not main:
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    with write_errors(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = take_lock(run_dir)
    try:
        for folder in (run_dir, run_dir / "checkpoints"):  # what killed runs left half-written
            remove_stale_temps(folder, every=True)
        if resume is None and holds_run(run_dir):
            if not overwrite:
                raise FileExistsError(f"{run_dir} is not empty: continue it with --resume {run_dir}, or start again "
                                      "with --overwrite")
            _clear_run(run_dir)
        with write_errors(run_dir, writing=False):  # a full disk anywhere in the run: one line
            yield
    finally:
        release_lock(lock)
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()


__all__ = ["LOCK_NAME", "claim_run", "holds_run", "release_lock", "take_lock"]
