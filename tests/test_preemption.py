"""Preemption: SIGTERM makes `vae train` checkpoint at the step it is on and exit 143, and the rerun ends with
the weights of a run that was never interrupted (the stream and noise are replayed to the checkpoint's step);
with several processes SIGTERM to `vae train` reaches every rank and they stop at the same step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, tiny_config

pytestmark = pytest.mark.slow

STEPS = ["train.steps=400", "train.checkpoint_every=300", "train.log_every=5", "train.tensorboard=false"]


def _train_cmd(run: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vae.cli", "train", *TINY, *STEPS, f"run_dir={run}", f"data.shards={shards}",
            *extra]


def _sigterm_after_first_log(cmd: list[str], run: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.jsonl"
    deadline = time.monotonic() + timeout
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30, "SIGTERM took too long to stop training"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _state(run: Path) -> dict:
    from vae.core.checkpoint import load_checkpoint
    from vae.core.run import latest_checkpoint

    return load_checkpoint(latest_checkpoint(run))


def test_sigterm_checkpoints_and_the_rerun_matches_an_uninterrupted_run(tiny_shards, tmp_path):
    from vae.training.train import train

    reference = tmp_path / "uninterrupted"
    train(tiny_config(reference, tiny_shards, *STEPS), progress=False)
    run = tmp_path / "preempted"
    stopped = _sigterm_after_first_log(_train_cmd(run, tiny_shards), run)
    assert stopped.returncode == 143, stopped.stderr
    assert "stopped by SIGTERM at step" in stopped.stderr
    step = _state(run)["step"]
    assert 5 <= step < 400 and step % 300 != 0, step  # inside a segment: the stream is replayed on resume
    resumed = subprocess.run(_train_cmd(run, tiny_shards), env=dict(os.environ, PYTHONPATH=str(REPO)),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    want, got = _state(reference), _state(run)
    assert got["step"] == want["step"] == 400
    for part in ("model", "ema"):
        for name, value in want[part].items():
            assert torch.equal(got[part][name], value), f"{part}.{name} differs from the uninterrupted run"
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # no step logged twice


def test_sigterm_reaches_every_rank_and_they_stop_at_the_same_step(tiny_shards, tmp_path):
    run = tmp_path / "two"
    stopped = _sigterm_after_first_log(_train_cmd(run, tiny_shards, "--num-processes", "2"), run, timeout=180)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    ranks = [json.loads((run / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == _state(run)["step"] < 400
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"] and ranks[0]["world_size"] == 2
