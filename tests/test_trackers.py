"""Experiment trackers through Accelerate's `log_with`: MLflow for real on a local SQLite store (the run's
parameters and config hash, the log lines' figures at their steps, the grids as artifacts), W&B for real in
offline mode (the same, read back from the run file `wandb sync` would upload), `train.tensorboard` as the
TensorBoard entry, and a tracker that is not installed or not known in one line before training."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from conftest import tiny_config
from vae.cli import main
from vae.core.config import config_hash
from vae.training.train import train


def test_mlflow_gets_the_parameters_the_figures_per_step_and_the_grids(tiny_shards, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "vae-test")
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts in ./mlruns
    run = tmp_path / "run-mlflow"
    cfg = tiny_config(run, tiny_shards, "train.steps=4", "train.log_every=2", "train.checkpoint_every=4",
                      "train.trackers=[mlflow]", "train.tensorboard=false")
    train(cfg, progress=False)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{store}")
    [experiment] = [e for e in client.search_experiments() if e.name == "vae-test"]
    [record] = client.search_runs([experiment.experiment_id])
    assert record.info.run_name == run.name
    assert record.data.params["config_hash"] == config_hash(cfg)
    assert record.data.params["train.steps"] == "4" and record.data.params["train.trackers"] == "['mlflow']"
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    history = client.get_metric_history(record.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in logged]
    artifacts = {a.path for a in client.list_artifacts(record.info.run_id, "grids")}
    assert artifacts == {"grids/step-00000004-samples.png", "grids/step-00000004-reconstructions.png"}
    assert not any(run.rglob("events.out.tfevents*"))  # TensorBoard was off


def test_train_tensorboard_is_the_tensorboard_entry(tiny_shards, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run-tb"
    train(tiny_config(run, tiny_shards, "train.steps=2", "train.checkpoint_every=2", "train.tensorboard=true"),
          progress=False)
    assert any(run.rglob("events.out.tfevents*"))


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-ID.wandb`): a 7-byte header (":W&B", magic, version), then LevelDB's
    log format (32 KiB blocks; each fragment a CRC, a little-endian length and a type: full, first, middle, last)
    holding one `wandb_internal_pb2.Record` per entry."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, at = [], b"", 7
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[at:at + 7])
        pending += data[at + 7:at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_gets_the_parameters_the_figures_per_step_and_the_grids(tiny_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run-wandb"
    cfg = tiny_config(run, tiny_shards, "train.steps=4", "train.log_every=2", "train.checkpoint_every=4",
                      "train.trackers=[wandb]", "train.tensorboard=false")
    train(cfg, progress=False)
    [folder] = (tmp_path / "wandb").glob("offline-run-*")
    [run_file] = folder.glob("run-*.wandb")
    records = wandb_records(run_file)
    [started] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.display_name == run.name and started.project == "train"
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["config_hash"] == config_hash(cfg) and config["train.steps"] == 4
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = [(h["_step"], h["loss"]) for h in history if "loss" in h]
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in logged]
    pictures = {p.name.split("_")[0] for p in (folder / "files" / "media" / "images" / "grids").glob("*.png")}
    assert pictures == {"samples", "reconstructions"}


def not_installed_tracker() -> str | None:
    from vae.core.config import TRACKERS

    return next((name for name in TRACKERS if importlib.util.find_spec(name) is None), None)


@pytest.mark.parametrize("trackers, needle", [("NOT_INSTALLED", "is not installed"),
                                              ("[mlflow,mlflow]", "a tracker named twice"),
                                              ("[neptune]", "unknown tracker 'neptune'")])
def test_a_tracker_that_cannot_run_is_one_line_before_training(tiny_shards, tmp_path, capsys, trackers, needle):
    if trackers == "NOT_INSTALLED":  # one of Accelerate's trackers that this environment lacks
        missing = not_installed_tracker()
        if missing is None:
            pytest.skip("every tracker Accelerate knows is installed here")
        trackers, needle = f"[{missing}]", f"{missing} is not installed"
    run = tmp_path / "run"
    code = main(["train", "--config", "configs/demo.yaml", f"run_dir={run}", f"data.shards={tiny_shards}",
                 f"train.trackers={trackers}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train.trackers" in err and needle in err, err
    assert not (run / "checkpoints").exists()
