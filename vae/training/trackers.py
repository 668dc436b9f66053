"""Experiment trackers beside `train_log.jsonl`: the ones `train.trackers` names (Accelerate's `log_with` names:
tensorboard, mlflow, wandb, ...), and TensorBoard where `train.tensorboard` is on (its older spelling).

A tracker named in `train.trackers` that is not installed is one line before training (exit 2); the TensorBoard of
`train.tensorboard` (on by default) is optional: without the package, training says so and logs to the JSON lines
and grids only. Each tracker gets the run's parameters (the flat config and its `config_hash`) once, the log
lines' figures at their steps, and the sample grids as images (TensorBoard, W&B) or artifacts (MLflow). Where each
writes: TensorBoard under the run folder (`train/`); MLflow where `MLFLOW_TRACKING_URI` points (a local SQLite
file works offline), in the experiment `$MLFLOW_EXPERIMENT_NAME` (default `train`), one MLflow run per launch named
after the run folder; W&B in the project `train` (the project name Accelerate gives every tracker), one W&B run per
launch named after the run folder, online or offline as its own settings say (`WANDB_MODE=offline` writes under
`$WANDB_DIR/wandb/`, for `wandb sync` later).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from vae_runtime.errors import ConfigError
from vae.core.config import TRACKERS

# the module each of Accelerate's trackers (`vae.core.config.TRACKERS`) needs
MODULES = {name: name for name in TRACKERS}


def installed(name: str) -> bool:
    return importlib.util.find_spec(MODULES[name]) is not None


def resolve(trackers: list[str], tensorboard: bool) -> list[str]:
    """The trackers a run logs to: `trackers`, each installed (one line otherwise), plus TensorBoard where
    `tensorboard` is on and the package is there."""
    missing = [name for name in trackers if not installed(name)]
    if missing:
        raise ConfigError(f"config key 'train.trackers': {missing[0]} is not installed (pip install {missing[0]}, "
                          f"or leave it out)")
    names = list(trackers)
    if tensorboard and "tensorboard" not in names:
        if installed("tensorboard"):
            names.append("tensorboard")
        else:
            print("tensorboard is not installed: logging to train_log.jsonl only", file=sys.stderr)
    return names


def parameters(flat_config: dict, config_hash: str) -> dict:
    """The run's parameters as trackers take them: scalars as they are, lists and other values as text."""
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config.items()}
    return {**values, "config_hash": config_hash}


def init_kwargs(names: list[str], run_dir: Path) -> dict:
    """Per-tracker arguments of `Accelerator.init_trackers`: MLflow and W&B runs are named after the run folder."""
    out = {}
    if "mlflow" in names:  # the experiment: $MLFLOW_EXPERIMENT_NAME, else the project name every tracker gets
        out["mlflow"] = {"run_name": run_dir.name}
    if "wandb" in names:
        out["wandb"] = {"name": run_dir.name}
    return out


def log_grids(accelerator, names: list[str], grids: dict, files: dict, step: int) -> None:
    """The step's grids: TensorBoard and W&B get the images (uint8 [H, W, 3] arrays by name), MLflow the PNG
    files (`files`: name -> path) as artifacts under `grids/`."""
    if "tensorboard" in names:
        accelerator.get_tracker("tensorboard").log_images(
            {f"grids/{name}": grid[None] for name, grid in grids.items()}, step=step, dataformats="NHWC")
    if "wandb" in names:
        accelerator.get_tracker("wandb").log_images({f"grids/{name}": [grid] for name, grid in grids.items()},
                                                    step=step)
    if "mlflow" in names:
        import mlflow  # installed: resolve() checked it; imported only by runs that log to it

        for path in files.values():
            mlflow.log_artifact(str(path), artifact_path="grids")
