"""Sharding survives a real SIGKILL: the command killed twice mid-run, then re-run, ends byte-identical to an
uninterrupted run; no partial shard is ever visible; temporary files the kill left are removed; the CLI prints
its summary line (written, skipped, seconds)."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pipeline.records import iter_samples
from pipeline.shard import shard

ARGS = ["--size", "32", "--maxcount", "10", "--quiet"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("kill-src")
    synthesize(root, 300, seed=5)
    return root


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(source, out):
    return [sys.executable, "-m", "vae.cli", "data", "shard", "--source", str(source), "--out", str(out), *ARGS]


def _run_and_kill(source, out, after_shards):
    """Start the shard command, SIGKILL it (and its process group) once `after_shards` shards are visible."""
    before = len(list(out.rglob("*.tar"))) if out.exists() else 0
    proc = subprocess.Popen(_cli(source, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(list(out.rglob("*.tar"))) >= before + after_shards:
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the command finished before it could be killed: make the source bigger"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_result(source, tmp_path):
    reference = tmp_path / "reference"
    shard(source, reference, size=32, maxcount=10, progress=False)
    expected = _tree(reference)

    out = tmp_path / "killed"
    for after in (1, 3):
        _run_and_kill(source, out, after)
        visible = _tree(out)
        assert not any(os.path.basename(name).startswith(".") for name in visible if name.endswith(".tar"))
        for name, data in visible.items():
            if name.endswith(".tar"):  # a visible shard is always complete: identical to the reference's
                assert data == expected[name], name
                assert len(list(iter_samples(data))) == 10 or name.startswith(("valid", "test"))
    # what a kill inside an atomic write leaves behind; the re-run must clean it up (and only it)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "train" / ".celeba-train-000029.tar.k1ll3d_x.tmp").write_bytes(b"partial")
    (out / ".manifest.json.abc123.tmp").write_bytes(b"{")
    (out / ".notes.txt.abc123.tmp").write_bytes(b"not ours")

    done = subprocess.run(_cli(source, out), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"shards (\S+): written (\d+), skipped (\d+), counts (\{.*\}), (\d+\.\d) s", summary)
    assert match, summary
    assert 0 < int(match[2]) < 300 and match[3] == "0" and match[4] == "{'train': 240, 'valid': 30, 'test': 30}"

    (out / ".notes.txt.abc123.tmp").unlink()  # not the shard command's file: it was left alone
    assert _tree(out) == expected  # same manifest, same shards, nothing else


def test_rerun_summary_line_says_up_to_date(tiny_shards, synth_source, capsys):
    from vae.cli import main

    assert main(["data", "shard", "--source", str(synth_source), "--out", str(tiny_shards), "--size", "16",
                 "--maxcount", "25", "--quiet"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"shards {re.escape(str(tiny_shards))}: up to date, nothing to do, skipped 0, "
                        r"counts \{'train': \d+, 'valid': \d+, 'test': \d+\}, \d+\.\d s", line), line


def test_workers_end_quietly_when_the_parent_is_killed(source, tmp_path):
    """SIGKILL to `vae data shard` alone (not its workers): the workers end with it, printing nothing (left
    alone, each would finish its queued images and print a BrokenPipeError traceback)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([*_cli(source, out), "--workers", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not list(out.rglob("*.tar")):
            time.sleep(0.002)
        assert proc.poll() is None, "the command finished before it could be killed: make the source bigger"
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers are left to end on their own
        _, err = proc.communicate(timeout=30)  # stderr ends once every worker holding it has ended
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers still alive after the timeout
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    assert b"Traceback" not in err and b"Error" not in err, err.decode()
