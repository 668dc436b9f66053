"""Experiment trackers through Accelerate's `log_with`: MLflow for real on a local SQLite store (the run's
parameters and config hash, the log lines' figures at their steps, the grids as artifacts), `train.tensorboard`
as the TensorBoard entry, and a tracker that is not installed or not known in one line before training."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from vae.cli import main
from vae.core.config import config_hash
from vae.training.train import train

mlflow = pytest.importorskip("mlflow")


def test_mlflow_gets_the_parameters_the_figures_per_step_and_the_grids(tiny_shards, tmp_path, monkeypatch):
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


@pytest.mark.parametrize("trackers, needle", [("[wandb]", "wandb is not installed"),
                                              ("[mlflow,mlflow]", "a tracker named twice"),
                                              ("[neptune]", "unknown tracker 'neptune'")])
def test_a_tracker_that_cannot_run_is_one_line_before_training(tiny_shards, tmp_path, capsys, trackers, needle):
    import importlib.util

    if "wandb" in trackers and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    run = tmp_path / "run"
    code = main(["train", "--config", "configs/demo.yaml", f"run_dir={run}", f"data.shards={tiny_shards}",
                 f"train.trackers={trackers}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train.trackers" in err and needle in err, err
    assert not (run / "checkpoints").exists()
