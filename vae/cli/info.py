"""`vae info PATH`: what a run folder, a model folder or a registry holds, as one JSON document.

- a run (it has `checkpoints/` or `config.json`; read through `vae.core.run.Run`): its format version, config
  hash, latest step and checkpoints, the last logged
  values, the evaluation's metrics when there are some;
- a model folder (it has `model.json`): its card without the validation details, and the files beside it;
- a registry (local path or URL with `train-vae/`): its versions, its champion and aliases; pinned
  (`REGISTRY@VERSION`, `REGISTRY@ALIAS`), also what the pin names.
Nothing here imports torch: it reads JSON files and lists folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vae_runtime import limits, schemas
from vae_runtime import registry as reg
from vae_runtime.errors import BadInput
from vae.core.run import Run, checkpoint_step

CARD_KEYS = ("version", "created", "latent_dim", "image_size", "likelihood", "config_hash", "step", "weights",
             "files", "sha256", "preprocessing")
METRIC_KEYS = ("split", "k", "n_images", "nll_bpd", "elbo_bpd", "active_units", "model_step")


def sample_summary(samples: dict | None) -> dict | None:
    """The sample-quality figures worth a glance: the primary one (best temperature), its real-versus-real floor,
    FID or why there is none, and per temperature the download-free figures of the prior samples."""
    if not isinstance(samples, dict) or not isinstance(samples.get("primary"), dict):
        return None
    primary = samples["primary"]
    shown = ("kid", "precision", "recall", "density", "coverage", "swd", "fid")
    prior = samples.get("prior") or {}
    best = prior.get(f"{primary.get('temperature'):g}") or {} if isinstance(primary.get("temperature"), (int, float)) \
        else {}
    return {"primary": primary, "floor": (samples.get("floor") or {}).get(primary.get("metric")),
            "fid": best.get("fid") if best.get("fid") is not None else samples.get("fid_reason"),
            "measure": samples.get("measure"), "images": samples.get("n_heldout"),
            "by_temperature": {t: {k: (v.get(k) or {}).get("value") if isinstance(v.get(k), dict) else None
                                   for k in shown} for t, v in prior.items() if isinstance(v, dict)}}


def describe(location: str) -> dict:
    """What `location` is and holds; one line of BadInput when it is none of a run, a model or a registry."""
    if reg.names_registry(location):  # a registry, or one pinned: REGISTRY@VERSION, REGISTRY@ALIAS
        return describe_registry(location)
    path = Path(location)
    if (path / "model.json").is_file():
        return describe_model(path)
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():
        return describe_run(path)
    raise BadInput(f"{location}: not a run folder (checkpoints/, config.json), a model folder (model.json) or a "
                   f"registry ({reg.PROJECT}/)")


def _json(path: Path, schema: dict, what: str) -> dict | None:
    """The record at `path`, each field's type checked (`vae_runtime.schemas`: one line naming the file and the field),
    or None where there is none."""
    try:
        data = limits.read_file(path, "json")
    except FileNotFoundError:
        return None
    return schemas.load(data, schema, str(path), what)


def _log_record(line: bytes, where: str) -> dict | None:
    try:
        return schemas.load(line, schemas.LOG_LINE, where, "a log record")
    except schemas.RecordError:
        return None


def last_log(log: Path) -> tuple[dict | None, str | None]:
    """The last complete record of a run's `train_log.jsonl`, and a note when its last line is not one: a run
    killed while writing a line leaves it cut short (training drops it on resume), and the record before it is
    shown instead."""
    line = limits.read_last_line(log, "json")  # a log of any length costs one line
    record = _log_record(line, str(log))
    if record is not None or not line:
        return record, None
    lines = [part for part in limits.read_file(log, "json").splitlines() if part.strip()]  # only after a cut
    earlier = (_log_record(part, str(log)) for part in reversed(lines[:-1]))
    return next((r for r in earlier if r is not None), None), \
        f"{log}: its last line is not a complete record (cut short by a kill?); the record before it is shown"


def describe_run(path: Path) -> dict:
    run = Run(path)  # its listing and records only: no checkpoint is loaded
    checkpoints = run.checkpoints()
    config = run.config_record or {}
    last, note = last_log(path / "train_log.jsonl") if (path / "train_log.jsonl").is_file() else (None, None)
    return {"kind": "run", "path": str(path), "format_version": run.format_version,
            "config_hash": config.get("config_hash"),
            "steps": ((config.get("config") or {}).get("train") or {}).get("steps"),
            "step": checkpoint_step(checkpoints[-1]) if checkpoints else 0, "checkpoints": [p.name for p in checkpoints],
            "last_log": last, **({"last_log_note": note} if note else {}), "metrics": _shown_metrics(run.metrics)}


def _shown_metrics(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    return {**{k: metrics.get(k) for k in METRIC_KEYS}, "samples": sample_summary(metrics.get("samples"))}


def describe_model(path: Path) -> dict:
    card = _json(path / "model.json", schemas.MODEL_CARD, "a model card")
    metrics = card.get("metrics") or {}
    return {"kind": "model", "path": str(Path(os.path.realpath(path))),
            **{k: card.get(k) for k in CARD_KEYS}, "metrics": _shown_metrics(metrics) or {},
            "folder": sorted(p.name for p in path.iterdir())}


def describe_registry(location: str) -> dict:
    try:
        base, pin = (location, None) if Path(location, reg.PROJECT).is_dir() else reg.split_pin(location)
        champion = reg.read_champion(base)
        pinned = None if pin is None else reg.read_pinned(base, pin)
        named = reg.list_aliases(base)
    except reg.RegistryError as err:  # a damaged record, an unknown pin: the input `vae info` was given
        raise BadInput(str(err)) from None
    shown = ("version", "path", "nll_bpd", "split", "k", "promoted_at", "run")
    if champion is not None:  # an operator's rollback, when there was one: its reason and the versions it retired
        champion = {**{k: champion.get(k) for k in shown},
                    **{k: champion[k] for k in ("rollback", "rolled_back") if k in champion}}
    described = {"kind": "registry", "path": base, "versions": reg.list_versions(base), "champion": champion,
                 "aliases": named}
    if pinned is not None:  # what the pin loads: its version, through which alias, and whether it is archived
        described["pinned"] = {"pin": pin, "version": pinned["version"], "alias": pinned.get("alias"),
                               "archived": reg.archived_why(base, pinned["version"], champion)}
    return described


def cmd_info(args) -> int:
    print(json.dumps(describe(args.path), indent=1, default=str))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("info", help="what a run folder, a model folder or a registry holds (JSON)")
    p.add_argument("path", help="a run folder, a model folder, or a registry (local path or URL)")
    p.set_defaults(func=cmd_info)
