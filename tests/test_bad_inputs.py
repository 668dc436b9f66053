"""Every bad input a user or an attacker can hand the CLI: exit 2 and one line on stderr naming the input, no
traceback, nothing lost. One row per case; each reproduces a failure that was a hang, a traceback, silent
corruption or unbounded work before."""

from __future__ import annotations

import hashlib
import json
import shutil
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


def _metadata_mismatch(ctx) -> Path:
    import onnx

    folder, _ = exported_once(ctx.run, ctx.factory)
    graph = onnx.load(str(folder / "decoder.onnx"))
    for prop in graph.metadata_props:
        if prop.key == "latent_dim":
            prop.value = "5"
    onnx.save(graph, str(ctx.tmp / "decoder.onnx"))
    return ctx.tmp / "decoder.onnx"


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
    ("graph and metadata disagree", lambda c: ["sample", "--model", str(_metadata_mismatch(c)), "--out",
                                               str(c.tmp / "g.png")], "graph and metadata disagree"),
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
    assert needle in err, err


def test_a_refused_resume_rewrites_nothing(tmp_path, tiny_shards, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", *TINY, f"data.shards={tiny_shards}", f"run_dir={run}", "train.lr=0.5"]) == 2
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_accepts_the_keys_that_may_change_and_defaults_of_new_keys(tmp_path, tiny_shards, trained_run):
    from vae.checkpoint import latest_checkpoint, load_checkpoint, resume_differences
    from vae.config import load_config

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

    from common.atomic import atomic_write_bytes

    target = tmp_path / "manifest.json"
    target.write_bytes(b"before")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"after")
    assert caught.value.filename == str(target)
    assert target.read_bytes() == b"before" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
