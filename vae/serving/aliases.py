"""Named aliases of published versions (`staging`, `canary`): set, moved and deleted by an operator (torch-free).

An alias is one small record, `REGISTRY/train-vae/aliases/<alias>.json` (`vae_runtime.registry` reads it), written by
compare-and-swap like champion.json (`vae.serving.champion_store.record_store`), pinning its version's record like
the champion does. The alias `champion` is champion.json itself: promotion and rollback move it, never this module.
An alias name is a plain word that cannot be taken for a version; an alias names a published version that is not
archived.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re

from vae_runtime import registry as reg
from vae.serving.champion_store import champion_store, record_store
from vae.serving.versions import record_bytes

VERSION_LIKE = re.compile(r"v\d+", re.IGNORECASE)  # `v3`; digits first (a flow's `<UTC start>-<hash>`) are no alias
MAX_ROUNDS = 20


def check_alias_name(registry: str | os.PathLike, name) -> str:
    """`name` when it can be an alias: a plain word (a letter, then letters, digits, `_` or `-`), not `champion`
    (promotion's), and nothing a version is or could be named; RegistryError naming it otherwise."""
    if not isinstance(name, str) or not reg.ALIAS_NAME.fullmatch(name):
        raise reg.RegistryError(f"alias {name!r}: not a plain name (a letter, then up to 63 letters, digits, _ or -)")
    if name == reg.CHAMPION_ALIAS:
        raise reg.RegistryError(f"alias {name!r}: the champion is moved by promotion and `vae registry rollback`")
    if VERSION_LIKE.fullmatch(name) or reg.read_version_record(registry, name) is not None:
        raise reg.RegistryError(f"alias {name!r}: could be taken for a version name; pick a word (staging, canary)")
    return name


def _store(registry, name: str):
    return record_store(registry, reg.alias_path(registry, name), reg.parse_alias)


def set_alias(registry: str | os.PathLike, name: str, version: str) -> dict:
    """Point alias `name` at the published, not archived `version` (creating or moving it); returns
    {"alias": the new record, "previous": the version it named or None}."""
    check_alias_name(registry, name)
    record, raw = reg.read_version_record_bytes(registry, reg.plain_name("version", version, f"alias {name}"))
    if record is None:
        raise reg.RegistryError(f"alias {name}: version {version} is not published in {registry} (published: "
                                f"{', '.join(reg.list_versions(registry)) or 'none'})")
    why = reg.archived_why(registry, version, champion_store(registry).read()[0])
    if why:
        raise reg.RegistryError(f"alias {name}: version {version} is archived ({why}); an alias never names one")
    new = {"alias": name, "version": version, "record_sha256": hashlib.sha256(raw).hexdigest(),
           "set_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    store = _store(registry, name)
    for _ in range(MAX_ROUNDS):
        current, token = store.read()
        if store.swap(token, record_bytes(new)):
            return {"alias": new, "previous": current and current["version"]}
    raise reg.RegistryError(f"alias {name}: changed {MAX_ROUNDS} times while being set")


def delete_alias(registry: str | os.PathLike, name: str) -> str:
    """Remove alias `name`; returns the version it named. An alias that does not exist is refused."""
    if name == reg.CHAMPION_ALIAS or not isinstance(name, str) or not reg.ALIAS_NAME.fullmatch(name):
        check_alias_name(registry, name)  # says why, in one line
    store = _store(registry, name)
    for _ in range(MAX_ROUNDS):
        current, token = store.read()
        if current is None:
            raise reg.RegistryError(f"alias {name}: no such alias in {registry} (aliases: "
                                    f"{', '.join(reg.list_aliases(registry)) or 'none'})")
        if store.remove(token):
            return current["version"]
    raise reg.RegistryError(f"alias {name}: changed {MAX_ROUNDS} times while being deleted")
