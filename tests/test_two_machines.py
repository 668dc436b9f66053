"""Two machines for real: two `vae train --num-machines 2` processes (machine ranks 0 and 1, one process each)
rendezvous on 127.0.0.1 over gloo, each with its own run folder as two hosts without shared storage have. They
form one group, end with equal parameters, consume disjoint data and keep a checkpoint each; when one machine
dies the other exits within the configured timeout with one line, and a rerun of both resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.net import free_port
from conftest import REPO, TINY
from vae.core.run import latest_checkpoint

pytestmark = pytest.mark.slow


def machine(rank: int, run: Path, shards: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vae.cli", "train", *TINY, "train.tensorboard=false", f"run_dir={run}",
           f"data.shards={shards}", *extra, "--num-machines", "2", "--machine-rank", str(rank),
           "--main-process-ip", "127.0.0.1", "--main-process-port", str(port)]
    return subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def records(runs: list[Path]) -> list[dict]:
    return [json.loads((run / "ranks" / f"rank-{rank}.json").read_text()) for rank, run in enumerate(runs)]


def test_two_machines_train_as_one_group_and_resume_after_losing_one(tiny_shards, tmp_path):
    runs = [tmp_path / "machine0", tmp_path / "machine1"]
    steps = ["train.checkpoint_every=10"]
    port = free_port()
    first = finish([machine(r, runs[r], tiny_shards, port, "train.steps=20", *steps) for r in (0, 1)])
    assert all(p.returncode == 0 for p in first), [p.stderr[-1500:] for p in first]
    a, b = records(runs)
    assert a["world_size"] == b["world_size"] == 2 and a["params_sha256"] == b["params_sha256"]
    keys = [set((run / "ranks" / f"rank-{r}.keys").read_text().split()) for r, run in enumerate(runs)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]  # each machine its own shards
    assert [latest_checkpoint(run).name for run in runs] == ["step-00000020.pt"] * 2  # a checkpoint on each

    # one machine dies mid-run: the other stops within the collective timeout, with one line
    port = free_port()
    procs = [machine(r, runs[r], tiny_shards, port, "train.steps=100000", *steps, "train.collective_timeout_s=15")
             for r in (0, 1)]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not all(latest_checkpoint(run).name >= "step-00000040.pt" for run in runs):
        time.sleep(0.05)
    victim = psutil.Process(procs[1].pid)
    for process in [victim, *victim.children(recursive=True)]:  # the whole machine: CLI, launcher and rank
        process.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    survivor = finish(procs[:1], timeout=120)[0]
    procs[1].wait()
    assert time.monotonic() - killed < 45, "the surviving machine did not stop within the timeout"
    assert survivor.returncode == 1
    lines = [line for line in survivor.stderr.splitlines() if line.startswith("vae: ")]
    assert len(lines) == 1 and "lost contact with the other processes" in lines[0], survivor.stderr[-2000:]
    assert "Traceback" not in survivor.stderr and (runs[0] / "launch.log").is_file()

    # a rerun of both agrees on the newest checkpoint both machines hold, resumes from it and finishes
    held = min(int(latest_checkpoint(run).stem.split("-")[1]) for run in runs)
    target = held + 10
    port = free_port()
    rerun = finish([machine(r, runs[r], tiny_shards, port, f"train.steps={target}", *steps) for r in (0, 1)])
    assert all(p.returncode == 0 for p in rerun), [p.stderr[-1500:] for p in rerun]
    assert f"(step {held})" in rerun[0].stderr
    a, b = records(runs)
    assert a["step"] == b["step"] == target and a["params_sha256"] == b["params_sha256"]


def test_bad_input_found_by_the_ranks_is_one_line_and_exit_2(trained_run, tiny_shards, tmp_path):
    """A resume with another config, caught inside the launched ranks: one line per rank, exit 2 as on one."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    done = subprocess.run([sys.executable, "-m", "vae.cli", "train", *TINY, "train.tensorboard=false",
                           f"run_dir={run}", f"data.shards={tiny_shards}", "train.lr=0.5", "--num-processes", "2"],
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("vae: ")]
    assert lines and all("train.lr 0.003 -> 0.5" in line for line in lines) and "Traceback" not in done.stderr
