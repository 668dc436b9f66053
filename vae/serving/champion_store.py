"""The champion record's compare-and-swap, one store per kind of registry location (torch-free); the same stores
hold the registry's other small records (aliases, a version's notes: `record_store`).

A promoter reads the record and a token, decides (slow work such as re-evaluating the champion happens then,
outside any lock), and writes only if the token is unchanged; otherwise it reads and decides again
(`vae.serving.promotion`). The swap is a file lock (`fcntl.flock`) around read-compare-rename on local disks, a
conditional PUT (`If-Match` on the ETag, `If-None-Match: *` for the first champion) on S3, and a process lock
for `memory://` (tests). Other URL schemes can be read (`vae_runtime.registry.read_champion`) but not promoted into.
`remove(token)` deletes a record the same way (on S3: a check, then the delete).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from vae_runtime import storage
from vae_runtime.atomic import atomic_write_bytes
from vae_runtime.registry import CHAMPION, RegistryError, parse_champion, project_dir
from vae.serving.versions import create_if_absent


class _LocalRecord:
    """A record on a local disk: the swap holds an exclusive `flock` on a lock file beside it."""

    def __init__(self, path: str, parse, lock: str):
        self.path, self.parse = Path(path), parse
        self.folder = self.path.parent
        self.lock = self.folder / lock

    def read(self) -> tuple[dict | None, bytes | None]:
        try:
            data = storage.read_capped(self.path, "json")
        except FileNotFoundError:
            return None, None
        return self.parse(data, self.path), data

    def swap(self, token: bytes | None, data: bytes | None) -> bool:
        """Write `data` (None: delete the record) if the record is still `token`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
            current = storage.read_capped(self.path, "json") if self.path.exists() else None
            if current != token:
                return False
            if data is None:
                self.path.unlink()
            else:
                atomic_write_bytes(self.path, data)
            return True

    def remove(self, token: bytes) -> bool:
        return self.swap(token, None)


class _S3Record:
    """A record on S3: conditional PUTs on its ETag (S3 has had them since 2024)."""

    def __init__(self, url: str, parse):
        self.url, self.parse = url, parse

    def read(self) -> tuple[dict | None, str | None]:
        data, etag = storage.read_versioned(self.url)  # the body and the ETag of that same object
        return (None, None) if data is None else (self.parse(data, self.url), etag)

    def swap(self, token: str | None, data: bytes) -> bool:
        if token is None:
            return create_if_absent(self.url, data)
        return storage.replace_if_unchanged(self.url, token, data)  # a PUT with If-Match on the ETag

    def remove(self, token) -> bool:
        return storage.remove_if_unchanged(self.url, token)


class _MemoryRecord(_S3Record):
    """A record on fsspec's in-process `memory://` file system: a process lock is the whole story (the token is the
    bytes read, compared and written under the lock by `storage.replace_if_unchanged`)."""

    def read(self) -> tuple[dict | None, bytes | None]:
        try:
            data = storage.read_capped(self.url, "json")
        except FileNotFoundError:
            return None, None
        return self.parse(data, self.url), data


def champion_store(registry: str | os.PathLike):
    """The champion record's read/compare-and-swap for this registry location."""
    return record_store(registry, storage.join(project_dir(registry), CHAMPION), parse_champion, ".champion.lock")


def record_store(registry: str | os.PathLike, where: str, parse, lock: str | None = None):
    """The read/compare-and-swap/remove of the record at `where` in this registry, parsed by `parse(data, where)`;
    locally the swaps take turns on `lock` (a file beside it; default `.<name>.lock`)."""
    location = str(registry)
    if not storage.is_url(location):
        return _LocalRecord(where, parse, lock or f".{os.path.basename(where)}.lock")
    scheme = location.split("://", 1)[0]
    if scheme in ("s3", "s3a"):
        return _S3Record(where, parse)
    if scheme == "memory":
        return _MemoryRecord(where, parse)
    raise RegistryError(f"registry {location}: promotion needs conditional writes (a local path, s3:// or "
                        f"memory://); {scheme}:// can be read but not promoted into")
