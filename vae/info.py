"""`vae info PATH`: what a run folder, a model folder or a registry holds, as one JSON document.

- a run (it has `checkpoints/` or `config.json`): its config hash, latest step and checkpoints, the last logged
  values, the evaluation's metrics when there are some;
- a model folder (it has `model.json`): its card without the validation details, and the files beside it;
- a registry (local path or URL with `train-vae/`): its versions and its champion.
Nothing here imports torch: it reads JSON files and lists folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from common import storage
from common.errors import BadInput

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
    from vae.serving import registry as reg

    if storage.is_url(location) or Path(location, reg.PROJECT).is_dir():
        return describe_registry(location)
    path = Path(location)
    if (path / "model.json").is_file():
        return describe_model(path)
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():
        return describe_run(path)
    raise BadInput(f"{location}: not a run folder (checkpoints/, config.json), a model folder (model.json) or a "
                   f"registry ({reg.PROJECT}/)")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise BadInput(f"{path}: not valid JSON ({err})") from None


def describe_run(path: Path) -> dict:
    checkpoints = sorted(p.name for p in (path / "checkpoints").glob("step-*.pt")) \
        if (path / "checkpoints").is_dir() else []
    config = _json(path / "config.json") or {}
    last = None
    log = path / "train_log.jsonl"
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else None
    metrics = _json(path / "eval" / "metrics.json")
    return {"kind": "run", "path": str(path), "config_hash": config.get("config_hash"),
            "steps": (config.get("config") or {}).get("train", {}).get("steps"),
            "step": int(checkpoints[-1][5:13]) if checkpoints else 0, "checkpoints": checkpoints,
            "last_log": last, "metrics": _shown_metrics(metrics)}


def _shown_metrics(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    return {**{k: metrics.get(k) for k in METRIC_KEYS}, "samples": sample_summary(metrics.get("samples"))}


def describe_model(path: Path) -> dict:
    card = _json(path / "model.json")
    metrics = card.get("metrics") or {}
    return {"kind": "model", "path": str(Path(os.path.realpath(path))),
            **{k: card.get(k) for k in CARD_KEYS}, "metrics": _shown_metrics(metrics) or {},
            "folder": sorted(p.name for p in path.iterdir())}


def describe_registry(location: str) -> dict:
    from vae.serving import registry as reg

    champion = reg.read_champion(location)
    shown = ("version", "path", "nll_bpd", "split", "k", "promoted_at", "run")
    if champion is not None:  # an operator's rollback, when there was one: its reason and the versions it retired
        champion = {**{k: champion.get(k) for k in shown},
                    **{k: champion[k] for k in ("rollback", "rolled_back") if k in champion}}
    return {"kind": "registry", "path": location, "versions": reg.list_versions(location), "champion": champion}
