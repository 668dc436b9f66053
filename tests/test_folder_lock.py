"""One writer per folder (common/folder_lock.py), with real processes: a second holder is refused with one line
naming the folder, the holder's pid and host; `--wait` runs after the holder ends; a SIGKILLed holder leaves no
stale lock; processes started for the holder inherit it; two `vae train` on one run folder and two
`vae data shard` into one folder never mix; leases on object storage expire and are taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import folder_lock
from vae_runtime import storage
from common.folder_lock import LOCK_NAME, FolderBusy, LeaseLost
from conftest import REPO, TINY



def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))  # read at each start: the S3 fixture sets its endpoint here

# A process that takes the lock on argv[1] (lease argv[2] s on object storage), says so, and sleeps; with
# argv[3] == "child" it first starts a child that works under its lock (as `vae train` starts its launcher).
HOLDER = """
import subprocess, sys, time
from common import folder_lock
lock = folder_lock.hold(sys.argv[1], "test folder", lease_s=float(sys.argv[2]))
if sys.argv[3] == "child":
    env, fds = lock.for_children()
    code = "from common import folder_lock; import sys, time; folder_lock.hold(sys.argv[1], 'test folder'); " \\
           "open(sys.argv[1] + '/child-holds', 'w').close(); time.sleep(2.5)"
    child = subprocess.Popen([sys.executable, "-c", code, sys.argv[1]], env={**__import__("os").environ, **env},
                             pass_fds=fds)
print("held", flush=True)
time.sleep(600)
"""


def holder(folder, lease_s: float = 60.0, child: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(lease_s), "child" if child else "-"],
                            env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_second_process_is_refused_with_one_line_naming_the_folder_pid_and_host(tmp_path):
    proc = holder(tmp_path / "run")
    try:
        with pytest.raises(FolderBusy) as refused:
            folder_lock.hold(tmp_path / "run", "run folder")
        line = str(refused.value)
        assert "\n" not in line and line.startswith(f"run folder {tmp_path / 'run'}: in use by pid {proc.pid} on "
                                                    f"{socket.gethostname()}"), line
        assert "--wait" in line
        with pytest.raises(FolderBusy, match=rf"pid {proc.pid} .* after waiting 0.3 s"):
            started = time.monotonic()
            folder_lock.hold(tmp_path / "run", "run folder", wait_s=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        kill(proc)


def test_a_waiting_process_takes_the_lock_when_the_holder_ends_and_a_sigkill_leaves_none_stale(tmp_path):
    proc = holder(tmp_path / "run")
    killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(0.5); os.kill({proc.pid}, 9)"])
    started = time.monotonic()
    with folder_lock.hold(tmp_path / "run", "run folder", wait_s=30) as lock:  # the holder is SIGKILLed meanwhile
        assert time.monotonic() - started >= 0.4
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
        lock.check()
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # released: no holder named
    killer.wait()
    proc.wait()


def test_a_child_started_for_the_holder_inherits_the_lock_and_keeps_it_after_the_holder_dies(tmp_path):
    proc = holder(tmp_path / "run", child=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "run" / "child-holds").exists():  # the child went on under its parent's lock
        assert time.monotonic() < deadline
        time.sleep(0.01)
    kill(proc)  # the holder dies; the child it started under the lock (a launcher) still runs
    with pytest.raises(FolderBusy, match=f"pid {proc.pid}"):
        folder_lock.hold(tmp_path / "run", "run folder")
    with folder_lock.hold(tmp_path / "run", "run folder", wait_s=30):  # the child ended: the lock is free
        pass


def test_a_child_of_another_holder_is_not_let_in(tmp_path, monkeypatch):
    proc = holder(tmp_path / "run")
    try:  # this process claims to be a child of another pid: refused all the same
        monkeypatch.setenv(folder_lock.HELD_ENV, f"{proc.pid + 1}:{(tmp_path / 'run' / LOCK_NAME).resolve()}")
        with pytest.raises(FolderBusy):
            folder_lock.hold(tmp_path / "run", "run folder")
    finally:
        kill(proc)


@pytest.mark.slow
def test_two_vae_train_on_one_run_folder_never_mix_and_wait_runs_after(tiny_shards, tmp_path):
    run = tmp_path / "run"

    def vae_train(lr: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "vae.cli", "train", "--config", "configs/demo.yaml", *TINY,
                                 "train.tensorboard=false", "train.checkpoint_every=10", f"train.lr={lr}",
                                 f"run_dir={run}", f"data.shards={tiny_shards}", *extra],
                                cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = vae_train("0.002", "train.steps=20")
    deadline = time.monotonic() + 120
    while f'"pid": {first.pid}' not in ((run / LOCK_NAME).read_text() if (run / LOCK_NAME).exists() else ""):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # it holds the run folder: keep it there while the others start
    try:
        waiting = vae_train("0.002", "train.steps=30", "--wait", "120")
        second = vae_train("0.0005", "train.steps=20")
        out, err = second.communicate(timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vae: error: run folder {run}: in use by pid {first.pid} on "
                                                   f"{socket.gethostname()}"), err
    assert first.wait(timeout=120) == 0, first.communicate()[1]
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "resuming" in err and "step-00000020.pt" in err  # it ran after the first, from its checkpoint

    from vae.core.checkpoint import load_checkpoint
    from vae.core.run import list_checkpoints

    lrs = {json.loads(load_checkpoint(p)["config"])["train"]["lr"] for p in list_checkpoints(run)}
    assert lrs == {0.002} and [p.name for p in list_checkpoints(run)][-1] == "step-00000030.pt"
    assert json.loads((run / "config.json").read_text())["config"]["train"]["lr"] == 0.002


def test_two_shard_runs_into_one_folder_never_mix(synth_source, tmp_path):
    from pipeline.synth import synthesize

    other = synthesize(tmp_path / "other", 30, seed=5)["out"]
    out = tmp_path / "shards"

    def vae_shard(source, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "vae.cli", "data", "shard", "--source", str(source),
                                 "--out", str(out), "--size", "16", "--quiet", *extra],
                                cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = vae_shard(synth_source)
    deadline = time.monotonic() + 60
    while f'"pid": {first.pid}' not in ((out / LOCK_NAME).read_text() if (out / LOCK_NAME).exists() else ""):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)
    try:
        second = vae_shard(other)
        _, err = second.communicate(timeout=60)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"vae: error: shard folder {out}: in use by pid {first.pid} on {socket.gethostname()}")
    assert first.wait(timeout=60) == 0, first.communicate()[1]
    manifest = json.loads((out / "manifest.json").read_text())
    sharded = sum(manifest["splits"][s]["count"] for s in ("train", "valid", "test")) + len(manifest["skipped"])
    assert sharded == 120 and manifest["source"]["path"].endswith(Path(synth_source).name)  # the first's only


def test_a_lease_on_object_storage_refuses_expires_and_is_taken_over(synth_source):
    folder = "memory://leases/shards"
    first = folder_lock.hold(folder, "shard folder", lease_s=0.5)
    with pytest.raises(FolderBusy, match=f"shard folder {folder}: in use by pid {os.getpid()}"):
        folder_lock.hold(folder, "shard folder")
    time.sleep(0.8)  # renewed meanwhile: still held
    with pytest.raises(FolderBusy):
        folder_lock.hold(folder, "shard folder")
    from pipeline.shard import shard

    with pytest.raises(FolderBusy):  # sharding into it is refused before its manifest is read
        shard(synth_source, folder, size=16, progress=False)

    first._stop.set()  # the holder stalls: no more renewals (as a killed one)
    second = folder_lock.hold(folder, "shard folder", wait_s=5, lease_s=0.5)  # taken over once expired
    record = json.loads(storage.read_bytes(storage.join(folder, LOCK_NAME)))
    assert record["lease"] == second._nonce
    first.release()  # the stalled holder's release leaves the new holder's lease alone
    assert json.loads(storage.read_bytes(storage.join(folder, LOCK_NAME)))["lease"] == second._nonce
    second.release()
    assert not storage.exists(storage.join(folder, LOCK_NAME))


def test_a_holder_whose_lease_was_taken_over_stops_before_writing():
    folder = "memory://leases/lost"
    lock = folder_lock.hold(folder, "shard folder", lease_s=0.4)
    lease = storage.join(folder, LOCK_NAME)
    storage.write_bytes_atomic(lease, json.dumps({"pid": 1, "host": "elsewhere", "expires": time.time() + 60}).encode())
    time.sleep(0.3)  # the next renewal finds the lease is someone else's
    with pytest.raises(LeaseLost, match="taken over by another process"):
        lock.check()
    lock.release()
    assert json.loads(storage.read_bytes(lease))["host"] == "elsewhere"  # not deleted by the loser


@pytest.mark.slow
def test_a_lease_on_s3_held_by_a_killed_process_is_taken_over_after_it_expires(s3_endpoint):
    folder = "s3://models/shards-leased"
    proc = holder(folder, lease_s=2.0)
    try:
        with pytest.raises(FolderBusy, match=f"in use by pid {proc.pid} on {socket.gethostname()}"):
            folder_lock.hold(folder, "shard folder")
    finally:
        kill(proc)  # its lease stays until it expires
    with pytest.raises(FolderBusy, match=f"pid {proc.pid}"):
        folder_lock.hold(folder, "shard folder", lease_s=2.0)
    started = time.monotonic()
    with folder_lock.hold(folder, "shard folder", wait_s=20, lease_s=2.0) as lock:
        assert time.monotonic() - started < 5
        time.sleep(1.5)  # renewed past its first expiry
        lock.check()
        assert json.loads(storage.read_bytes(storage.join(folder, LOCK_NAME)))["pid"] == os.getpid()
    assert not storage.exists(storage.join(folder, LOCK_NAME))
