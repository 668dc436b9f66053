"""`vae export` SIGKILLed at many points over an existing export never leaves a mixed or broken model folder,
and the next export removes what the killed one left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_config

pytestmark = pytest.mark.slow


def whole_export(out: Path) -> str:
    """The weights digest of the complete export at `out`; fails on a mix of two exports or a broken folder."""
    from vae_runtime.digest import sha256_file

    folder = out.resolve()
    card = json.loads((folder / "model.json").read_text())
    assert sorted(card["sha256"]) == sorted(card["files"])
    for name, digest in card["sha256"].items():
        assert sha256_file(folder / name) == digest, f"{name} is not the file model.json describes"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["weights_sha256"] == card["weights_sha256"]
    return card["weights_sha256"]


def test_killed_exports_leave_the_old_or_the_new_folder_whole(trained_run, tiny_shards, tmp_path):
    from vae.serving.export import export
    from vae_runtime import Decoder
    from vae.training.train import train

    other = tmp_path / "other-run"  # different weights, so a mix of the two exports would show
    train(tiny_config(other, tiny_shards, "train.steps=4", "train.seed=7"), progress=False)
    out = tmp_path / "models" / "current"
    export(trained_run, out)
    old = whole_export(out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "vae.cli", "export", "--run", str(other), "--out", str(out)]
    started = time.monotonic()
    subprocess.run(cmd, check=True, env=env, capture_output=True)  # evaluates `other` once, times a full export
    full = time.monotonic() - started
    new = whole_export(out)
    assert new != old
    for i, fraction in enumerate((0.2, 0.5, 0.75, 0.9, 0.97)):
        run = trained_run if i % 2 == 0 else other  # alternate, so every kill lands on a switch between two
        cmd[cmd.index("--run") + 1] = str(run)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        digest = whole_export(out)
        assert digest in (old, new)
        assert Decoder(out).sample(1, seed=0).shape == (1, 3, 16, 16)
    live = os.readlink(out)
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    left = sorted(p.name for p in out.parent.iterdir())  # the live export and the one it replaced, nothing else
    assert left == sorted(["current", os.readlink(out), live, ".current.export.lock"]), left
