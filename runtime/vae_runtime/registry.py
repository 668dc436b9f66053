"""The model registry as apps read it: names, paths and the records of versions and the champion (torch-free).

    REGISTRY/train-vae/versions/<version>/  the model folder (graphs and any files they keep weights in,
                                            model.json, metrics.json, samples.png) and version.json
                                            {"version", "files": {name: sha256}}, written last
    REGISTRY/train-vae/champion.json        {"version", "path": "train-vae/versions/<version>", "record_sha256",
                                             "evidence": {...}, "run", "promoted_at"}: the alias `champion`
    REGISTRY/train-vae/aliases/<alias>.json {"alias", "version", "record_sha256", "set_at"}: an operator's name
    REGISTRY/train-vae/notes/<version>.json {"version", "tags": {key: value}, "archived": {"reason", "at"}}

A location pins a version or an alias after its last `@` (`REGISTRY@v3`, `s3://bucket/registry@staging`; only
after the last `/`, so `sftp://user@host/registry` is no pin): `split_pin` reads it, `read_pinned` follows it.

A version exists once its record does; `champion.json` names the version relative to the registry, so any host
that can read the registry (a local path or an fsspec URL) can follow it. Every record is type-checked on read
(`vae_runtime.schemas`) and every version or file name it holds is a plain name, never a path.

The pipeline writes the registry: `vae.serving.versions` publishes versions, `vae.serving.champion_store` swaps
the champion record, `vae.serving.promotion` decides which version is the champion.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from vae_runtime import schemas, storage
from vae_runtime.errors import VaeError

PROJECT = "train-vae"
CHAMPION = "champion.json"
VERSION_RECORD = "version.json"
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")  # a version or a file in it: never a path


class RegistryError(VaeError):
    """The registry cannot be read or written as asked; the message names it."""


ALIASES = "aliases"
NOTES = "notes"
CHAMPION_ALIAS = "champion"  # the alias promotion moves, kept in champion.json
ALIAS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")  # an alias: a plain word, never a path nor an `@`


def plain_name(kind: str, name, where: str) -> str:
    """`name` when it names one entry (letters, digits, and `._@+-` after the first, no `..`): a version or a file
    name read from a record can never point outside its folder or the app's cache."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise RegistryError(f"{where}: {kind} {name!r} is not a plain name (letters, digits and . _ @ + -, no path)")
    return name


def project_dir(registry: str | os.PathLike) -> str:
    return storage.join(registry, PROJECT)


def version_path(version: str) -> str:
    """A version's folder relative to the registry (what `champion.json` holds)."""
    return f"{PROJECT}/versions/{version}"


def version_dir(registry: str | os.PathLike, version: str) -> str:
    plain_name("version", version, f"registry {registry}")
    return storage.join(registry, *version_path(version).split("/"))


def read_version_record(registry: str | os.PathLike, version: str) -> dict | None:
    return read_version_record_bytes(registry, version)[0]


def read_version_record_bytes(registry: str | os.PathLike, version: str) -> tuple[dict | None, bytes | None]:
    """A version's record and its bytes as stored (what a champion record pins), or (None, None)."""
    where = storage.join(version_dir(registry, version), VERSION_RECORD)
    try:
        raw = storage.read_capped(where, "json")
    except FileNotFoundError:
        return None, None
    record = schemas.load(raw, schemas.VERSION, where, "a version record", RegistryError)
    for name in record["files"]:
        plain_name("file", name, where)
    return record, raw


def list_versions(registry: str | os.PathLike) -> list[str]:
    """Published versions (those with a record), oldest name first."""
    folder = storage.join(project_dir(registry), "versions")
    if storage.is_url(folder):
        names = {rel.split("/")[0] for rel, _ in storage.list_files(folder) if rel.endswith("/" + VERSION_RECORD)}
    else:
        names = {p.parent.name for p in Path(folder).glob(f"*/{VERSION_RECORD}")} if Path(folder).is_dir() else set()
    return sorted(n for n in names if not n.startswith("."))


def parse_champion(data: bytes, where) -> dict:
    """champion.json's record, each field's type checked (`vae_runtime.schemas.CHAMPION`), its versions plain
    names."""
    record = schemas.load(data, schemas.CHAMPION, str(where), "a champion record", RegistryError)
    for version in [record["version"], *(record.get("rolled_back") or [])]:
        plain_name("version", version, str(where))
    return record


def read_champion(registry: str | os.PathLike) -> dict | None:
    """The champion record, or None. Works on any registry location (read-only)."""
    where = storage.join(project_dir(str(registry)), CHAMPION)
    try:
        data = storage.read_capped(where, "json")
    except FileNotFoundError:
        return None
    return parse_champion(data, where)


def split_pin(location: str) -> tuple[str, str | None]:
    """(registry, version or alias) of `REGISTRY@PIN`, split on the last `@` after the last `/` (a URL's
    `user@host` comes before its path); (location, None) without one. An empty or non-plain pin is refused."""
    start = location.find("/", location.find("://") + 3) if "://" in location else 0
    if start < 0:  # a URL with no path: any `@` is its user
        return location, None
    tail_at = location.rfind("/") + 1
    at = location.rfind("@", max(start, tail_at))
    if at < 0:
        return location, None
    base, pin = location[:at], location[at + 1:]
    if not base or not pin or not PLAIN_NAME.fullmatch(pin) or "@" in pin or ".." in pin:
        raise RegistryError(f"model {location}: {pin!r} after '@' is not a version or an alias (expected "
                            "REGISTRY@VERSION or REGISTRY@ALIAS)")
    return base, pin


def names_registry(location: str) -> bool:
    """Whether `location` is a registry, pinned or not: any URL (as before), or a local folder holding the project
    (itself, or the part before a pin)."""
    if storage.is_url(location) or os.path.isdir(os.path.join(location, PROJECT)):
        return True
    base = location[:location.rfind("@")] if "@" in os.path.basename(location) else None
    return bool(base) and os.path.isdir(os.path.join(base, PROJECT))


def alias_path(registry: str | os.PathLike, alias: str) -> str:
    return storage.join(project_dir(registry), ALIASES, f"{alias}.json")


def notes_path(registry: str | os.PathLike, version: str) -> str:
    plain_name("version", version, f"registry {registry}")
    return storage.join(project_dir(registry), NOTES, f"{version}.json")


def parse_alias(data: bytes, where) -> dict:
    record = schemas.load(data, schemas.ALIAS, str(where), "an alias record", RegistryError)
    plain_name("version", record["version"], str(where))
    return record


def parse_notes(data: bytes, where) -> dict:
    return schemas.load(data, schemas.NOTES, str(where), "a version's notes", RegistryError)


def read_alias(registry: str | os.PathLike, alias: str) -> dict | None:
    """The alias record (`champion`: champion.json), or None where there is none."""
    if alias == CHAMPION_ALIAS:
        return read_champion(registry)
    where = alias_path(registry, alias)
    try:
        return parse_alias(storage.read_capped(where, "json"), where)
    except FileNotFoundError:
        return None


def list_aliases(registry: str | os.PathLike) -> dict[str, str]:
    """{alias: version}, `champion` included where there is one."""
    folder = storage.join(project_dir(registry), ALIASES)
    if storage.is_url(folder):
        names = [rel[:-5] for rel, _ in storage.list_files(folder) if "/" not in rel and rel.endswith(".json")]
    else:
        names = [p.stem for p in Path(folder).glob("*.json")] if Path(folder).is_dir() else []
    found = {name: read_alias(registry, name) for name in sorted(names) if ALIAS_NAME.fullmatch(name)}
    champion = read_champion(registry)
    return {**({CHAMPION_ALIAS: champion["version"]} if champion else {}),
            **{name: record["version"] for name, record in found.items() if record is not None}}


def read_notes(registry: str | os.PathLike, version: str) -> dict:
    """A version's notes: its tags and whether (and why) it is archived; empty ones where it has none."""
    where = notes_path(registry, version)
    try:
        return {"tags": {}, "archived": None, **parse_notes(storage.read_capped(where, "json"), where)}
    except FileNotFoundError:
        return {"version": version, "tags": {}, "archived": None}


def archived_why(registry: str | os.PathLike, version: str, champion: dict | None = None) -> str | None:
    """Why `version` is archived (its notes, or champion.json's `rolled_back` of older registries), else None."""
    archived = read_notes(registry, version).get("archived")
    if archived:
        return archived.get("reason") or "archived"
    if champion and version in (champion.get("rolled_back") or []):
        return f"rolled back by an operator ({(champion.get('rollback') or {}).get('reason')})"
    return None


def read_pinned(registry: str | os.PathLike, pin: str) -> dict:
    """The record a pin names, shaped like the champion's ({"version", "record_sha256"}, plus "alias"): a
    version's own record (a version name wins), else an alias; RegistryError naming both when it is neither."""
    if pin == CHAMPION_ALIAS:
        record = read_champion(registry)
        if record is None:
            raise RegistryError(f"registry {registry}: no champion yet ({PROJECT}/{CHAMPION} not found)")
        return {**record, "alias": CHAMPION_ALIAS}
    if PLAIN_NAME.fullmatch(pin) and ".." not in pin:
        _, raw = read_version_record_bytes(registry, pin)
        if raw is not None:
            return {"version": pin, "record_sha256": hashlib.sha256(raw).hexdigest()}
    record = read_alias(registry, pin) if ALIAS_NAME.fullmatch(pin) else None
    if record is None:
        raise RegistryError(f"registry {registry}: no version or alias {pin!r} (versions: "
                            f"{', '.join(list_versions(registry)) or 'none'}; aliases: "
                            f"{', '.join(list_aliases(registry)) or 'none'})")
    return {**record, "alias": pin}
