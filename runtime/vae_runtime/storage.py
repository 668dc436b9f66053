"""Where shards live: local paths or fsspec URLs (s3://, gs://, http://, memory://), behind a few small functions.

Local paths use plain file I/O (no fsspec import on the hot path); anything with a scheme goes through
fsspec, so the same writer and loader work on object storage.

Atomic writes: locally a temporary file beside the target (`.{name}.XXXX.tmp`), fsync, rename. On object
storage every object is written whole in one request (a PUT, or a multipart upload that only becomes visible
when completed), so a reader never sees a partial object and a killed writer leaves nothing behind.
Object-store credentials and endpoints come from the usual places (environment variables such as
`AWS_ENDPOINT_URL`, `~/.aws`, or fsspec's `FSSPEC_S3_*` configuration); nothing here names a provider.

Conditional writes (`create_if_absent`, `read_versioned`, `replace_if_unchanged`, `remove_if_unchanged`), which
the registry's claims and champion and the folder leases of `common.folder_lock` build on: `If-None-Match: *` and
`If-Match` on the ETag on S3; a process lock on `memory://` (it lives in this process: tests); elsewhere (gs://,
http://, local paths) a check then a write, which two writers racing can both pass.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

from vae_runtime import limits
from vae_runtime.atomic import atomic_write_bytes

# The names vae.atomic gives its temporary files: a dot, the target's name, a random part, `.tmp`.
_TEMP = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    location = str(location)
    return location[len("file://"):] if location.startswith("file://") else location


def join(base: str | os.PathLike, *parts: str) -> str:
    base = str(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(local_path(base), *parts)


HTTP_CONNECT_S, HTTP_READ_S = 30, 120  # a server that stops answering fails rather than hanging a reader


def filesystem(location: str):
    """(fsspec file system, path inside it) of a URL; over HTTP with connect and read timeouts."""
    from fsspec.core import url_to_fs  # lazy: local paths never load fsspec

    if location.split("://", 1)[0].lower() in ("http", "https"):
        import aiohttp  # the http extra: only http(s) locations need it

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=HTTP_CONNECT_S, sock_read=HTTP_READ_S)
        return url_to_fs(location, client_kwargs={"timeout": timeout})
    return url_to_fs(location)


def read_bytes(location: str) -> bytes:
    """The whole object or file; FileNotFoundError when it does not exist."""
    if is_url(location):
        fs, path = filesystem(location)
        return fs.cat_file(path)
    with open(local_path(location), "rb") as f:
        return f.read()


def read_capped(location: str | os.PathLike, cap: str, what: str | None = None) -> bytes:
    """`read_bytes` under the size cap `cap` of `vae_runtime.limits`: refused (`OverCap`, one line naming `what`,
    default the location) before reading where the size is known, and as soon as the read passes the cap."""
    location = str(location)
    what = what or location
    if not is_url(location):
        return limits.read_file(local_path(location), cap, what)
    fs, path = filesystem(location)
    # A ranged read of one byte past the cap: the store sends no more (opening a file object instead would ask
    # for its size first, and fsspec's HTTP filesystem reports any failure of that request as "not found").
    data = fs.cat_file(path, start=0, end=limits.cap_bytes(cap) + 1)
    limits.check_size(what, len(data), cap)
    return data


def exists(location: str) -> bool:
    if is_url(location):
        fs, path = filesystem(location)
        return fs.exists(path)
    return os.path.exists(local_path(location))


def is_dir(location: str) -> bool:
    if is_url(location):
        fs, path = filesystem(location)
        return fs.isdir(path)
    return os.path.isdir(local_path(location))


def parent(location: str) -> str:
    """The folder that holds `location` (a URL stays a URL)."""
    if is_url(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(local_path(location)))


def creatable(path: str | os.PathLike) -> tuple[bool, Path]:
    """Whether this process can create the local `path` (it may not exist yet): the nearest existing folder on
    its way is a folder it can write. Returns (answer, that nearest existing path)."""
    path = Path(local_path(path))
    nearest = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    return nearest.is_dir() and os.access(nearest, os.W_OK | os.X_OK), nearest


def list_files(folder: str) -> list[tuple[str, int]]:
    """Every file under `folder`, recursively: (path relative to it with '/' separators, size in bytes); a
    name that cannot be read (a dangling link, a link loop) has size -1, so callers can say why it is left out."""
    if is_url(folder):
        fs, path = filesystem(folder)
        prefix = path.rstrip("/") + "/"
        found = fs.find(path, detail=True)
        return [(name[len(prefix):], int(info.get("size") or 0)) for name, info in found.items()
                if name.startswith(prefix) and info.get("type", "file") == "file"]
    root = local_path(folder)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            try:
                size = os.path.getsize(path)
            except OSError:
                if not os.path.islink(path):  # deleted while listing: not there at all
                    continue
                size = -1  # a dangling link or a link loop
            files.append((os.path.relpath(path, root).replace(os.sep, "/"), size))
    return files


def open_binary(location: str):
    """A seekable binary file object for reading (object stores and HTTP read byte ranges on demand)."""
    if is_url(location):
        fs, path = filesystem(location)
        return fs.open(path, "rb")
    return open(local_path(location), "rb")


def put_file(local: str | os.PathLike, location: str) -> None:
    """Copy a local file to `location` (a URL: one upload; a local path: an atomic copy)."""
    if is_url(location):
        fs, path = filesystem(location)
        fs.put_file(str(local), path)
        return
    with open(local, "rb") as f:
        atomic_write_bytes(local_path(location), f.read())


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Write `data` so that readers see the old content or the new one, never a part."""
    if is_url(location):
        fs, path = filesystem(location)
        fs.pipe_file(path, data)  # one whole object; visible only once complete
        return
    atomic_write_bytes(local_path(location), data)


def make_dirs(location: str) -> None:
    if not is_url(location):  # object stores have no folders
        os.makedirs(local_path(location), exist_ok=True)


def remove_stale_temps(folder: str, is_ours) -> list[str]:
    """Delete the temporary files that a killed writer left in `folder` (local only; object stores
    have none). `is_ours(target_name)` says which targets this writer owns; returns what was removed."""
    if is_url(folder) or not os.path.isdir(local_path(folder)):
        return []
    removed = []
    for entry in os.scandir(local_path(folder)):
        match = _TEMP.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and is_ours(match["target"]):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except FileNotFoundError:
                pass
    return removed


# ----------------------------------------------------------------------------------------------------------
# Conditional writes

MEMORY_LOCK = threading.Lock()  # memory:// lives in this process: holding this makes a check-and-write one step
LOST_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _scheme(location: str) -> str:
    return location.split("://", 1)[0].lower() if is_url(location) else ""


def lost_condition(err: OSError) -> bool:
    """Whether S3 refused a conditional write because another writer got there first. s3fs gives a failed
    precondition and an invalid argument (a store without conditional writes) the same errno, so the S3 error
    code is read from the cause where there is one."""
    response = getattr(err.__cause__, "response", None)
    code = (response or {}).get("Error", {}).get("Code") if isinstance(response, dict) else None
    if code:
        return str(code) in LOST_CODES
    text = str(err)
    return any(marker in text for marker in LOST_CODES) or "pre-condition" in text.lower()


def _s3_put(location: str, data: bytes, **condition) -> bool:
    """One conditional PUT: True if written, False if the condition failed (another writer got there first);
    any other failure (a store without conditional writes, a missing bucket) raises."""
    fs, path = filesystem(location)
    try:
        fs.pipe_file(path, data, **condition)
    except FileExistsError:
        return False
    except OSError as err:
        if lost_condition(err):
            return False
        raise
    finally:
        fs.invalidate_cache(path)
    return True


def create_if_absent(location: str, data: bytes) -> bool:
    """Write `location` only where nothing is: True if this call created it, False if something was there."""
    if _scheme(location) in ("s3", "s3a"):
        return _s3_put(location, data, mode="create")  # If-None-Match: *
    with _memory_lock(location):
        if exists(location):
            return False
        write_bytes_atomic(location, data)
        return True


def read_versioned(location: str, cap: str = "json") -> tuple[bytes | None, object]:
    """(the object's bytes, a token naming that version of it), or (None, None) where there is none; read under
    the size cap `cap` (the records read this way are small JSON). On S3 the token is the ETag, read before and
    after the body (both the same: the body is that object's); elsewhere the bytes themselves."""
    if _scheme(location) not in ("s3", "s3a"):
        try:
            data = read_capped(location, cap)
        except FileNotFoundError:
            return None, None
        return data, data
    fs, path = filesystem(location)

    def etag():
        try:
            return fs.info(path, refresh=True)["ETag"]
        except FileNotFoundError:
            return None

    for _ in range(10):
        before = etag()
        if before is None:
            return None, None
        try:
            data = read_capped(location, cap)
        except FileNotFoundError:
            continue
        if etag() == before:
            return data, before
    raise OSError(f"{location}: changed on every read")


def replace_if_unchanged(location: str, token, data: bytes) -> bool:
    """Write `data` only if the object is still the version `token` names (from `read_versioned`; None: only
    if there is none): True if written, False if another writer changed it first."""
    if token is None:
        return create_if_absent(location, data)
    if _scheme(location) in ("s3", "s3a"):
        return _s3_put(location, data, IfMatch=token)
    with _memory_lock(location):
        if read_versioned(location)[1] != token:
            return False
        write_bytes_atomic(location, data)
        return True


def remove_if_unchanged(location: str, token) -> bool:
    """Delete the object only if it is still the version `token` names: True if deleted. (On S3 a check, then
    the delete: the window between them is one request.)"""
    with _memory_lock(location):
        if read_versioned(location)[1] != token:
            return False
        if is_url(location):
            fs, path = filesystem(location)
            fs.rm_file(path)
            fs.invalidate_cache(path)
        else:
            os.unlink(local_path(location))
        return True


def _memory_lock(location: str):
    """The process lock for memory:// objects; elsewhere nothing (the check and the write are two steps)."""
    return MEMORY_LOCK if _scheme(location) == "memory" else contextlib.nullcontext()
