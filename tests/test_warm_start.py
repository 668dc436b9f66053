"""Warm starts (`train.init_from`, the flow's `warm_start`): a new run begins at another run's EMA weights with
its own schedule; another architecture is refused with one line before anything is written; and the config
hashes of the shipped configs (which promotion and resume compare) do not move."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, tiny_config


def test_the_first_step_starts_from_the_source_ema_weights(trained_run, tiny_shards, tmp_path):
    from vae.core.checkpoint import load_checkpoint
    from vae.core.run import latest_checkpoint
    from vae.training.train import train

    source = load_checkpoint(latest_checkpoint(trained_run))["ema"]
    run = tmp_path / "warm"
    # one step at a vanishing learning rate: the weights after it are the weights it started from
    train(tiny_config(run, tiny_shards, "train.steps=1", "train.lr=1e-30", "train.warmup_steps=0",
                      f"train.init_from={trained_run}"), progress=False)
    state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] == 1
    for name, value in source.items():
        assert torch.allclose(state["model"][name].float(), value.float(), rtol=0, atol=1e-20), name
    fresh = tmp_path / "fresh"
    train(tiny_config(fresh, tiny_shards, "train.steps=1", "train.lr=1e-30", "train.warmup_steps=0"), progress=False)
    cold = load_checkpoint(latest_checkpoint(fresh))["model"]
    assert any(not torch.allclose(cold[n].float(), v.float()) for n, v in source.items())  # the test can fail


def test_another_architecture_is_refused_before_anything_is_written(trained_run, tiny_shards, tmp_path, capsys):
    from vae.cli import main

    run = tmp_path / "warm"
    code = main(["train", *[a for a in TINY if not a.startswith("model.latent_dim")],
                 "model.latent_dim=6", f"run_dir={run}", f"data.shards={tiny_shards}", "train.steps=2",
                 f"train.init_from={trained_run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "another architecture (model.latent_dim 4 vs 6)" in err and not run.exists()
    assert main(["train", *TINY, f"run_dir={run}", f"data.shards={tiny_shards}",
                 f"train.init_from={tmp_path / 'nothing'}"]) == 2
    assert "no checkpoint there to start from" in capsys.readouterr().err and not run.exists()


def test_the_flow_warm_starts_from_the_champion_run(tmp_path):
    from prefect.logging import disable_run_logger

    from flows.train_vae import warm_start_overrides

    registry = tmp_path / "registry"
    with disable_run_logger():
        assert warm_start_overrides(str(registry), "runs") == []
        (registry / "train-vae").mkdir(parents=True)
        (registry / "train-vae" / "champion.json").write_text(json.dumps({"version": "v1", "run": "/data/runs/v1"}))
        assert warm_start_overrides(str(registry), "runs") == ["train.init_from=/data/runs/v1"]


@pytest.mark.parametrize("name, expected", [
    # celeba64-cpu.yaml and celeba64-gpu.yaml became the VDVAE-style recipes (other models: other hashes, on
    # purpose); the earlier CPU recipe lives on as celeba64-conv-cpu.yaml with its hash; celeba64-cpu.yaml then
    # took objective.beta=2 (docs/model.md), a new model and hash on purpose
    ("celeba64-cpu.yaml", "1f60d293e6eb9e7d"), ("celeba64-conv-cpu.yaml", "1de588ff70490e0a"),
    ("celeba64-gpu.yaml", "2b3695ec460ba5cd"),
    ("celeba64-hier.yaml", "134db525571c3430"), ("celeba64.yaml", "088e2a600e59f66e"),
    ("demo.yaml", "e1a57f8e9b64caa1")])
def test_shipped_config_hashes_stay_the_same(name, expected):
    """Pinned on purpose: promotion records and resumes compare these hashes, so a new config key (with its
    default) must not change the hash of an existing config."""
    from vae.core.config import config_hash, load_config

    assert config_hash(load_config(str(REPO / "configs" / name), [])) == expected
