"""Every bad input a user or an attacker can hand the CLI: exit 2 and one line on stderr naming the input, no
traceback, nothing lost. One row per case; each reproduces a failure that was a hang, a traceback, silent
corruption or unbounded work before."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY
from exported_model import exported_once
from vae.cli import main


def _shards(ctx) -> Path:
    out = ctx.tmp / "shards"
    shutil.copytree(ctx.shards, out)
    return out


def _rewrite_test_shard(ctx, change, update_manifest: bool = True) -> Path:
    """Apply `change(bytes) -> bytes` to the first test shard; keep the manifest's sha256 in step with it when
    asked (so that the reader, not the checksum, meets the damage)."""
    out = _shards(ctx)
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["splits"]["test"]["shards"][0]
    path = out / "test" / record["name"]
    data = change(path.read_bytes())
    path.write_bytes(data)
    if update_manifest:
        record["sha256"] = hashlib.sha256(data).hexdigest()
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _set_size(data: bytes, member: int, field: bytes) -> bytes:
    offsets, offset = [], 0
    while data[offset] != 0:
        offsets.append(offset)
        size = int(data[offset + 124:offset + 135], 8)
        offset += 512 + (size + 511) // 512 * 512
    at = offsets[member]
    return data[:at + 124] + field.ljust(12, b"\0") + data[at + 136:]


def _cut_last_image(data: bytes) -> bytes:
    return data[:data.rindex(b"\x93NUMPY") + 100]


def _lying_npy(data: bytes) -> bytes:
    at = data.index(b"\x93NUMPY")
    return data[:at] + data[at:at + 128].replace(b"(16, 16, 3)", b"(64, 64, 3)") + data[at + 128:]


def _flip_pixel(data: bytes) -> bytes:
    at = data.index(b"\x93NUMPY") + 200
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _manifest(ctx, edit) -> Path:
    out = _shards(ctx)
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _run(ctx) -> Path:
    out = ctx.tmp / "run"
    shutil.copytree(ctx.run, out, ignore=shutil.ignore_patterns("eval*", "export*"))
    return out


def _checkpoint(ctx, write) -> Path:
    run = _run(ctx)
    latest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    write(latest)
    # a file from elsewhere (an older run, a hand copy) comes without its digest; with it, the digest refuses it
    latest.with_name(latest.name + ".sha256").unlink(missing_ok=True)
    return run


class Pickled:
    """Not a tensor, number, string or dict: `weights_only=True` refuses to rebuild it."""


def _pickled(path: Path) -> None:
    torch.save({"model": {}, "ema": {}, "step": 1, "config": "{}", "extra": Pickled()}, path)


def _other_size_shards(ctx) -> Path:
    from pipeline.shard import shard

    out = ctx.tmp / "shards8"
    shard(ctx.source, out, size=8, maxcount=50, progress=False)
    return out


def _with_metadata(ctx, name: str, key: str, value: str) -> Path:
    """The exported graph `name` alone, its metadata `key` set to `value`."""
    import onnx

    folder, _ = exported_once(ctx.run, ctx.factory)
    graph = onnx.load(str(folder / name))
    for prop in graph.metadata_props:
        if prop.key == key:
            prop.value = value
    onnx.save(graph, str(ctx.tmp / name))
    return ctx.tmp / name


DEEP = 20_000  # nesting that was a RecursionError traceback (Python's limit is 1,000 frames)


def _deep_list() -> str:
    return "[" * DEEP + "]" * DEEP


def _yaml(ctx, text: str) -> Path:
    path = ctx.tmp / "c.yaml"
    path.write_text(text)
    return path


def _train(ctx, *overrides: str) -> list[str]:
    return ["train", *_base(ctx), f"run_dir={ctx.tmp / 'r'}", *overrides]


def _registry(ctx, champion: str) -> Path:
    """A registry with one published version, v1, and `champion` as its champion.json."""
    registry = ctx.tmp / "registry"
    version = registry / "train-vae" / "versions" / "v1"
    version.mkdir(parents=True)
    (version / "version.json").write_text(json.dumps({"version": "v1", "files": {}}))
    (registry / "train-vae" / "champion.json").write_text(champion)
    return registry


def _folder_with(ctx, name: str, text: str) -> Path:
    folder = ctx.tmp / "folder"
    folder.mkdir()
    (folder / name).write_text(text)
    return folder


def _encode(ctx, preprocessing: str) -> list[str]:
    return ["encode", "--model", str(_with_metadata(ctx, "encoder.onnx", "preprocessing", preprocessing)),
            "--images", str(ctx.source / "img_align_celeba" / "000001.jpg"), "--out", str(ctx.tmp / "codes.npz")]


def _non_utf8_yaml(ctx) -> Path:
    path = ctx.tmp / "bad.yaml"
    path.write_bytes(b"train:\n  lr: 0.001 # caf\xe9\n")
    return path


def _a_file(ctx) -> Path:
    path = ctx.tmp / "a-file"
    path.write_text("not a folder")
    return path


def _base(ctx) -> list[str]:
    return [*TINY, f"data.shards={ctx.shards}", "train.steps=2"]


# (case, argv from the context, what the one line must say)
CASES = [
    ("negative tar size", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _rewrite_test_shard(c, lambda d: _set_size(d, 1, b"-0000000001")))], "size -1 runs outside"),
    ("shard cut inside its last image", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _rewrite_test_shard(c, _cut_last_image))], "runs outside"),
    ("altered pixels", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _rewrite_test_shard(c, _flip_pixel, update_manifest=False))], "sha256 differs from the manifest's"),
    ("lying .npy header", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _rewrite_test_shard(c, _lying_npy))], ".npy header declares"),
    ("manifest without splits", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _manifest(c, lambda m: m.pop("splits")))], "damaged manifest"),
    ("manifest shard name outside its folder", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _manifest(c, lambda m: m["splits"]["test"]["shards"][0].update(name="../../etc/passwd")))],
     "not a plain"),
    ("manifest without a shard's sha256", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _manifest(c, lambda m: m["splits"]["test"]["shards"][0].pop("sha256")))], "no sha256"),
    ("shards of another image size", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _other_size_shards(c))], "images of 8x8 pixels, the model takes 16x16"),
    ("a split without images", lambda c: ["eval", "--run", str(c.run), "--shards", str(
        _manifest(c, lambda m: m["splits"]["test"].update(count=0, shards=[])))], "the test split holds no images"),
    ("export with no test images to measure", lambda c: ["export", "--run", str(_run(c)), "--out", str(c.tmp / "m"),
                                                         "--shards", str(_manifest(c, lambda m: m["splits"]["test"]
                                                                                   .update(count=0, shards=[])))],
     "evaluate the run on another split first"),
    ("zero-byte checkpoint", lambda c: ["eval", "--run", str(_checkpoint(c, lambda p: p.write_bytes(b"")))],
     "empty file"),
    ("checkpoint that needs pickle", lambda c: ["eval", "--run", str(_checkpoint(c, _pickled))],
     "refusing to unpickle"),
    ("--k beyond the cap", lambda c: ["eval", "--run", str(c.run), "--k", "1000000"], "[1, 100000]"),
    ("graph and metadata disagree", lambda c: ["sample", "--model", str(_with_metadata(c, "decoder.onnx", "latent_dim",
                                                                                      "5")),
                                               "--out", str(c.tmp / "g.png")], "graph and metadata disagree"),
    ("--seed -1", lambda c: ["sample", "--model", str(exported_once(c.run, c.factory)[0]), "--seed", "-1",
                             "--out", str(c.tmp / "g.png")], "argument --seed"),
    ("--n beyond one grid", lambda c: ["sample", "--model", str(exported_once(c.run, c.factory)[0]), "--n",
                                       "5000000", "--out", str(c.tmp / "g.png")], "images in one PNG grid"),
    ("unwritable output", lambda c: ["sample", "--model", str(exported_once(c.run, c.factory)[0]), "--out",
                                     str(_a_file(c) / "g.png")], "a-file"),
    ("non-UTF-8 YAML", lambda c: ["train", "--config", str(_non_utf8_yaml(c)), *_base(c)], "not UTF-8 text"),
    ("infinite learning rate", lambda c: ["train", *_base(c), f"run_dir={c.tmp / 'r'}", "train.lr=.inf"],
     "config key 'train.lr': expected a finite number"),
    ("infinite beta", lambda c: ["train", *_base(c), f"run_dir={c.tmp / 'r'}", "objective.beta=.inf"],
     "config key 'objective.beta': expected a finite number"),
    ("resume with another learning rate", lambda c: ["train", *_base(c), f"run_dir={_run(c)}", "train.lr=0.5"],
     "train.lr 0.003 -> 0.5"),
    ("resume with another latent size", lambda c: ["train", *[a for a in _base(c) if "latent_dim" not in a],
                                                   f"run_dir={_run(c)}", "model.latent_dim=8"],
     "model.latent_dim 4 -> 8"),
    ("--dataset that names a path", lambda c: ["data", "shard", "--source", str(c.source), "--out",
                                               str(c.tmp / "s"), "--dataset", "../x"], "letters, digits"),
    # numbers past a sane range: each was an OverflowError or an allocation failure inside training
    ("a collective timeout of 1e300 s", lambda c: _train(c, "train.collective_timeout_s=1e300"),
     "config key 'train.collective_timeout_s': must be in (0, 604800] (a week), got 1e+300"),
    ("a latent of 10**10 dimensions", lambda c: _train(c, "model.latent_dim=10000000000"),
     "config key 'model.latent_dim': must be <= 4194304, got 10000000000"),
    ("a layer of 10**8 channels", lambda c: _train(c, "model.channels=[100000000,8]"),
     "config key 'model.channels': widths must be in [1, 4096]"),
    ("a batch of 10**9 images", lambda c: _train(c, "data.batch_size=1000000000"),
     "config key 'data.batch_size': must be <= 16384, got 1000000000"),
    ("a step count of 401 digits", lambda c: _train(c, "train.steps=" + "9" * 401),
     "config key 'train.steps': must be <= 99999999 (checkpoint names hold eight digits), got 999"),
    ("a learning rate of 401 digits", lambda c: _train(c, "train.lr=" + "9" * 401),
     "config key 'train.lr': expected a finite number, got 999"),
    # nesting past Python's recursion limit: refused while parsing
    ("YAML nested 20,000 deep", lambda c: ["train", "--config", str(_yaml(c, "train:\n  steps: " + _deep_list())),
                                           *_base(c)], "c.yaml: nested deeper than 16 levels"),
    ("an override nested 20,000 deep", lambda c: _train(c, "model.channels=" + _deep_list()),
     "config key 'model.channels': nested deeper than 16 levels"),
    ("an override key of 20,000 parts", lambda c: _train(c, "train." + ".".join(["x"] * DEEP) + "=1"),
     "the key nests deeper than 16 levels"),
    # records read back, each field's type checked
    ("vae info on champion.json nested 20,000 deep", lambda c: ["info", str(_registry(c, _deep_list()))],
     "champion.json: not a champion record (JSON nested too deeply)"),
    ("rollback on champion.json nested 20,000 deep", lambda c: ["registry", "rollback", str(_registry(
        c, _deep_list())), "--to", "v1", "--reason", "bad"], "champion.json: not a champion record (JSON nested"),
    ("a champion's rolled_back as a string", lambda c: ["info", str(_registry(c, json.dumps(
        {"version": "v1", "rolled_back": "v2-old"})))], "'rolled_back' is a string, expected a JSON array"),
    ("a model.json that is a list", lambda c: ["info", str(_folder_with(c, "model.json", "[]"))],
     "model.json: not a model card (it is a JSON array, expected a JSON object)"),
    ("a model.json whose metrics are a list", lambda c: ["info", str(_folder_with(c, "model.json", json.dumps(
        {"metrics": [1]})))], "model.json: not a model card ('metrics' is a JSON array"),
    ("a run's config.json whose config is a string", lambda c: ["info", str(_folder_with(c, "config.json", json.dumps(
        {"config": "x"})))], "config.json: not a run's config record ('config' is a string"),
    ("encode with a crop that is a word", lambda c: _encode(c, '{"crop": "wide"}'),
     "metadata: not a model card ('preprocessing.crop' is a string, expected an integer)"),
    ("encode with preprocessing that is a list", lambda c: _encode(c, "[148]"),
     "metadata: not a model card ('preprocessing' is a JSON array"),
]


class Context:
    def __init__(self, tmp, shards, run, source, factory):
        self.tmp, self.shards, self.run, self.source, self.factory = tmp, shards, run, source, factory


@pytest.mark.parametrize("case, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, argv, needle, tmp_path, tiny_shards, trained_run, synth_source,
                                          tmp_path_factory, capsys):
    ctx = Context(tmp_path, tiny_shards, trained_run, synth_source, tmp_path_factory)
    args = argv(ctx)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.match(r"vae( [a-z]+)*: error: ", err) and needle in err, err
    assert len(err) < 600, err  # values are shown by a short prefix, never whole


def test_a_yaml_bomb_is_refused_at_once_in_bounded_memory(tmp_path):
    """Nine levels of nine aliases: 10**9 strings from 500 bytes of YAML, which ran 38 s into a MemoryError while
    the error message formatted the value. Refused while parsing, in a process held to 1 GiB of address space."""
    import resource

    anchors = ["&a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    anchors += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"run_dir: [{', '.join(anchors)}]\n")

    def one_gib():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vae.cli", "train", "--config", str(bomb)], capture_output=True,
                          text=True, timeout=60, preexec_fn=one_gib)
    took = time.monotonic() - start
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"vae: error: config file {bomb}: more than 100000 values once its aliases are expanded")
    assert took < 5, took


def test_info_shows_the_last_complete_log_record_when_a_kill_cut_the_last_line(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    log = run / "train_log.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    with open(log, "a") as f:
        f.write('{"step": 35, "loss": 1.2')  # what a kill in the middle of a write leaves
    assert main(["info", str(run)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["last_log"] == last and "last line is not a complete record" in shown["last_log_note"]


def test_a_refused_resume_rewrites_nothing(tmp_path, tiny_shards, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", *TINY, f"data.shards={tiny_shards}", f"run_dir={run}", "train.lr=0.5"]) == 2
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_accepts_the_keys_that_may_change_and_defaults_of_new_keys(tmp_path, tiny_shards, trained_run):
    from vae.core.checkpoint import load_checkpoint, resume_differences
    from vae.core.run import latest_checkpoint
    from vae.core.config import load_config

    state = load_checkpoint(latest_checkpoint(trained_run))
    same = [*TINY, f"data.shards={tmp_path}", f"run_dir={tmp_path}", "train.steps=99", "train.checkpoint_every=3",
            "eval.k=2", "train.max_seconds=5"]
    assert resume_differences(state, load_config(None, same)) == []
    saved = json.loads(state["config"])
    del saved["train"]["channels_last"]  # a key this checkpoint's version did not have
    older = {**state, "config": json.dumps(saved)}
    assert resume_differences(older, load_config(None, same)) == []
    assert resume_differences(older, load_config(None, [*same, "train.channels_last=true"])) == [
        "train.channels_last False -> True"]


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch, capsys):
    """The write fails on the open temporary file (no name of its own): the error names the target, and the
    target's previous content and no temporary file remain."""
    import errno
    import os

    from vae_runtime.atomic import atomic_write_bytes

    target = tmp_path / "manifest.json"
    target.write_bytes(b"before")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"after")
    assert caught.value.filename == str(target)
    assert target.read_bytes() == b"before" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
