"""Publishing a version into the model registry: its name, its files and its record, whole or not at all
(torch-free; the layout and the readers are `vae_runtime.registry`).

A version is immutable and published whole: locally it is staged under a temporary name and renamed into place
(registrations of one registry take turns on a lock file); on object storage the version is first claimed for its
files (`.claim.json`, a conditional create), its files are uploaded and `version.json` last, and a version exists
only once its record does. A retried registration of the same files finds its version published; other files
under a published or claimed version are refused.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from vae_runtime import storage
from vae_runtime.atomic import fsync_tree
from vae_runtime.digest import sha256_file
from vae_runtime.errors import BadInput
from vae_runtime.graph_files import referenced_files
from vae_runtime.registry import (VERSION_RECORD, RegistryError, plain_name, project_dir, read_version_record,
                                  version_dir)

CLAIM = ".claim.json"  # on object storage: which files a registration of the version is uploading


def new_version(config_hash: str, started: datetime.datetime | None = None, run_id: str | None = None) -> str:
    """`<UTC start>-<config hash>[-<flow run id>]`: the same for every retry of one flow run, so a retried
    run finds its run folder (and resumes from its checkpoint) instead of starting a new version."""
    started = started or datetime.datetime.now(datetime.timezone.utc)
    stamp = started.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{config_hash[:8]}" + (f"-{run_id[:8]}" if run_id else "")


def record_bytes(record: dict) -> bytes:
    """A registry record as stored (version.json, champion.json, a claim): indented JSON, keys sorted."""
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def create_if_absent(url: str, data: bytes) -> bool:
    """Write `url` only where nothing is (`storage.create_if_absent`): True if this call created it."""
    try:
        return storage.create_if_absent(url, data)
    except OSError as err:
        raise RegistryError(f"{url}: conditional write failed ({type(err).__name__}: {err}); registration and "
                            "promotion on object storage need conditional writes (If-None-Match, If-Match)") from None


def register(registry: str | os.PathLike, version: str, files: dict[str, str | os.PathLike]) -> str:
    """Publish `files` ({name in the version: local source path}) as an immutable version; returns its location.

    A retried registration of the same files returns the existing version; other files are refused. On a local
    disk registrations take turns (a lock file), so two of one version at once end with one published whole."""
    for name in files:
        plain_name("file", name, f"registry version {version}")
    for name, src in files.items():  # a graph's external weights are published and hashed with it
        missing = [data for data in _graph_reads(src) if data not in files] if name.endswith(".onnx") else []
        if missing:
            raise RegistryError(f"registry version {version}: {name} keeps weights in {', '.join(missing)}, which "
                                "is not among the files published")
    hashes = {name: sha256_file(src) for name, src in sorted(files.items())}
    record = {"version": version, "files": hashes}
    target = version_dir(registry, version)
    if storage.is_url(registry):
        if not _already_published(registry, version, hashes, target):
            _claim(target, hashes)
            for name, src in files.items():
                storage.put_file(src, storage.join(target, name))
            storage.write_bytes_atomic(storage.join(target, VERSION_RECORD), record_bytes(record))
        return target
    with _version_lock(registry):
        if not _already_published(registry, version, hashes, target):
            _stage_and_rename(Path(target), version, files, record)
    return target


def _graph_reads(src) -> list[str]:
    """The files the graph `src` keeps weights in; none where it is not a graph the runtime would load (the
    registry stores files as given: the runtime refuses such a graph, in one line, when it is loaded)."""
    try:
        return referenced_files(src)
    except BadInput:
        return []


def _already_published(registry, version: str, hashes: dict, target: str) -> bool:
    held = read_version_record(registry, version)
    if held is not None and held.get("files") != hashes:
        raise RegistryError(f"registry version {target} already holds {sorted(held.get('files', {}))} "
                            f"with other contents than {sorted(hashes)}: versions are immutable")
    return held is not None


def _claim(target: str, hashes: dict) -> None:
    """On object storage, the version's name taken for these files before any is uploaded: `CLAIM` created only
    where absent (`If-None-Match: *` on S3, a process lock on `memory://`). A claim for other files refuses this
    registration (two registrations of one version at once, or one left half-done); the same files go on (a
    retry). Schemes without conditional writes (gs://, http://) upload unclaimed."""
    url = storage.join(target, CLAIM)
    data = record_bytes({"files": hashes})
    if not create_if_absent(url, data):
        try:
            held = json.loads(storage.read_capped(url, "json")).get("files")
        except (ValueError, UnicodeDecodeError, AttributeError, FileNotFoundError):
            held = None
        if held != hashes:
            raise RegistryError(f"registry version {target} is claimed for other files ({url}): versions are "
                                f"immutable; register under another version, or remove the claim of an abandoned "
                                f"registration")


@contextlib.contextmanager
def _version_lock(registry: str | os.PathLike):
    folder = Path(project_dir(registry))  # beside .champion.lock: the versions folder holds versions only
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".register.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield


def _stage_and_rename(target_path: Path, version: str, files: dict, record: dict) -> None:
    """The version folder staged under a temporary name and renamed into place (under the registration lock)."""
    if target_path.exists():  # a folder without a record is not something this module writes
        raise RegistryError(f"registry version {target_path} exists without {VERSION_RECORD}; remove it")
    target_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in target_path.parent.glob(f".{version}.*"):  # a registration of this version that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=target_path.parent) as tmp:
        staging = Path(tmp) / version
        staging.mkdir()
        for name, src in files.items():
            shutil.copyfile(src, staging / name)
        (staging / VERSION_RECORD).write_bytes(record_bytes(record))
        fsync_tree(staging)
        staging.rename(target_path)
