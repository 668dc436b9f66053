"""A registry's champion as apps follow it: `Champion(registry)`, its graphs verified and cached locally.

    from vae_runtime import Champion
    champion = Champion("s3://bucket/registry")  # or a local registry path; files cached and sha256-verified
    decoder = champion.decoder()                 # a `vae_runtime.Decoder` of the champion's decoder.onnx
    if champion.refresh(): decoder = champion.decoder()   # one small read: True when the champion changed
    Champion("s3://bucket/registry@v3")          # a pinned version (never moves) or alias (`@staging`)

The registry's records are read through `vae_runtime.registry`; the graphs a champion holds are named by
`vae_runtime.vocabulary` (`champion.graph("decoder", "fp16")` is its decoder.fp16.onnx).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from vae_runtime import registry as reg
from vae_runtime import storage
from vae_runtime.atomic import atomic_write_bytes
from vae_runtime.digest import sha256_file
from vae_runtime.errors import RuntimeModelError, one_line
from vae_runtime.limits import OverCap
from vae_runtime.model_folder import CARD, checked_graph_files
from vae_runtime.vocabulary import graph_name


def default_cache_dir() -> str:
    """Where remote champions are cached: `$VAE_RUNTIME_CACHE`, else `~/.cache/vae-runtime`."""
    return os.environ.get("VAE_RUNTIME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vae-runtime")


class Champion:
    """The promoted version of a registry (a local path or an fsspec URL such as s3://bucket/registry).

    `champion.json` names the version relative to the registry; its `version.json` lists every file's sha256
    and is itself pinned by the champion record. Graphs of a remote registry are downloaded once into
    `cache_dir` (versions are immutable, so a cached file never goes stale) and every graph is verified against
    the record before it loads. `refresh()` re-reads only `champion.json`.

    `REGISTRY@VERSION` pins a version, verified against its version.json the same way, and `refresh()` never moves
    it; `REGISTRY@ALIAS` follows an alias (`vae_runtime.registry.read_pinned`), which `refresh()` re-reads. A local
    registry folder whose own name holds an `@` is read as it is.
    """

    def __init__(self, registry: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        location = os.fspath(registry)
        try:
            self.registry, self.pin = (location, None) if os.path.isdir(os.path.join(location, reg.PROJECT)) \
                else reg.split_pin(location)
        except reg.RegistryError as err:
            raise RuntimeModelError(str(err)) from None
        self.remote = "://" in self.registry and not self.registry.startswith("file://")
        key = hashlib.sha256(self.registry.rstrip("/").encode()).hexdigest()[:16]
        self.cache = Path(cache_dir or default_cache_dir()) / key
        self.record: dict = {}
        self.files: dict[str, str] = {}
        self._load(self._read_record())

    @property
    def version(self) -> str:
        return self.record["version"]

    def _read_record(self) -> dict:
        try:
            record = reg.read_champion(self.registry) if self.pin is None else reg.read_pinned(self.registry, self.pin)
        except reg.RegistryError as err:  # no such version or alias, a damaged record: one line naming it
            if self.pin is not None:
                raise RuntimeModelError(str(err)) from None
            raise RuntimeModelError(f"registry {self.registry}: cannot read the champion ({one_line(err)})") from None
        except Exception as err:  # noqa: BLE001 - any store's client error (HTTP status, S3 endpoint, timeout)
            raise RuntimeModelError(f"registry {self.registry}: cannot read the champion ({one_line(err)})") from None
        if record is None:
            raise RuntimeModelError(f"registry {self.registry}: no champion yet "
                                    f"({reg.PROJECT}/{reg.CHAMPION} not found)")
        return record

    def _load(self, record: dict) -> None:
        version = record["version"]
        pinned = record.get("record_sha256")
        try:
            parsed, raw = reg.read_version_record_bytes(self.registry, version)
        except Exception as err:  # noqa: BLE001 - a damaged record, or any store's client error
            raise RuntimeModelError(f"registry {self.registry}: cannot read the record of champion {version} "
                                    f"({one_line(err)})") from None
        if parsed is None:
            if pinned is not None:
                raise RuntimeModelError(f"registry {self.registry}: champion {version} has no "
                                        f"{reg.VERSION_RECORD} (not published whole, or removed)")
            warnings.warn(f"registry {self.registry}: champion {version} is from a registry without version "
                          "records; its files are not verified", RuntimeWarning, stacklevel=3)
            self.record, self.files = record, None
            return
        if pinned is None:
            warnings.warn(f"registry {self.registry}: champion record of {version} pins no version record (an "
                          "older registry)", RuntimeWarning, stacklevel=3)
        elif hashlib.sha256(raw).hexdigest() != pinned:
            raise RuntimeModelError(f"registry {self.registry}: {reg.VERSION_RECORD} of {version} differs "
                                    "from the one the champion record pins")
        self.record, self.files = record, parsed["files"]

    def graph(self, kind: str, precision: str | None = None) -> str:
        """A local, sha256-verified copy (or the registry's own file) of one graph of the champion."""
        name = graph_name(kind, precision, RuntimeModelError)
        if self.files is not None and name not in self.files:
            raise RuntimeModelError(f"registry {self.registry}: champion {self.version} has no {name} "
                                    f"(it holds {', '.join(sorted(self.files))})")
        path = self.file(name, cap="onnx")
        # The files it keeps weights in are verified like it and kept beside it, where onnxruntime reads them. A
        # version record from before they were hashed lists its graphs alone, and those graphs hold all their
        # weights, so it loads as before; a graph that reads a file its record does not list is refused.
        for data in checked_graph_files(path, present=False):
            if self.files is not None and data not in self.files:
                raise RuntimeModelError(f"registry {self.registry}: champion {self.version}'s {name} keeps weights "
                                        f"in {data}, which its version record does not list")
            self.file(data, cap="onnx_data")
        return path

    def card_file(self) -> str | None:
        """A local, verified copy of the champion's `model.json`; None where its version record lists none."""
        if self.files is None or CARD not in self.files:
            return None
        return self.file(CARD, cap="json")

    def file(self, name: str, cap: str | None = None) -> str:
        """A local copy of one file of the champion, verified against its version record (when it has one); a
        remote one read under the size cap `cap` of `vae_runtime.limits` when given."""
        try:
            reg.plain_name("file", name, f"registry {self.registry}")
        except reg.RegistryError as err:
            raise RuntimeModelError(str(err)) from None
        want = self.files.get(name) if self.files is not None else None
        if want is None and self.files is not None:
            raise RuntimeModelError(f"registry {self.registry}: champion {self.version} has no {name}")
        source = storage.join(reg.version_dir(self.registry, self.version), name)
        if not self.remote:
            path = storage.local_path(source)
            if not os.path.isfile(path):
                raise RuntimeModelError(f"registry {self.registry}: champion {self.version} has no {name}")
            if want is not None and sha256_file(path) != want:
                raise RuntimeModelError(f"model {path}: sha256 differs from the registry's version record")
            return path
        path = self.cache / self.version / name  # both plain names (checked when read): inside the cache
        if want is not None and path.is_file() and sha256_file(path) == want:
            return str(path)
        try:
            data = storage.read_capped(source, cap, f"{name} of {self.version}") if cap else storage.read_bytes(source)
        except OverCap:
            raise
        except Exception as err:  # noqa: BLE001 - any store's client error (HTTP status, S3 endpoint, timeout)
            raise RuntimeModelError(f"registry {self.registry}: cannot read {name} of {self.version} "
                                    f"({one_line(err)})") from None
        if want is not None and hashlib.sha256(data).hexdigest() != want:
            raise RuntimeModelError(f"registry {self.registry}: {name} of {self.version} differs from its "
                                    "version record (damaged or replaced)")
        try:
            atomic_write_bytes(path, data)
        except OSError as err:
            raise RuntimeModelError(f"cache {self.cache}: cannot write {path} ({err.strerror or err}); give "
                                    "Champion(cache_dir=...) or $VAE_RUNTIME_CACHE a writable folder") from None
        return str(path)

    def refresh(self) -> bool:
        """Re-read `champion.json` (or the pinned alias); True (and this object now names the new champion) when it
        changed. A pinned version never moves: False without a read."""
        if self.pin is not None and "alias" not in self.record:
            return False
        record = self._read_record()
        if record.get("version") == self.record.get("version"):
            return False
        self._load(record)
        return True

    def decoder(self, **options):
        """`vae_runtime.Decoder(self, **options)`: the champion's decoder."""
        from vae_runtime.models import Decoder  # the models build on this module: imported when asked for

        return Decoder(self, **options)

    def encoder(self, **options):
        """`vae_runtime.Encoder(self, **options)`: the champion's encoder."""
        from vae_runtime.models import Encoder  # lazy: models imports this module (a cycle)

        return Encoder(self, **options)
