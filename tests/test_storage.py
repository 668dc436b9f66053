"""Object storage: shards written to an fsspec URL (fsspec's in-memory store, and S3 served by moto on
127.0.0.1 inside the test) are the same bytes as on disk, and the loaders stream them back: evaluation visits
every key once, training yields batches; a re-run is a no-op."""

import itertools
import json
import os
import uuid

import torch

from vae_runtime.storage import read_bytes
from pipeline.loader import eval_loader, train_loader
from pipeline.shard import shard


def _local_tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _check_url_shards(url, synth_source, tiny_shards):
    summary = shard(synth_source, url, size=16, maxcount=25, progress=False)
    assert summary["written"] == 120
    local = _local_tree(tiny_shards)
    manifest = json.loads(read_bytes(f"{url}/manifest.json"))
    for split, info in manifest["splits"].items():
        for rec in info["shards"]:
            assert read_bytes(f"{url}/{split}/{rec['name']}") == local[f"{split}/{rec['name']}"]
    local_manifest = json.loads(local["manifest.json"])
    assert manifest["splits"] == local_manifest["splits"] and manifest["skipped"] == local_manifest["skipped"]

    keys = [k for keys, x, _ in eval_loader(url, "train", 16, num_workers=0) for k in keys]
    expected = [k for rec in manifest["splits"]["train"]["shards"] for k in rec["keys"]]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    batches = list(itertools.islice(iter(train_loader(url, 8, seed=0)), 3))
    assert all(b.shape == (8, 3, 16, 16) and b.dtype == torch.uint8 and len(k) == 8 for k, b in batches)
    assert shard(synth_source, url, size=16, maxcount=25, progress=False)["up_to_date"]


def test_memory_url_round_trip(synth_source, tiny_shards):
    _check_url_shards(f"memory://shards-{uuid.uuid4().hex}", synth_source, tiny_shards)


def test_s3_round_trip(s3_endpoint, synth_source, tiny_shards):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("shards-bucket")
    _check_url_shards("s3://shards-bucket/celeba/shards", synth_source, tiny_shards)
    names = fs.find("shards-bucket/celeba/shards")
    assert not any(os.path.basename(n).startswith(".") for n in names)  # no temporary objects, ever
    # training streams with worker processes from S3 too
    batches = list(itertools.islice(iter(train_loader("s3://shards-bucket/celeba/shards", 8, seed=0,
                                                      num_workers=2)), 2))
    assert all(b.shape == (8, 3, 16, 16) and len(k) == 8 for k, b in batches)
