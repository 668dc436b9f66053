"""`vae registry ...`: an operator's hand on the model registry. `rollback` makes a published version the champion
again (kept with its reason); `alias set|list|delete` names versions; `list` shows every version with its metrics,
aliases and tags (JSON); `tag` labels a version; `archive` retires one for good."""

from __future__ import annotations

import contextlib
import json
import os

from vae_runtime import registry as reg
from vae_runtime import storage
from vae_runtime.errors import BadInput
from vae.serving import aliases, notes
from vae.serving.promotion import evidence_of, rollback, version_metrics


@contextlib.contextmanager
def _operator_input():
    """The registry's refusals as bad input: an unknown version or alias, a name refused, a damaged record."""
    try:
        yield
    except reg.RegistryError as err:
        raise BadInput(str(err)) from None


def cmd_registry_rollback(args) -> int:
    with _operator_input():  # an unpublished version, no reason, a damaged record: the operator's input
        outcome = rollback(args.registry, args.version, args.reason)
    previous = outcome["previous"]["version"] if outcome["previous"] else "none"
    print(f"registry {args.registry}: champion {args.version} (was {previous}); never promoted again: "
          f"{', '.join(outcome['champion']['rolled_back']) or 'none'}")
    return 0


def cmd_alias(args) -> int:
    with _operator_input():
        if args.action == "list":
            print(json.dumps(reg.list_aliases(args.registry), indent=1))
            return 0
        if args.name is None:
            raise reg.RegistryError(f"alias {args.action}: name the alias")
        if args.action == "set":
            if args.version is None:
                raise reg.RegistryError(f"alias set {args.name}: name the version it points at")
            was = aliases.set_alias(args.registry, args.name, args.version)["previous"]
            print(f"registry {args.registry}: {args.name} -> {args.version} (was {was or 'unset'})")
        else:
            if args.version is not None:
                raise reg.RegistryError(f"alias delete {args.name}: takes no version (got {args.version!r})")
            was = aliases.delete_alias(args.registry, args.name)
            print(f"registry {args.registry}: {args.name} deleted (it named {was})")
    return 0


def list_registry(registry: str) -> dict:
    """Every published version with its test nll_bpd, primary sample figure, aliases, tags and archiving."""
    if not storage.is_url(registry) and not os.path.isdir(reg.project_dir(registry)):
        raise reg.RegistryError(f"{registry}: not a registry (no {reg.PROJECT}/)")
    if storage.is_url(registry) and reg.split_pin(registry)[1] is not None:
        raise reg.RegistryError(f"{registry}: not a registry (list takes the registry itself, not a pin)")
    named = reg.list_aliases(registry)
    champion = reg.read_champion(registry)
    shown = []
    for version in reg.list_versions(registry):
        record = reg.read_version_record(registry, version)
        evidence = evidence_of(version_metrics(registry, version, record))
        version_notes = reg.read_notes(registry, version)
        shown.append({"version": version, "nll_bpd": evidence["nll_bpd"], "sample_primary": evidence["sample_primary"],
                      "aliases": sorted(name for name, held in named.items() if held == version),
                      "tags": version_notes.get("tags") or {},
                      "archived": reg.archived_why(registry, version, champion)})
    return {"kind": "registry", "path": registry, "versions": shown}


def cmd_list(args) -> int:
    with _operator_input():
        print(json.dumps(list_registry(args.registry), indent=1, default=str))
    return 0


def cmd_tag(args) -> int:
    with _operator_input():
        written = notes.tag(args.registry, args.version, notes.parse_tags(args.tags))
    print(f"registry {args.registry}: {args.version} tags {json.dumps(written['tags'], sort_keys=True)}")
    return 0


def cmd_archive(args) -> int:
    with _operator_input():
        notes.archive(args.registry, args.version, args.reason)
    print(f"registry {args.registry}: {args.version} archived ({args.reason.strip()}); never promoted")
    return 0


def add_commands(sub) -> None:
    registry = sub.add_parser("registry", help="the model registry: champion, aliases, tags, archive").add_subparsers(
        dest="registry_command", required=True)
    p = registry.add_parser("rollback", help="make a published version the champion again (an operator's decision, "
                                             "kept with its reason); the versions it replaces are archived")
    p.add_argument("registry", help="the registry (local path or URL)")
    p.add_argument("--to", required=True, dest="version", help="a published version (vae info REGISTRY lists them)")
    p.add_argument("--reason", required=True, help="why, kept in champion.json")
    p.set_defaults(func=cmd_registry_rollback)

    p = registry.add_parser("alias", help="set, list or delete a named alias of a version (REGISTRY@ALIAS loads it)")
    p.add_argument("action", choices=("set", "list", "delete"))
    p.add_argument("registry", help="the registry (local path or URL)")
    p.add_argument("name", nargs="?", help="the alias: a plain word that is not a version name (staging, canary)")
    p.add_argument("version", nargs="?", help="set: the published version it names")
    p.set_defaults(func=cmd_alias)

    p = registry.add_parser("list", help="every version with its metrics, aliases and tags (JSON)")
    p.add_argument("registry", help="the registry (local path or URL)")
    p.set_defaults(func=cmd_list)

    p = registry.add_parser("tag", help="label a version: key=value ... (an empty value removes the key)")
    p.add_argument("registry", help="the registry (local path or URL)")
    p.add_argument("version", help="a published version")
    p.add_argument("tags", nargs="+", metavar="key=value")
    p.set_defaults(func=cmd_tag)

    p = registry.add_parser("archive", help="retire a version: kept, never promoted nor aliased")
    p.add_argument("registry", help="the registry (local path or URL)")
    p.add_argument("version", help="a published version that is not the champion (roll back first)")
    p.add_argument("--reason", required=True, help="why, kept in the version's notes")
    p.set_defaults(func=cmd_archive)
