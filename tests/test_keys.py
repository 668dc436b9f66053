"""Keys survive any file name: dots, spaces and percent signs stay in the key and `image_id` through this
reader and the stock WebDataset reader; names that are not UTF-8 are skipped and recorded, and the run goes on."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.loader import eval_loader
from pipeline.manifest import load_manifest
from pipeline.records import escape_key, unescape_key
from vae.cli import main

NAMES = ["a.b", "two words", "v1.2.final", "100%", "%2E", "ünïcødé.x", "plain"]


def face(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (218, 178, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.parametrize("key", NAMES + ["", "...", "%%25.."])
def test_escaping_is_reversible_and_leaves_no_dot(key):
    assert "." not in escape_key(key) and unescape_key(escape_key(key)) == key


def test_keys_with_dots_and_spaces_round_trip_through_both_readers(tmp_path):
    import webdataset as wds

    source = tmp_path / "photos"
    source.mkdir()
    for i, name in enumerate(NAMES):
        (source / f"{name}.jpg").write_bytes(face(i))
    out = tmp_path / "shards"
    assert main(["data", "shard", "--source", str(source), "--out", str(out), "--size", "16", "--quiet"]) == 0
    manifest = load_manifest(str(out))
    assert manifest["skipped"] == []
    ours = {}
    for split in ("train", "valid", "test"):
        for keys, _, metas in eval_loader(str(out), split, 8):
            ours.update({k: m["image_id"] for k, m in zip(keys, metas)})
    assert ours == {name: name for name in NAMES}
    stock = {}
    urls = [str(p) for p in sorted(out.glob("*/*.tar"))]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):  # no decoder: raw bytes only
        assert sorted(k for k in sample if not k.startswith("__")) == ["json", "npy"]  # one sample per image
        stock[unescape_key(sample["__key__"])] = json.loads(sample["json"])["image_id"]
    assert stock == ours


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_a_name_that_is_not_utf8_is_skipped_and_recorded(tmp_path, capsys):
    source = tmp_path / "photos"
    source.mkdir()
    (source / "good.jpg").write_bytes(face(1))
    with open(os.path.join(os.fsencode(source), b"bad\xff.jpg"), "wb") as f:
        f.write(face(2))
    out = tmp_path / "shards"
    assert main(["data", "shard", "--source", str(source), "--out", str(out), "--size", "16", "--quiet"]) == 0
    skipped = load_manifest(str(out))["skipped"]
    assert skipped == [{"key": "bad\\xff", "reason": "file name 'bad\\\\xff.jpg' is not UTF-8"}]
    assert sum(s["count"] for s in load_manifest(str(out))["splits"].values()) == 1
    shutil.rmtree(out)


def test_dangling_links_and_link_loops_are_recorded_in_skipped(tmp_path):
    source = tmp_path / "photos"
    source.mkdir()
    (source / "good.jpg").write_bytes(face(1))
    (source / "gone.jpg").symlink_to(source / "missing.jpg")
    (source / "loop.jpg").symlink_to(source / "loop.jpg")
    out = tmp_path / "shards"
    assert main(["data", "shard", "--source", str(source), "--out", str(out), "--size", "16", "--quiet"]) == 0
    skipped = {s["key"]: s["reason"] for s in load_manifest(str(out))["skipped"]}
    assert sorted(skipped) == ["gone", "loop"] and all("link" in r for r in skipped.values())
