"""``latentdiff make-shards``: a folder of images (and their captions) into webdataset tar shards."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from latentdiff.cli import args as checked
from latentdiff.data.captioned import FolderCaptions
from latentdiff.data.datasets import scan_image_folder
from latentdiff.data.image_files import open_checked
from latentdiff.data.webdataset import ShardWriter, shard_pattern
from latentdiff.io.atomic import write_errors

logger = logging.getLogger(__name__)

MAKE_SHARDS_TEXT = ("Pack every readable image under FOLDER (recursively) and its caption into tar shards "
                    "OUT/data-000000.tar, ... (webdataset's layout: 000000042.png + 000000042.txt + 000000042.json "
                    "with the source path). Captions are read as data.path reads them: IMAGE.txt beside the image, "
                    "or a metadata.jsonl / metadata.csv with the columns file_name and text (the metadata wins). "
                    "Train on them with data.shards=OUT.")


def _readable(path: Path) -> bytes | None:
    """The file's bytes when it decodes as an image (fully: a truncated file fails here, not in training)."""
    try:
        data = path.read_bytes()
        with open_checked(data, str(path)) as img:  # the pixel limit before decoding
            img.load()
    except Exception as e:  # whatever PIL raises for a bad file
        logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
        return None
    return data


def write_shards(folder: Path, out: Path, max_count: int, max_mb: float, overwrite: bool) -> list[Path]:
    """Every readable image under ``folder`` (recursively, sorted) with its caption (``data.path``'s rules: the
    metadata.jsonl / metadata.csv row, else IMAGE.txt; ``FolderCaptions``) as one sample (key: its number; ``json``:
    its path in the folder) in shards ``out/data-000000.tar``, ...; returns them."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder of images")
    old = sorted(out.glob("*.tar")) if out.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} shards: give --overwrite to replace them")
    images = scan_image_folder(folder)
    if not images:
        raise ValueError(f"no images found in {folder} (searched recursively)")
    captions = FolderCaptions(folder, images)  # a metadata file that cannot be read fails here, before any write
    with write_errors(out, writing=False):  # a full disk: one line naming the folder; no partial shard is left
        out.mkdir(parents=True, exist_ok=True)
        written, captioned, shards = _pack(images, folder, captions, ShardWriter(out, max_count, int(max_mb * 2**20)))
    for stale in sorted(set(old) - set(shards)):  # replaced: the new set must not pick up shards of the old one
        stale.unlink()
    logger.info("%d samples (%d with captions, %d unreadable images skipped) in %d shards", written, captioned,
                len(images) - written, len(shards))
    if captions.disagreeing:
        logger.warning("%d images captioned both by metadata and .txt differently: the metadata's caption kept",
                       captions.disagreeing)
    return shards


def _pack(images: list[Path], folder: Path, captions: FolderCaptions,
          writer: ShardWriter) -> tuple[int, int, list[Path]]:
    """Write the readable ``images`` (with ``captions``) through ``writer``; returns the samples written, how many
    had captions, and the shards (renamed into place only when all are complete)."""
    written = captioned = 0
    try:
        for path in images:
            data = _readable(path)
            if data is None:
                continue
            members = {path.suffix.lower().lstrip("."): data}
            caption = captions.caption(path)
            if caption is not None:
                members["txt"] = caption.encode()
                captioned += 1
            members["json"] = json.dumps({"file_name": path.relative_to(folder).as_posix()}).encode()
            writer.write(f"{written:09d}", members)
            written += 1
        if written == 0:
            raise ValueError(f"none of the {len(images)} images in {folder} could be read")
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return written, captioned, shards


def _make_shards(args: argparse.Namespace) -> None:
    if args.max_count < 1 or args.max_size <= 0:
        raise ValueError(f"--max-count must be >= 1 and --max-size > 0, got {args.max_count} and {args.max_size}")
    shards = write_shards(Path(args.folder), Path(args.out), args.max_count, args.max_size, args.overwrite)
    print(f"wrote {len(shards)} shards: data.shards={shard_pattern(shards)}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-shards", help="write a folder of captioned images as webdataset tar shards",
                       description=MAKE_SHARDS_TEXT)
    p.add_argument("folder", metavar="FOLDER",
                   help="a folder of images, captioned by IMAGE.txt files or a metadata.jsonl / metadata.csv")
    p.add_argument("out", metavar="OUT", help="the folder the shards are written to")
    p.add_argument("--max-count", type=checked.positive_int, default=10000,
                   help="samples per shard at most (default 10000)")
    p.add_argument("--max-size", type=checked.positive_float, default=1000.0, metavar="MB",
                   help="MB per shard at most (default 1000; a bigger single sample gets a shard of its own)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT")
    p.set_defaults(func=_make_shards)
