"""Size caps on what the product reads (`runtime/vae_runtime/limits.py`): the caps themselves, and each reader refusing an
input over its cap in one line (or skipping an image), read no further.

The two crafted-zip tests run the real CLI in a subprocess under a memory limit. The limit is RLIMIT_DATA, not
RLIMIT_AS: `vae data shard` and `vae score` import torch, whose libraries map several GiB of address space
they never touch, so no RLIMIT_AS both lets the CLI start and bites on a read of a few hundred MiB. Each test
also runs the same command with the cap raised and checks that it then dies of memory: the limit is tight
enough that only the cap keeps the run alive.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vae_runtime import limits
from vae_runtime.errors import BadInput
from conftest import REPO, tiny_config
from vae.cli import main

MEMORY_LIMIT_MIB = 1400  # the CLI with torch loaded fits in it with a few hundred MiB to spare
MEMBER_MIB = 400  # inflated size of each crafted member: over its cap, and more than the spare memory
TINY_MB = "0.0001"  # a cap of 104 bytes, for the readers tested without a memory limit


def one_line(err: str, *needles: str) -> None:
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


# ---------------------------------------------------------------------------------------------------------
# The caps


def test_a_cap_is_its_default_unless_its_environment_variable_says_otherwise(monkeypatch):
    monkeypatch.delenv("VAE_MAX_JSON_MB", raising=False)
    assert limits.cap_bytes("json") == limits.CAPS["json"][0] * limits.MIB
    monkeypatch.setenv("VAE_MAX_JSON_MB", "2.5")
    assert limits.cap_bytes("json") == int(2.5 * limits.MIB)


@pytest.mark.parametrize("value", ["ten", "0", "-1", "nan", "inf", "1e30"])
def test_a_bad_override_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("VAE_MAX_LIST_MB", value)
    with pytest.raises(BadInput, match=r"^\$VAE_MAX_LIST_MB: .* is not a size in MiB"):
        limits.cap_bytes("list")


class Endless(io.RawIOBase):
    """A stream with no end, whatever size its header declared: it counts what it hands out."""

    def __init__(self):
        self.given = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        buffer[:] = b"x" * len(buffer)
        self.given += len(buffer)
        return len(buffer)


def test_a_stream_that_lies_about_its_size_is_read_one_byte_past_the_cap(monkeypatch):
    monkeypatch.setenv("VAE_MAX_IMAGE_MB", "1")
    stream = Endless()
    with pytest.raises(limits.OverCap, match=r"^member\.jpg: over the 1.0 MiB cap .*\$VAE_MAX_IMAGE_MB"):
        limits.read_stream(stream, "member.jpg", "image", chunk=300_000)
    assert stream.given == limits.MIB + 1


def test_a_file_at_its_cap_is_read_and_one_byte_more_is_refused_unread(monkeypatch, tmp_path):
    monkeypatch.setenv("VAE_MAX_YAML_MB", str(1000 / limits.MIB))
    path = tmp_path / "c.yaml"
    path.write_bytes(b"a" * 1000)
    assert limits.read_file(path, "yaml") == b"a" * 1000
    path.write_bytes(b"a" * 1001)
    with pytest.raises(limits.OverCap, match=r"c\.yaml: 1001 bytes, over the 1000 bytes cap for a YAML config file"):
        limits.read_file(path, "yaml")


def test_the_last_line_of_a_log_longer_than_the_cap_costs_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("VAE_MAX_JSON_MB", str(100 / limits.MIB))
    log = tmp_path / "train_log.jsonl"
    log.write_bytes(b"".join(b'{"step": %d}\n' % i for i in range(100_000)) + b"\n  \n")
    assert limits.read_last_line(log, "json", chunk=64) == b'{"step": 99999}'
    log.write_bytes(b'{"step": 1}\n' + b"x" * 101 + b"\n")
    with pytest.raises(limits.OverCap, match="train_log.jsonl: its last line: over the"):
        limits.read_last_line(log, "json", chunk=64)
    log.write_bytes(b"")
    assert limits.read_last_line(log, "json") == b""


# ---------------------------------------------------------------------------------------------------------
# Crafted zips, under a memory limit


def crafted_zip(path: Path, images: Path, member: str) -> Path:
    """A zip of a few real images and `member`: MEMBER_MIB of one repeated byte, a few hundred KB deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for image in sorted(images.glob("*.jpg"))[:8]:
            zf.write(image, f"img_align_celeba/{image.name}")
        with zf.open(member, "w", force_zip64=True) as f:
            block = b"1" * limits.MIB
            for _ in range(MEMBER_MIB):
                f.write(block)
    assert path.stat().st_size < 2 * limits.MIB
    return path


def vae_limited(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`vae ARGS` in a subprocess whose data segment is capped at MEMORY_LIMIT_MIB."""
    wrapper = ("import os, resource, sys; limit = int(sys.argv[1]) << 20; "
               "resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)); "
               "os.execv(sys.executable, [sys.executable, '-m', 'vae.cli', *sys.argv[2:]])")
    return subprocess.run([sys.executable, "-c", wrapper, str(MEMORY_LIMIT_MIB), *args], cwd=REPO, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=300)


def died_of_memory(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode not in (0, 2) and ("MemoryError" in proc.stderr or "Cannot allocate" in proc.stderr)


def test_a_list_member_that_inflates_past_its_cap_is_one_line_under_a_memory_limit(synth_source, tmp_path):
    zip_path = crafted_zip(tmp_path / "celeba.zip", synth_source / "img_align_celeba", "list_attr_celeba.txt")
    argv = ["data", "shard", "--source", str(zip_path), "--out", str(tmp_path / "shards"), "--size", "16",
            "--quiet"]
    proc = vae_limited(*argv)
    assert proc.returncode == 2, proc.stderr
    one_line(proc.stderr, "celeba.zip:list_attr_celeba.txt: 400.0 MiB, over the 32.0 MiB cap", "$VAE_MAX_LIST_MB")
    assert not (tmp_path / "shards" / "manifest.json").exists()
    assert died_of_memory(vae_limited(*argv, VAE_MAX_LIST_MB="4096"))


@pytest.fixture(scope="module")
def briefly_trained(tiny_shards, tmp_path_factory) -> Path:
    from vae.training.train import train

    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(run_dir, tiny_shards, "train.steps=2", "train.checkpoint_every=2"), progress=False)
    return run_dir


def test_score_skips_an_image_member_past_its_cap_under_a_memory_limit(synth_source, briefly_trained, tmp_path):
    zip_path = crafted_zip(tmp_path / "faces.zip", synth_source / "img_align_celeba", "img_align_celeba/huge.jpg")
    out = tmp_path / "scores.csv"
    argv = ["score", "--run", str(briefly_trained), "--source", str(zip_path), "--k", "2", "--out", str(out)]
    proc = vae_limited(*argv)
    assert proc.returncode == 0, proc.stderr
    assert len(out.read_text().splitlines()) == 1 + 8  # the header and the real images
    [skipped] = json.loads(Path(f"{out}.skipped.json").read_text())
    assert skipped["key"] == "huge" and skipped["reason"].startswith(
        "too large: ") and "faces.zip:img_align_celeba/huge.jpg: 400.0 MiB, over the 256.0 MiB cap" in skipped["reason"]
    assert died_of_memory(vae_limited(*argv, VAE_MAX_IMAGE_MB="4096"))


# ---------------------------------------------------------------------------------------------------------
# Every other reader, with a cap lowered by its variable


def test_a_list_file_over_its_cap_in_a_folder_is_one_line(synth_source, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VAE_MAX_LIST_MB", TINY_MB)
    code = main(["data", "shard", "--source", str(synth_source), "--out", str(tmp_path / "shards"), "--quiet"])
    assert code == 2
    one_line(capsys.readouterr().err, "list_eval_partition.txt: ", "over the 104 bytes cap", "$VAE_MAX_LIST_MB")


def test_an_image_file_over_its_cap_in_a_folder_is_skipped_and_recorded(synth_source, tmp_path, monkeypatch):
    from pipeline.shard import shard

    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    big = source / "img_align_celeba" / "000007.jpg"
    big.write_bytes(big.read_bytes() + b"\0" * 30_000)  # a JPEG ignores what follows its end marker
    monkeypatch.setenv("VAE_MAX_IMAGE_MB", str(30_000 / limits.MIB))
    summary = shard(source, tmp_path / "shards", size=16, progress=False)
    reasons = {r["key"]: r["reason"] for r in
               json.loads((tmp_path / "shards" / "manifest.json").read_text())["skipped"]}
    assert list(reasons) == ["000007"] and reasons["000007"].startswith(f"too large: {big}: ")
    assert summary["written"] == 119


def test_a_manifest_over_its_cap_is_one_line(synth_source, tiny_shards, tmp_path, monkeypatch, capsys):
    (tmp_path / "shards").mkdir()
    shutil.copy(tiny_shards / "manifest.json", tmp_path / "shards" / "manifest.json")
    monkeypatch.setenv("VAE_MAX_MANIFEST_MB", TINY_MB)
    code = main(["data", "shard", "--source", str(synth_source), "--out", str(tmp_path / "shards"), "--size", "16",
                 "--quiet"])
    assert code == 2
    one_line(capsys.readouterr().err, "manifest.json: ", "cap for a shard folder's manifest.json",
             "$VAE_MAX_MANIFEST_MB")


def test_a_config_file_over_its_cap_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("train:\n  steps: 10\n" + "# a comment\n" * 20)
    monkeypatch.setenv("VAE_MAX_YAML_MB", TINY_MB)
    assert main(["config", "show", "--config", str(path)]) == 2
    one_line(capsys.readouterr().err, f"config file {path}: ", "cap for a YAML config file", "$VAE_MAX_YAML_MB")


BIG_RECORD = json.dumps({"version": "v1", "files": {}, "padding": "x" * 200})


def _run_config(root: Path) -> Path:
    (root / "config.json").write_text(BIG_RECORD)
    return root / "config.json"


def _run_log(root: Path) -> Path:
    (root / "config.json").write_text("{}")
    (root / "train_log.jsonl").write_text('{"step": 1}\n' + BIG_RECORD + "\n")
    return root / "train_log.jsonl"


def _run_metrics(root: Path) -> Path:
    (root / "config.json").write_text("{}")
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text(BIG_RECORD)
    return root / "eval" / "metrics.json"


def _model_card(root: Path) -> Path:
    (root / "model.json").write_text(BIG_RECORD)
    return root / "model.json"


def _champion(root: Path) -> Path:
    from vae_runtime import registry as reg

    project = Path(reg.project_dir(root))
    project.mkdir(parents=True)
    (project / reg.CHAMPION).write_text(BIG_RECORD)
    return project / reg.CHAMPION


@pytest.mark.parametrize("make", [_run_config, _run_log, _run_metrics, _model_card, _champion])
def test_vae_info_refuses_a_record_over_its_cap_in_one_line(make, tmp_path, monkeypatch, capsys):
    record = make(tmp_path)
    monkeypatch.setenv("VAE_MAX_JSON_MB", TINY_MB)
    assert main(["info", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, f"{record}", "cap for a JSON record", "$VAE_MAX_JSON_MB")


def test_a_version_record_over_its_cap_is_refused(tmp_path, monkeypatch):
    from vae_runtime import registry as reg

    folder = Path(reg.version_dir(tmp_path, "v1"))
    folder.mkdir(parents=True)
    (folder / reg.VERSION_RECORD).write_text(BIG_RECORD)
    monkeypatch.setenv("VAE_MAX_JSON_MB", TINY_MB)
    with pytest.raises(limits.OverCap, match=f"{reg.VERSION_RECORD}: .*cap for a JSON record"):
        reg.read_version_record(tmp_path, "v1")


def test_the_runtime_refuses_a_model_card_over_its_cap(tmp_path, monkeypatch):
    from vae_runtime import verified_graph

    (tmp_path / "encoder.onnx").write_bytes(b"not read: the card is read first")
    _model_card(tmp_path)
    monkeypatch.setenv("VAE_MAX_JSON_MB", TINY_MB)
    with pytest.raises(limits.OverCap, match="model.json: .*cap for a JSON record"):
        verified_graph(tmp_path, "encoder.onnx")
