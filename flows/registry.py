"""The model registry on a file system: versions and the champion (plain Python, no Prefect).

    REGISTRY/train-vae/versions/<version>/  encoder.onnx, decoder.onnx, model.json, metrics.json, samples.png
                                            and decoder.fp16.onnx when the export made one
    REGISTRY/train-vae/champion.json        {"version", "nll_bpd", "split", "k", ...}

A version folder is assembled under a temporary name and renamed into place; `champion.json` is replaced
atomically, and only when the new version's test `nll_bpd` beats the champion's on the same split and K.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from pathlib import Path

from vae.atomic import atomic_write_json

PROJECT = "train-vae"
VERSION_FILES = ("encoder.onnx", "decoder.onnx", "model.json", "metrics.json")


def project_dir(registry: str | Path) -> Path:
    return Path(registry) / PROJECT


def version_dir(registry: str | Path, version: str) -> Path:
    return project_dir(registry) / "versions" / version


def new_version(config_hash: str, started: datetime.datetime | None = None, run_id: str | None = None) -> str:
    """`<UTC start>-<config hash>[-<flow run id>]`: the same for every retry of one flow run, so a retried
    run finds its run folder (and resumes from its checkpoint) instead of starting a new version."""
    started = started or datetime.datetime.now(datetime.timezone.utc)
    stamp = started.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{config_hash[:8]}" + (f"-{run_id[:8]}" if run_id else "")


def register(registry: str | Path, version: str, files: dict[str, str | Path]) -> Path:
    """Copy `files` ({name in the version: source path}) into a new version folder, atomically."""
    target = version_dir(registry, version)
    if target.exists():  # a retried step: the version was already complete (it is renamed into place whole)
        held = sorted(p.name for p in target.iterdir())
        if held != sorted(files):
            raise ValueError(f"registry version {target} already holds {held}, not {sorted(files)}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=target.parent) as tmp:
        staging = Path(tmp) / version
        staging.mkdir()
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
        staging.rename(target)
    return target


def read_champion(registry: str | Path) -> dict | None:
    path = project_dir(registry) / "champion.json"
    return json.loads(path.read_text()) if path.exists() else None


def decide(champion: dict | None, metrics: dict) -> tuple[bool, str]:
    """Whether a version with `metrics` should replace `champion`, and why (one sentence)."""
    if champion is None:
        return True, "no champion yet"
    if (champion.get("split"), champion.get("k")) != (metrics["split"], metrics["k"]):
        return False, (f"not comparable: champion measured on {champion.get('split')} with K={champion.get('k')}, "
                       f"this version on {metrics['split']} with K={metrics['k']}")
    if metrics["nll_bpd"] < champion["nll_bpd"]:
        return True, f"test nll_bpd {metrics['nll_bpd']:.4f} beats the champion's {champion['nll_bpd']:.4f}"
    return False, f"test nll_bpd {metrics['nll_bpd']:.4f} does not beat the champion's {champion['nll_bpd']:.4f}"


def promote(registry: str | Path, version: str, metrics: dict) -> tuple[bool, str, dict | None]:
    """Replace `champion.json` when `version` is better; returns (promoted, reason, previous champion)."""
    previous = read_champion(registry)
    if previous is not None and previous.get("version") == version:
        return True, "already the champion", previous  # a retried promotion
    promoted, reason = decide(previous, metrics)
    if promoted:
        atomic_write_json(project_dir(registry) / "champion.json", {
            "version": version, "path": str(version_dir(registry, version).resolve()),
            "nll_bpd": metrics["nll_bpd"], "elbo_bpd": metrics["elbo_bpd"], "split": metrics["split"],
            "k": metrics["k"], "config_hash": metrics.get("config_hash"),
            "promoted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return promoted, reason, previous
