"""What is said about a version after it was published: its tags and its archiving (torch-free).

A version folder is immutable, so its notes are a separate small record, `REGISTRY/train-vae/notes/<version>.json`
(`vae_runtime.registry.read_notes` reads it), written by compare-and-swap (`vae.serving.champion_store.record_store`).
An archived version is kept and never promoted (`vae.serving.promotion`), and no alias names it; the champion is
archived only by a rollback that replaces it first (`promotion.rollback` archives the versions it replaces).
"""

from __future__ import annotations

import datetime
import os

from vae_runtime import registry as reg
from vae.serving.champion_store import champion_store, record_store
from vae.serving.versions import record_bytes

MAX_ROUNDS = 20
MAX_TAG = 256  # characters in a tag's key or value: a label, not a document


def _published(registry, version: str) -> str:
    reg.plain_name("version", version, f"registry {registry}")
    if reg.read_version_record(registry, version) is None:
        raise reg.RegistryError(f"registry version {reg.version_dir(registry, version)}: not published; published "
                                f"versions: {', '.join(reg.list_versions(registry)) or 'none'}")
    return version


def _update(registry, version: str, change) -> dict:
    """Apply `change(notes) -> notes` to the version's notes by compare-and-swap; returns the notes written."""
    store = record_store(registry, reg.notes_path(registry, version), reg.parse_notes)
    for _ in range(MAX_ROUNDS):
        current, token = store.read()
        new = change({"version": version, "tags": {}, **(current or {})})
        if store.swap(token, record_bytes(new)):
            return new
    raise reg.RegistryError(f"registry version {version}: its notes changed {MAX_ROUNDS} times while written")


def parse_tags(pairs: list[str]) -> dict[str, str]:
    """`key=value` words as {key: value}; a word without `=`, an empty or over-long key, is refused."""
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or len(key) > MAX_TAG or len(value) > MAX_TAG:
            raise reg.RegistryError(f"tag {pair!r}: expected key=value (a key of 1 to {MAX_TAG} characters)")
        tags[key.strip()] = value
    if not tags:
        raise reg.RegistryError("tag: give at least one key=value")
    return tags


def tag(registry: str | os.PathLike, version: str, tags: dict[str, str]) -> dict:
    """Set `tags` on the published `version` (an empty value removes that key); returns its notes."""
    _published(registry, version)

    def change(notes):
        merged = {**notes.get("tags", {}), **tags}
        return {**notes, "tags": {k: v for k, v in sorted(merged.items()) if v != ""}}

    return _update(registry, version, change)


def archive(registry: str | os.PathLike, version: str, reason: str, *, replaced: bool = False) -> dict:
    """Archive the published `version` with `reason`: kept, never promoted, never aliased. The champion is refused
    (roll back first) and so is a version an alias names (delete the alias first), unless `replaced` (a rollback
    archiving the champion it just replaced: that must not fail). Returns its notes.

    Promotion reads the notes just before its swap, so an archive that lands during a promotion's last request
    can still see that version become the champion: archive it with a rollback then."""
    if not isinstance(reason, str) or not reason.strip():
        raise reg.RegistryError(f"archive {version}: say why (--reason): its notes keep it")
    _published(registry, version)
    champion = champion_store(registry).read()[0]
    if not replaced and champion is not None and champion["version"] == version:
        raise reg.RegistryError(f"archive {version}: it is the champion; `vae registry rollback` to another version "
                                "first")
    named = [] if replaced else sorted(name for name, held in reg.list_aliases(registry).items()
                                       if held == version and name != reg.CHAMPION_ALIAS)
    if named:
        raise reg.RegistryError(f"archive {version}: alias {', '.join(named)} names it; move or delete the alias first")
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return _update(registry, version, lambda notes: {**notes, "archived": {"reason": reason.strip(), "at": at}})


def unarchive(registry: str | os.PathLike, version: str) -> None:
    """Clear the archiving of `version` (a rollback that makes it the champion again); nothing where it has none."""
    if reg.read_notes(registry, version).get("archived"):
        _update(registry, version, lambda notes: {k: v for k, v in notes.items() if k != "archived"})
