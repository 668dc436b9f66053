"""The registry on S3 (moto, served one request at a time: see tests/moto_single.py): promoters racing in real
processes through conditional PUTs, and the torch-free runtime following the champion from a cache.

What this proves: the promoter's compare-and-swap on S3 (read with the ETag, PUT with If-Match, or with
If-None-Match for the first champion, re-decide on 412) keeps the best comparable version as champion when
several processes promote at once. It does not prove that S3 evaluates conditions atomically: AWS documents
that, and moto's threaded server does not (which is why this server handles one request at a time).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from vae_runtime import registry as reg
from vae.serving import promotion, versions

pytestmark = pytest.mark.slow
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")



def evidence(nll):
    return {"nll_bpd": nll, "elbo_bpd": 1.0, "k": 10, "split": "test", "split_fingerprint": "f" * 64,
            "image_size": 16, "n_images": 5, "shards": "s", "config_hash": "h", "weights_sha256": "w", "model_step": 1}


def publish(registry, version, tmp_path):
    src = tmp_path / f"{version}.bin"
    src.write_bytes(version.encode() * 100)
    versions.register(registry, version, {"decoder.onnx": src})


PROMOTER = """
import json, os, sys, time
from vae.serving import promotion
from vae.serving.champion_store import champion_store
registry, version, nll, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
ev = json.loads(sys.argv[5])
champion_store(registry).read()  # connect before the start line, so the race is in the promotion itself
while not os.path.exists(go):
    time.sleep(0.001)
print(json.dumps(promotion.promote(registry, version, {**ev, "nll_bpd": nll})["promoted"]))
"""


def test_a_half_registered_version_on_s3_takes_no_other_files(s3_endpoint, tmp_path, monkeypatch):
    from test_registry import half_registered_then_other_files

    half_registered_then_other_files("s3://models/claims", tmp_path, monkeypatch)


def test_the_flow_checks_an_s3_registry_before_any_work(s3_endpoint):
    from vae_runtime.errors import BadInput
    from flows.train_vae import check_registry

    check_registry("s3://models/registry")  # the bucket exists, the credentials work
    with pytest.raises(BadInput, match="the bucket of s3://no-such-bucket/registry does not exist"):
        check_registry("s3://no-such-bucket/registry")


def test_concurrent_promoters_on_s3_leave_the_best_version(s3_endpoint, tmp_path):
    import random

    rng = random.Random(5)
    for trial in range(12):
        registry = f"s3://models/race-{trial}"
        scores = [round(rng.uniform(3.0, 7.0), 4) for _ in range(3)]
        for i in range(3):
            publish(registry, f"v{i}", tmp_path)
        if trial % 2:  # half the trials start from a champion, half race for the first one (If-None-Match)
            publish(registry, "base", tmp_path)
            promotion.promote(registry, "base", evidence(6.0))
        go = tmp_path / f"go-{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", PROMOTER, registry, f"v{i}", str(s), str(go),
                                   json.dumps(evidence(0))], stdout=subprocess.PIPE, text=True)
                 for i, s in enumerate(scores)]
        time.sleep(1.5)  # all three are connected and waiting
        go.touch()
        outs = [p.communicate(timeout=60)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        best = min(scores + ([6.0] if trial % 2 else []))
        assert reg.read_champion(registry)["nll_bpd"] == best, (trial, scores, outs)


def test_runtime_follows_the_champion_from_s3_through_a_verified_cache(s3_endpoint, tmp_path, trained_run,
                                                                       tmp_path_factory):
    import numpy as np

    from exported_model import exported_once
    from vae_runtime import Champion, Decoder, RuntimeModelError

    out, _ = exported_once(trained_run, tmp_path_factory)
    registry = "s3://models/apps"
    files = {name: out / name for name in ("decoder.onnx", "encoder.onnx", "model.json")}
    versions.register(registry, "v1", files)
    promotion.promote(registry, "v1", evidence(5.0))
    cache = tmp_path / "cache"
    champion = Champion(registry, cache_dir=cache)
    assert champion.version == "v1" and not champion.refresh()
    want = Decoder(out).sample(3, seed=1)
    np.testing.assert_array_equal(champion.decoder().sample(3, seed=1), want)
    cached = next(cache.rglob("decoder.onnx"))
    assert cached.read_bytes() == (out / "decoder.onnx").read_bytes()

    cached.write_bytes(b"a damaged cache file")  # fetched again, since it no longer matches the record
    np.testing.assert_array_equal(champion.decoder().sample(3, seed=1), want)
    assert cached.read_bytes() == (out / "decoder.onnx").read_bytes()

    versions.register(registry, "v2", files)
    promotion.promote(registry, "v2", evidence(4.0))
    assert champion.refresh() and champion.version == "v2"

    import fsspec

    fs = fsspec.filesystem("s3")
    fs.pipe_file("models/apps/train-vae/versions/v2/encoder.onnx", b"replaced on the server")
    with pytest.raises(RuntimeModelError, match="encoder.onnx of v2 differs from its version record"):
        champion.encoder()
