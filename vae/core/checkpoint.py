"""Checkpoints: one file per save, `RUN_DIR/checkpoints/step-NNNNNNNN.pt`, written atomically.

A checkpoint holds only tensors, numbers, strings and dicts (it loads with `weights_only=True`): model and
EMA weights, optimizer, scheduler and scaler states, the run's progress record and the full config as JSON,
so a run is reproducible from its checkpoint alone. The newest complete file is the one to resume from.
Readers of a run being trained (evaluation, export, scoring: `vae.core.run.Run`) never see a partial checkpoint
(each is renamed into place whole) and take the newest again when rotation deletes the one they chose meanwhile;
what they report names the step they read.
Beside each, `step-NNNNNNNN.pt.sha256` holds its sha256: a checkpoint whose bytes changed on disk is refused
rather than resumed from (torch reads a damaged tensor without noticing); one without it (an older run, or a
kill between the two writes) loads unverified.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import torch

from vae_runtime.atomic import atomic_write_bytes, atomic_write_text
from vae_runtime.errors import BadInput, TrainingError, one_line
from vae.core.config import Config, config_from_dict, config_to_dict
from vae.core.keys import CHANGE_ON_RESUME, flat, names
from vae.core.run import Run, checkpoint_dir, checkpoint_name, checkpoint_step, list_checkpoints


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    path = checkpoint_dir(run_dir) / checkpoint_name(step)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest_path(path).unlink(missing_ok=True)  # never a digest of other bytes beside this file
    try:
        atomic_write_bytes(path, data)
        atomic_write_text(digest_path(path), hashlib.sha256(data).hexdigest() + "\n")
    except OSError as err:  # a full disk, a quota: the checkpoints before it stay
        free = shutil.disk_usage(path.parent).free / 2**20
        raise TrainingError(f"checkpoint {path}: not written ({err.strerror or err}); {free:.0f} MiB free on its "
                            "disk; the checkpoints before it are kept") from None
    found = list_checkpoints(run_dir)
    # Checkpoints past this step belong to a segment this run abandoned (it resumed from an earlier step, as
    # machines that agree on the last step they all hold do): they would be taken for the latest. Rotation
    # keeps the newest `keep` up to this one, and never this one.
    earlier = [p for p in found if checkpoint_step(p) < step]  # oldest first
    for old in [*(p for p in found if checkpoint_step(p) > step), *earlier[:max(0, len(earlier) - (keep - 1))]]:
        old.unlink(missing_ok=True)
        digest_path(old).unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's state, loaded with `weights_only=True`; anything else is one line naming the file."""
    try:
        data = Path(path).read_bytes()
        if not data:
            raise BadInput(f"checkpoint {path}: empty file (a write that never finished?); delete it to resume "
                           "from the one before")
        want = _digest_of(Path(path))
        if want is not None and want != hashlib.sha256(data).hexdigest():
            raise BadInput(f"checkpoint {path}: its bytes differ from {digest_path(Path(path)).name} (damaged on "
                           f"disk); delete it (and {digest_path(Path(path)).name}) to resume from the one before")
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (BadInput, FileNotFoundError):  # gone: rotated away by the trainer (`Run` looks again)
        raise
    except pickle.UnpicklingError:
        raise BadInput(f"checkpoint {path}: holds Python objects beyond tensors and plain values; refusing to "
                       "unpickle it (checkpoints of this project never do)") from None
    except Exception as err:  # torch.load raises many types on damaged files
        raise BadInput(f"checkpoint {path}: cannot be loaded ({one_line(err)[:200]})") from None
    if not isinstance(state, dict) or not {"model", "ema", "step", "config"} <= set(state):
        raise BadInput(f"checkpoint {path}: not a checkpoint of this project (missing model, ema, step or config)")
    return state


def resume_differences(state: dict, cfg: Config) -> list[str]:
    """`key saved -> requested` for every key that differs and may not change on resume (`vae.core.keys`:
    CHANGE_ON_RESUME names those that may). A key the checkpoint
    does not know (added by a later version) counts as unchanged when it is requested at its default."""
    saved = flat(json.loads(state["config"]))
    requested = flat(config_to_dict(cfg))
    defaults = flat(config_to_dict(Config()))
    differ = []
    for key, value in sorted(requested.items()):
        if names(key, CHANGE_ON_RESUME):
            continue
        before = saved.get(key, defaults.get(key))
        if before != value and not (isinstance(before, (int, float)) and isinstance(value, (int, float))
                                    and float(before) == float(value)):
            differ.append(f"{key} {before!r} -> {value!r}")
    return differ


def check_resume(path: Path, state: dict, cfg: Config) -> None:
    differ = resume_differences(state, cfg)
    if differ:
        raise BadInput(f"run {cfg.run_dir}: resuming from {path.name} with another config ({'; '.join(differ)}); "
                       "only steps, time budget, cadences, locations and eval settings may change: start a new "
                       "run_dir")


def check_resume_shards(path: Path, state: dict, cfg: Config, preprocessing: dict | None) -> None:
    """The shards a run resumes on are preprocessed like those it trained on (data.shards may move, not change
    what the images are); checkpoints written before they recorded it are not compared."""
    before = state.get("preprocessing")
    if before is not None and preprocessing is not None and before != preprocessing:
        differ = sorted(key for key in set(before) | set(preprocessing) if before.get(key) != preprocessing.get(key))
        raise BadInput(f"run {cfg.run_dir}: resuming from {path.name} on shards {cfg.data.shards} preprocessed with "
                       + ", ".join(f"{k} {preprocessing.get(k)!r}" for k in differ) + "; the run trained on "
                       + ", ".join(f"{k} {before.get(k)!r}" for k in differ)
                       + ": use shards made like the first, or start a new run_dir")


def config_of(state: dict) -> Config:
    return config_from_dict(json.loads(state["config"]))


def config_json(cfg: Config) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes, values): which weights were measured."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        # flattened first: a channels_last weight of 1x1 kernels counts as contiguous with a last stride other
        # than 1, which a byte view refuses; flattening gives the values in logical order whatever the layout
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        values = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(values.view(torch.uint8).numpy().tobytes() if values.numel() else b"")
    return digest.hexdigest()


def warm_start_weights(cfg: Config) -> dict | None:
    """The EMA weights a new run starts from (`train.init_from`, a run folder), or None; refuses, with one line,
    a source that has no checkpoint or another model section (architecture, likelihood, sizes)."""
    source = cfg.train.init_from
    if not source:
        return None
    run = Run(source)
    if run.latest_checkpoint() is None:
        raise BadInput(f"train.init_from {source}: no checkpoint there to start from")
    state = run.state  # that run may be training still: its newest complete checkpoint
    theirs, ours = config_to_dict(run.config)["model"], config_to_dict(cfg)["model"]
    differ = [f"model.{k} {theirs.get(k)!r} vs {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
              if theirs.get(k) != ours.get(k)]
    if differ:
        raise BadInput(f"train.init_from {source}: another architecture ({'; '.join(differ)}); warm starts need "
                       "the same model section")
    return {"ema": state["ema"], "checkpoint": str(run.checkpoint), "step": run.step}


def _digest_of(path: Path) -> str | None:
    """The sha256 recorded beside a checkpoint, or None where there is none (an older run, or a checkpoint being
    written: its digest follows it)."""
    try:
        return digest_path(path).read_text().strip()
    except FileNotFoundError:
        return None


def trained_model(state: dict, ema: bool = True):
    """The model of a loaded checkpoint (EMA weights by default), its config and its step, on the CPU."""
    from vae.models import build_model  # lazy: the models import the config this module is read with

    cfg = config_of(state)
    model = build_model(cfg.model)
    model.load_state_dict(state["ema"] if ema else state["model"])
    model.eval()
    return model, cfg, int(state["step"])


def load_trained(run_dir: str | Path, ema: bool = True):
    """The trained model of a run's newest checkpoint (EMA weights by default), its config and its step, on the
    CPU: `Run` for callers that need nothing else of the run."""
    run = Run(run_dir)
    return run.model(ema), run.config, run.step
