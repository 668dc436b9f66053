"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target.

Readers see either the old file or the new one, never a partial one, whatever kills the writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

UMASK = os.umask(0)
os.umask(UMASK)


@contextlib.contextmanager
def naming(path: str | os.PathLike):
    """An OSError raised inside without a file name names `path`: a write, flush or fsync on a file descriptor
    (a full disk, an I/O error) reports none, and one line must say which file or folder was being written."""
    try:
        yield
    except OSError as err:
        if not err.filename:
            err.filename = os.fspath(path)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Yield a temporary file beside `path`, renamed to `path` (after fsync) when the block ends without an error,
    removed when it does not. Lets a caller stream a large file, or several at once, line by line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with naming(path):
            os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the usual permissions
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[object], None], mode: str = "wb") -> Path:
    """Call `write(fileobj)` on a temporary file beside `path`, then rename it to `path`."""
    with atomic_file(path, mode) as f:
        write(f)
    return Path(path)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync the folder itself: the names created, renamed or removed in it are on disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        with naming(folder):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file in `folder` and the folder itself: its contents are on disk before it is renamed."""
    folder = Path(folder)
    for path in folder.iterdir():
        with open(path, "rb") as f, naming(path):
            os.fsync(f.fileno())
    fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")
