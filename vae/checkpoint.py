"""Checkpoints: one file per save, `RUN_DIR/checkpoints/step-NNNNNNNN.pt`, written atomically.

A checkpoint holds only tensors, numbers, strings and dicts (it loads with `weights_only=True`): model and
EMA weights, optimizer, scheduler and scaler states, the trainer's counters and the full config as JSON,
so a run is reproducible from its checkpoint alone. The newest complete file is the one to resume from.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from vae.atomic import atomic_write
from vae.config import Config, config_from_dict, config_to_dict
from vae.errors import BadInput

PATTERN = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_torn_writes(run_dir: str | Path) -> int:
    """Delete temporary files left by a checkpoint write that was killed; returns how many."""
    folder = checkpoint_dir(run_dir)
    torn = list(folder.glob(".step-*.pt.*.tmp")) if folder.is_dir() else []
    for path in torn:
        path.unlink(missing_ok=True)
    return len(torn)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    path = checkpoint_dir(run_dir) / f"step-{step:08d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as err:
        raise BadInput(f"checkpoint {path}: cannot be loaded ({str(err).splitlines()[0]})") from None


def config_of(state: dict) -> Config:
    return config_from_dict(json.loads(state["config"]))


def config_json(cfg: Config) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, values): which weights were measured."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def warm_start_weights(cfg: Config) -> dict | None:
    """The EMA weights a new run starts from (`train.init_from`, a run folder), or None; refuses, with one line,
    a source that has no checkpoint or another model section (architecture, likelihood, sizes)."""
    source = cfg.train.init_from
    if not source:
        return None
    path = latest_checkpoint(source)
    if path is None:
        raise BadInput(f"train.init_from {source}: no checkpoint there to start from")
    state = load_checkpoint(path)
    theirs, ours = config_to_dict(config_of(state))["model"], config_to_dict(cfg)["model"]
    differ = [f"model.{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
              if theirs.get(k) != ours.get(k)]
    if differ:
        raise BadInput(f"train.init_from {source}: another architecture ({'; '.join(differ)}); warm starts need "
                       "the same model section")
    return {"ema": state["ema"], "checkpoint": str(path), "step": int(state["step"])}


def load_trained(run_dir: str | Path, ema: bool = True):
    """The trained model of a run (EMA weights by default), its config and its step, on the CPU."""
    from vae.model import build_model

    path = latest_checkpoint(run_dir)
    if path is None:
        raise BadInput(f"run {run_dir}: no checkpoint found (train it first)")
    state = load_checkpoint(path)
    cfg = config_of(state)
    model = build_model(cfg.model)
    model.load_state_dict(state["ema"] if ema else state["model"])
    model.eval()
    return model, cfg, int(state["step"])
