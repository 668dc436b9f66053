"""The `train-vae` Prefect flow: shard -> train -> evaluate -> export -> validate -> promote.

Parameters are plain values (paths, URLs, numbers); tasks pass paths, never models. Training runs `vae train`
as a subprocess (Accelerate, N processes) whose output streams into the Prefect logs; a retried training
task resumes from the run's last checkpoint because the run folder is fixed before the first attempt.
Runs without a server (Prefect starts a temporary one) or as the deployment `train-vae/<name>`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import registry as reg
from vae.config import config_hash, load_config

METRIC_ROWS = ("n_images", "elbo_nats", "recon_nats", "kl_nats", "iwae_nats", "iwae_stderr_nats", "k",
               "elbo_bpd", "nll_bpd", "active_units")


@task(retries=2, retry_delay_seconds=[5, 30])
def shard_data(source: str, shards: str, size: int, crop: int = 148, workers: int = 1) -> dict:
    """Shard the source (no work when the manifest is current; new images land in new shards)."""
    from pipeline.shard import shard

    summary = shard(source, shards, crop=crop, size=size, workers=workers, progress=False)
    get_run_logger().info(
        "shards %s: %s; written %d, skipped %d, counts %s", shards,
        "up to date" if summary["up_to_date"] else "updated", summary["written"], summary["skipped"],
        summary["counts"])
    return summary


def _stream(cmd: list[str]) -> int:
    logger = get_run_logger()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line and "\r" not in line:
                logger.info(line)
        return proc.wait()


@task(retries=2, retry_delay_seconds=[10, 60])
def train_model(config: str, overrides: list[str], run_dir: str, shards: str, num_processes: int = 1) -> str:
    """`vae train` in a subprocess; resumes from the run's last checkpoint when retried."""
    cmd = [sys.executable, "-m", "vae.cli", "train", "--config", config, *overrides,
           f"run_dir={run_dir}", f"data.shards={shards}", "--num-processes", str(num_processes)]
    get_run_logger().info("running %s", " ".join(cmd))
    code = _stream(cmd)
    if code != 0:
        raise RuntimeError(f"vae train exited with code {code}")
    return run_dir


@task(retries=1, retry_delay_seconds=[10])
def evaluate_model(run_dir: str, k: int | None = None) -> dict:
    from vae.evaluate import evaluate

    metrics = evaluate(run_dir, split="test", k=k)
    get_run_logger().info("test nll_bpd %.4f (K=%d), elbo_bpd %.4f over %d images",
                          metrics["nll_bpd"], metrics["k"], metrics["elbo_bpd"], metrics["n_images"])
    return metrics


@task(retries=1, retry_delay_seconds=[10])
def export_model(run_dir: str, version: str) -> str:
    """Export and validate (ONNX check + onnxruntime parity); raises and writes nothing on failure."""
    from vae.export import export

    out = Path(run_dir) / "export"
    export(run_dir, out, version=version)
    return str(out)


@task
def validate_model(export_dir: str, seed: int = 0) -> str:
    """Load the exported decoder with the torch-free runtime, sample a grid, check the images are sane."""
    import numpy as np

    from vae.grid import make_grid, write_png
    from vae.runtime import Decoder

    decoder = Decoder(Path(export_dir) / "decoder.onnx")
    images = decoder.sample(64, seed=seed)
    if not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
        raise ValueError(f"{export_dir}/decoder.onnx produced images outside [0, 1]")
    return write_png(Path(export_dir) / "samples.png", make_grid(images, 8))


@task(retries=2, retry_delay_seconds=[2, 10])
def promote_model(registry: str, version: str, run_dir: str, export_dir: str, metrics: dict) -> dict:
    export = Path(export_dir)
    files = {name: export / name for name in ("encoder.onnx", "decoder.onnx", "model.json", "samples.png")}
    files["metrics.json"] = Path(run_dir) / "eval" / "metrics.json"
    target = reg.register(registry, version, files)
    promoted, reason, previous = reg.promote(registry, version, metrics)
    get_run_logger().info("version %s %s: %s", version, "promoted" if promoted else "kept, not promoted", reason)
    return {"version": version, "path": str(target), "promoted": promoted, "reason": reason,
            "previous": previous}


@flow(name="train-vae")
def train_vae(source: str, shards: str, config: str, registry: str, runs: str = "runs",
              overrides: list[str] | None = None, num_processes: int = 1, k: int | None = None,
              crop: int = 148, shard_workers: int = 1) -> dict:
    """Shard, train, evaluate, export, validate and promote one model version."""
    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # bad configuration fails here, before any work
    version = reg.new_version(config_hash(cfg))
    run_dir = str(Path(runs) / version)
    shard_data(source, shards, cfg.model.image_size, crop, shard_workers)
    train_model(config, overrides, run_dir, shards, num_processes)
    metrics = evaluate_model(run_dir, k)
    export_dir = export_model(run_dir, version)
    grid = validate_model(export_dir)
    result = promote_model(registry, version, run_dir, export_dir, metrics)

    create_table_artifact(key="train-vae-metrics", table=[
        {"metric": name, "value": metrics[name]} for name in METRIC_ROWS], description=f"Test metrics of {version}")
    previous = result["previous"]
    comparison = (f"champion {previous['version']}: nll_bpd {previous['nll_bpd']:.4f}" if previous
                  else "no previous champion")
    create_markdown_artifact(key="train-vae-summary", markdown="\n".join([
        f"# train-vae {version}",
        f"- **{'promoted' if result['promoted'] else 'not promoted'}**: {result['reason']}",
        f"- test nll_bpd **{metrics['nll_bpd']:.4f}** (IWAE, K={metrics['k']}), elbo_bpd {metrics['elbo_bpd']:.4f},"
        f" {metrics['n_images']} images; {comparison}",
        f"- version folder: `{result['path']}`",
        f"\n![samples](file://{Path(result['path']).resolve() / 'samples.png'})",
        f"![reconstructions](file://{(Path(run_dir) / 'eval' / 'reconstructions.png').resolve()})"]))
    return {**result, "metrics": metrics, "samples": str(Path(result["path"]) / "samples.png"), "grid": grid}
