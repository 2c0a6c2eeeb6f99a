"""The webdataset tar format: shard lists from patterns, samples from tar headers, and writing shards.

A shard is a plain tar file; a sample is a run of consecutive members sharing a key, the member name up to the first
dot of its base name (``000123.png`` + ``000123.txt`` [+ ``000123.json``] is the sample ``000123`` with the
extensions ``png``, ``txt`` and ``json``, lower-cased), as webdataset groups them. Reading needs only the standard
library: the headers give each member's offset and size, so a reader can skip samples without reading their bytes.

Shard lists (``expand_shards``): a path, a brace pattern (``data-{000000..000099}.tar``: the numbers keep the zero
padding of the first; ``{a,b}`` alternatives too), a glob (``data-*.tar``), a folder (its ``.tar`` files), or
several of these joined by ``::`` (webdataset's separator) or given as a list.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class ShardError(ValueError):
    """A shard list or a shard that cannot be read (reported in one line)."""


def _expand_braces(pattern: str) -> list[str]:
    """Every string a brace pattern stands for, in order: ``{000..002}`` -> 000, 001, 002; ``{a,b}`` -> a, b."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numbers = _RANGE.match(body)
    if numbers is not None:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise ShardError(f"the range {{{body}}} in {pattern!r} runs backwards")
        width = len(first) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in _expand_braces(head + choice + tail)]


def _expand_one(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.tar"))
        if not found:
            raise ShardError(f"the folder {pattern!r} holds no .tar shards")
        return found
    if glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise ShardError(f"no shard matches {pattern!r}")
        return found
    return [Path(p).expanduser() for p in _expand_braces(pattern)]


def expand_shards(spec: str | Sequence[str]) -> list[Path]:
    """The shard files a spec names (see the module docstring), checked to exist, in the spec's order."""
    patterns = [p.strip() for p in (spec.split("::") if isinstance(spec, str) else spec) if p.strip()]
    if not patterns:
        raise ShardError("no shards given: data.shards is empty")
    shards = [path for pattern in patterns for path in _expand_one(pattern)]
    missing = [str(path) for path in shards if not path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardError(f"shard {missing[0]!r} does not exist{more}")
    return shards


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name, webdataset's way; None for names without an extension."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


@dataclass
class TarSample:
    """One sample's members: extension -> (offset of the data in the shard, size); ``data`` once read."""

    key: str
    members: dict[str, tuple[int, int]]
    data: dict[str, bytes] | None = None

    def read(self, file: io.BufferedReader) -> dict[str, bytes]:
        """The members' bytes (read once, from the open shard ``file``)."""
        if self.data is None:
            data = {}
            for ext, (offset, size) in self.members.items():
                file.seek(offset)
                data[ext] = file.read(size)
            self.data = data
        return self.data


def tar_samples(path: Path) -> Iterator[TarSample]:
    """The samples of a shard in member order, from its headers only (no member data is read)."""
    try:
        with tarfile.open(path, "r:") as tar:
            key, members = None, {}
            for info in tar:
                parts = split_key(info.name) if info.isfile() else None
                if parts is None or os.path.basename(info.name).startswith("__"):
                    continue  # folders, links and webdataset's __meta__ files are not sample members
                if parts[0] != key:
                    if members:
                        yield TarSample(key, members)
                    key, members = parts[0], {}
                members[parts[1]] = (info.offset_data, info.size)
            if members:
                yield TarSample(key, members)
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"cannot read the shard {path}: {e}") from e


class ShardWriter:
    """Writes samples into numbered shards ``folder/prefix-000000.tar``, ... under temporary names, a new shard when
    the next sample would pass ``max_count`` samples or ``max_bytes``; ``finish`` renames them all into place."""

    def __init__(self, folder: Path, max_count: int, max_bytes: int, prefix: str = "data") -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"a shard must hold a sample: got max count {max_count}, max size {max_bytes} bytes")
        self.folder, self.max_count, self.max_bytes, self.prefix = folder, max_count, max_bytes, prefix
        self.written: list[Path] = []  # the temporary files, in shard order
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def final_name(self, index: int) -> Path:
        return self.folder / f"{self.prefix}-{index:06d}.tar"

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: ``members`` maps an extension (``png``, ``txt``) to the bytes of ``key.extension``."""
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())  # headers + padded data
        if self._tar is None or self._count >= self.max_count or (self._count and self._bytes + size > self.max_bytes):
            self._open_next()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed times: the same folder, the same bytes
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def _open_next(self) -> None:
        self._close()
        path = self.final_name(len(self.written))
        tmp = path.with_name(f".{path.name}.tmp")
        self.written.append(tmp)
        self._tar = tarfile.open(tmp, "w")
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def finish(self) -> list[Path]:
        """Close the last shard and rename every shard to its final name; returns the final names."""
        self._close()
        finals = [self.final_name(i) for i in range(len(self.written))]
        for tmp, final in zip(self.written, finals, strict=True):
            os.replace(tmp, final)
        return finals

    def abort(self) -> None:
        """Remove what was written (an interrupted run leaves no partial shard set)."""
        self._close()
        for tmp in self.written:
            tmp.unlink(missing_ok=True)


def shard_pattern(paths: Sequence[Path]) -> str:
    """The brace pattern of numbered shards ``ShardWriter`` wrote (a single path for one shard)."""
    if len(paths) == 1:
        return str(paths[0])
    first, last = paths[0], paths[-1]
    head, number = first.stem.rsplit("-", 1)
    return str(first.with_name(f"{head}-{{{number}..{last.stem.rsplit('-', 1)[1]}}}.tar"))


__all__ = ["ShardError", "ShardWriter", "TarSample", "expand_shards", "shard_pattern",
           "split_key", "tar_samples"]
