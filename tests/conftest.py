"""Shared fixtures: a tiny synthetic data set, its shards, a tiny config and a briefly trained run.

Everything is generated here (no data is committed); sizes are tiny so the suite stays fast on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def tensors_of(tree):
    """Every tensor in a checkpoint's nested dicts and lists, in a fixed order (keys sorted)."""
    import torch

    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from tensors_of(tree[key])
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from tensors_of(item)


def load_bench(name: str):
    """A benchmark script of bench/ as a module; bench/ goes on the path first, since the scripts import their
    neighbour `benchkit` as when run from there."""
    import importlib.util

    bench = REPO / "bench"
    if str(bench) not in sys.path:
        sys.path.append(str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeded_model(overrides: list[str], seed: int = 0, *extra: str):
    """A model built from config overrides (plus `extra`) after torch.manual_seed(seed): the same weights each time."""
    import torch

    from vae.core.config import load_config
    from vae.models import build_model

    torch.manual_seed(seed)
    return build_model(load_config(None, [*overrides, *extra]).model)


def random_images(n: int, side: int = 16, seed: int = 0):
    """n random 8-bit RGB images [n, 3, side, side] (float values in 0..255), from a seeded generator."""
    import torch

    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(seed)).float()


def perturbed(model, scale: float = 0.3, seed: int = 1):
    """The model with weights moved away from their zero-initialised start, so every latent group's prior and
    posterior matter."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale / math.sqrt(max(1, p[0].numel())))
    return model


def tiny_config(run_dir: Path, shards: Path, *extra: str):
    from vae.core.config import load_config

    return load_config(None, [*TINY, f"run_dir={run_dir}", f"data.shards={shards}", *extra])


@pytest.fixture(scope="session")
def trained_run(tiny_shards, tmp_path_factory) -> Path:
    from vae.training.train import train

    run_dir = tmp_path_factory.mktemp("run")
    train(tiny_config(run_dir, tiny_shards, "train.steps=30", "train.checkpoint_every=15"), progress=False)
    return run_dir


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "NO_PROXY",
          "no_proxy")


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 (moto, one request at a time: tests/moto_single.py) and the environment that points s3fs and
    boto3 at it; the bucket `models` exists. fsspec's cached clients are dropped on the way in and out."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    import boto3
    import s3fs

    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "moto_single.py")], stdout=subprocess.PIPE,
                              text=True)
    endpoint = f"http://127.0.0.1:{int(server.stdout.readline())}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    # moto accepts any credentials; these are placeholders, and the endpoint is the local server only
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.kill()
        server.wait()
