"""Shared fixtures: a tiny synthetic data set, its shards, a tiny config and a briefly trained run.

Everything is generated here (no data is committed); sizes are tiny so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = REPO.parent / "shared" / "data" / "celeba-sample"

# logistic_mixture: the channel-coupled decoder every shipped config uses, so the tests (export and runtime
# above all) see its graph
TINY = ["model.image_size=16", "model.channels=[8,16]", "model.latent_dim=4", "model.res_blocks=1",
        "model.likelihood=logistic_mixture",
        "data.batch_size=16", "train.lr=3e-3", "train.warmup_steps=2", "train.log_every=5",
        "eval.k=8", "eval.k_chunk=4", "eval.batch_size=16"]


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    from pipeline.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, 120, seed=3)
    return root


@pytest.fixture(scope="session")
def tiny_shards(synth_source, tmp_path_factory) -> Path:
    from pipeline.shard import shard

    out = tmp_path_factory.mktemp("shards")
    shard(synth_source, out, size=16, maxcount=25, progress=False)
    return out


def tiny_config(run_dir: Path, shards: Path, *extra: str):
    from vae.config import load_config

    return load_config(None, [*TINY, f"run_dir={run_dir}", f"data.shards={shards}", *extra])


@pytest.fixture(scope="session")
def trained_run(tiny_shards, tmp_path_factory) -> Path:
    from vae.train import train

    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(run_dir, tiny_shards, "train.steps=30", "train.checkpoint_every=15"), progress=False)
    return run_dir
