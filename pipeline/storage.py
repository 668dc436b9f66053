"""Where shards live: local paths or fsspec URLs (s3://, gs://, http://), behind two small functions.

Local paths use plain file I/O (no fsspec import on the hot path); anything with a scheme goes through
fsspec, so the same loader streams from object storage.
"""

from __future__ import annotations

import os


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    if base.startswith("file://"):
        base = base[len("file://"):]
    return os.path.join(base, *parts)


def read_bytes(location: str) -> bytes:
    if is_url(location):
        import fsspec

        with fsspec.open(location, "rb") as f:
            return f.read()
    with open(location, "rb") as f:
        return f.read()
