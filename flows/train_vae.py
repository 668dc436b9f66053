"""The `train-vae` Prefect flow: shard -> train -> evaluate -> export -> validate -> promote.

Parameters are plain values (paths, URLs, numbers); tasks pass paths, never models. Training runs `vae train`
as a subprocess (Accelerate, N processes) whose output streams into the Prefect logs; a retried training
task resumes from the run's last checkpoint because the run folder is fixed before the first attempt.
Runs without a server (Prefect starts a temporary one) or as a deployment of `prefect.yaml`
(`train-vae/celeba-64`, `train-vae/demo`); with `synthesize_n > 0` a missing source folder is first filled with
a synthetic CelebA-layout set, so the demo deployment works on a fresh machine.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import uuid
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from common.errors import BadInput, one_line
from pipeline.preprocess import DEFAULT_CROP
from vae.config import MAX_K, config_hash, load_config
from vae.serving import registry as reg

CHAMPION_EVENT = "vae.champion.promoted"
MAX_EMBEDDED_PNG = 200_000  # bytes of one picture embedded in the summary artifact
VERSION_EXTRAS = ("model.json", "metrics.json", "samples.png", "README.md")  # beside the graphs of model.json
METRIC_ROWS = ("n_images", "elbo_nats", "recon_nats", "kl_nats", "iwae_nats", "iwae_stderr_nats", "k",
               "elbo_bpd", "nll_bpd", "active_units")


@task
def synthesize_source(source: str, n: int, seed: int = 0) -> dict:
    """Write a synthetic CelebA-layout data set of `n` images into `source` (the demo's data)."""
    from pipeline.synth import synthesize

    summary = synthesize(source, n, seed=seed)
    get_run_logger().info("synthesized %d images into %s (splits %s)", summary["n"], source, summary["splits"])
    return summary


@task(retries=2, retry_delay_seconds=[5, 30])
def shard_data(source: str, shards: str, size: int, crop: int = DEFAULT_CROP, workers: int = 1) -> dict:
    """Shard the source (no work when the manifest is current; new images land in new shards)."""
    from pipeline.shard import changed_note, shard

    summary = shard(source, shards, crop=crop, size=size, workers=workers, progress=False)
    get_run_logger().info(
        "shards %s: %s; written %d, skipped %d, counts %s", shards,
        "up to date" if summary["up_to_date"] else "updated", summary["written"], summary["skipped"],
        summary["counts"])
    if summary["changed_in_source"]:
        get_run_logger().warning(changed_note(shards, summary["changed_in_source"]))
    return summary


def _stream(cmd: list[str]) -> int:
    logger = get_run_logger()
    # tqdm redraws with carriage returns, which read back as lines: one progress line per 30 s is enough
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="30")
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
    if code == 143:  # preempted (SIGTERM) after a checkpoint: the retry resumes from it
        raise RuntimeError("vae train was stopped by SIGTERM (exit 143) after a checkpoint; a retry resumes it")
    if code != 0:
        raise RuntimeError(f"vae train exited with code {code}")
    return run_dir


@task(retries=1, retry_delay_seconds=[10])
def evaluate_model(run_dir: str, k: int | None = None) -> dict:
    """The test metrics of the run's weights; a retried flow run reuses those its first attempt wrote when they
    measured these weights on these images at this K (IWAE at K=1000 over the test split takes long)."""
    from vae.evaluation.evaluate import evaluate, reusable_metrics

    metrics = reusable_metrics(run_dir, split="test", k=k) or evaluate(run_dir, split="test", k=k)
    get_run_logger().info("test nll_bpd %.4f (K=%d), elbo_bpd %.4f over %d images",
                          metrics["nll_bpd"], metrics["k"], metrics["elbo_bpd"], metrics["n_images"])
    return metrics


@task(retries=1, retry_delay_seconds=[10])
def export_model(run_dir: str, version: str, fp16: bool = False, precisions: list[str] | None = None) -> str:
    """Export and validate (ONNX check + onnxruntime parity; with `fp16` also `decoder.fp16.onnx`, validated
    against float32); raises and writes nothing on failure."""
    from vae.serving.export import existing_export, export

    out = Path(run_dir) / "export"
    if existing_export(out, run_dir, version, fp16, tuple(precisions or ())) is None:  # a retry reuses its export
        export(run_dir, out, version=version, fp16=fp16, precisions=tuple(precisions or ()))
    return str(out.resolve())  # the complete folder the link points to now


@task
def validate_model(export_dir: str, seed: int = 0) -> str:
    """Load the exported folder with the torch-free runtime (graphs checked against model.json's sha256), decode
    a seeded grid and check the images are sane; returns the export's own sample grid."""
    import numpy as np

    from vae.runtime import Decoder

    images = Decoder(export_dir).sample(64, seed=seed)
    if not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
        raise ValueError(f"{export_dir}/decoder.onnx produced images outside [0, 1]")
    return str(Path(export_dir) / "samples.png")


def reevaluate_champion(champion: dict, challenger: dict, runs: str) -> dict:
    """The champion's test metrics on the challenger's test set and K, from the champion's run folder (kept
    under `runs`: its checkpoint is what was exported); cached in that run as `eval-<fingerprint>-k<K>/`."""
    import json

    from vae.evaluation.evaluate import evaluate

    run = Path(champion.get("run") or Path(runs) / champion["version"])
    if not (run / "checkpoints").is_dir():
        raise reg.RegistryError(f"its run folder {run} is gone (champion runs must be kept)")
    out = run / f"eval-{challenger['split_fingerprint'][:16]}-k{challenger['k']}"
    if (out / "metrics.json").exists():
        cached = json.loads((out / "metrics.json").read_text())
        if reg.comparable(reg.evidence_of(cached), challenger):
            return cached
    try:
        metrics = evaluate(run, split=challenger["split"], k=challenger["k"], shards=challenger["shards"], out=out,
                           grids=False)
    except (BadInput, OSError) as err:
        raise reg.RegistryError(str(err)) from None
    recorded = reg.champion_evidence(champion).get("weights_sha256")
    if recorded and metrics["weights_sha256"] != recorded:
        raise reg.RegistryError(f"its run folder {run} now holds other weights than the promoted ones")
    return metrics


@task(retries=2, retry_delay_seconds=[2, 10])
def promote_model(registry: str, version: str, run_dir: str, export_dir: str, metrics: dict, runs: str) -> dict:
    """Register the export folder whole as the version, then promote it when it beats the champion on the same
    test set and K (re-evaluating the champion first when it was measured on other images or at another K)."""
    import json

    export = Path(export_dir)
    card = json.loads((export / "model.json").read_text())
    if card["weights_sha256"] != metrics["weights_sha256"]:
        raise ValueError(f"{export}: exported other weights than the evaluated ones")
    files = {name: export / name for name in [*card["files"], *VERSION_EXTRAS]}
    target = reg.register(registry, version, files)
    logger = get_run_logger()

    def reevaluate(champion: dict, challenger: dict) -> dict:
        logger.info("champion %s was measured on %s: re-evaluating it on this test set at K=%d",
                    champion["version"], reg.difference(reg.champion_evidence(champion), challenger), challenger["k"])
        return reevaluate_champion(champion, challenger, runs)

    outcome = reg.promote(registry, version, metrics, run=str(Path(run_dir).resolve()), reevaluate=reevaluate)
    logger.info("version %s %s: %s", version, "promoted" if outcome["promoted"] else "kept, not promoted",
                outcome["reason"])
    if outcome["promoted"]:  # also "already the champion": a retry after a crash between the swap and the event
        announce_champion(registry, version, metrics, outcome)
    return {"version": version, "path": str(target), **outcome}


def summary_markdown(version: str, metrics: dict, result: dict, pictures: list[tuple[str, Path]]) -> str:
    """The run's summary for the Prefect UI: the decision and why, the numbers, and the pictures embedded as PNG
    data URIs (the UI is served over http and cannot show file:// images); a picture over the size limit is
    named instead of embedded, so the artifact stays small."""
    previous, again = result["previous"], result["reevaluated"]
    comparison = "no previous champion"
    if previous and again:
        comparison = (f"champion {previous['version']} re-evaluated on this test set at K={again['k']}: nll_bpd "
                      f"{again['nll_bpd']:.4f}")
    elif previous:
        comparison = f"champion {previous['version']}: nll_bpd {previous['nll_bpd']}"
    lines = [f"# train-vae {version}",
             f"- **{'promoted' if result['promoted'] else 'not promoted'}**: {result['reason']}",
             f"- test nll_bpd **{metrics['nll_bpd']:.4f}** (IWAE, K={metrics['k']}), elbo_bpd "
             f"{metrics['elbo_bpd']:.4f}, {metrics['n_images']} images; {comparison}",
             f"- version folder: `{result['path']}`", ""]
    for name, path in pictures:
        if path.is_file() and path.stat().st_size <= MAX_EMBEDDED_PNG:
            lines.append(f"![{name}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})")
        elif path.is_file():
            lines.append(f"- {name}: `{path}` ({path.stat().st_size // 1024} KB, too large to embed)")
    return "\n".join(lines)


def champion_event_id(registry: str, version: str) -> uuid.UUID:
    """One id per promotion (a version is promoted at most once: a rolled-back one never again), so the event a
    retried task sends again is the same event, which Prefect stores once."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{CHAMPION_EVENT}:{registry}:{version}")


def announce_champion(registry: str, version: str, metrics: dict, outcome: dict) -> None:
    """The Prefect event `vae.champion.promoted`, for automations and apps that react to a new champion."""
    from prefect.events import emit_event

    previous = outcome["previous"]
    if previous and previous.get("version") == version:  # a retry: the champion before it is not known here
        previous = None
    emit_event(event=CHAMPION_EVENT, id=champion_event_id(registry, version),
               resource={"prefect.resource.id": f"vae.registry.{registry}", "prefect.resource.name": registry},
               payload={"version": version, "path": reg.version_path(version), "registry": registry,
                        "previous": previous["version"] if previous else None, "reason": outcome["reason"],
                        **{key: metrics.get(key) for key in ("nll_bpd", "elbo_bpd", "split", "k",
                                                             "split_fingerprint", "n_images")}})


def check_parameters(source: str, shards: str, registry: str, runs: str, num_processes: int, k: int | None,
                     crop: int, shard_workers: int, synthesize_n: int, precisions: list[str] | None = None) -> None:
    """Reject bad flow parameters before any work, with one line that names the parameter."""
    from vae.serving.quantize import PRECISIONS

    unknown = sorted(set(precisions or []) - set(PRECISIONS))
    if unknown:
        raise BadInput(f"train-vae parameter 'precisions': {', '.join(map(str, unknown))} not offered (reduced-"
                       f"precision CPU graphs: {', '.join(PRECISIONS)}; float16 for GPUs: the fp16 parameter)")
    for name, value in (("source", source), ("shards", shards), ("registry", registry), ("runs", runs)):
        if not str(value).strip():
            raise BadInput(f"train-vae parameter '{name}': must not be empty")
    for name, value, low in (("num_processes", num_processes, 1), ("shard_workers", shard_workers, 1),
                             ("crop", crop, 0), ("synthesize_n", synthesize_n, 0)):
        if value < low:
            raise BadInput(f"train-vae parameter '{name}': must be >= {low}, got {value}")
    if k is not None and not 1 <= k <= MAX_K:
        raise BadInput(f"train-vae parameter 'k': must be in [1, {MAX_K}] or null, got {k}")
    if synthesize_n == 0 and "://" not in source and not Path(source).exists():
        raise BadInput(f"train-vae parameter 'source': {source} does not exist (point it at a CelebA folder, "
                       "img_align_celeba.zip or an image folder, or set synthesize_n to generate a synthetic set)")
    check_registry(registry)


def check_registry(registry: str) -> None:
    """The registry can take versions and promotions here: a scheme with conditional writes, its fsspec backend
    installed, a local folder that can be written (else the run would fail after training)."""
    from common import storage

    try:
        reg.champion_store(registry)  # schemes without conditional writes are refused here
    except (reg.RegistryError, ImportError, ValueError) as err:
        raise BadInput(f"train-vae parameter 'registry': {err}") from None
    if storage.is_url(registry):
        try:  # the backend is installed, the credentials and the bucket are there: reads, before training
            fs, path = storage.filesystem(registry)
            fs.exists(f"{path.rstrip('/')}/{reg.PROJECT}/{reg.CHAMPION}")
            bucket_found = registry.split("://", 1)[0] not in ("s3", "s3a") or fs.exists(path.split("/")[0])
        except Exception as err:
            raise BadInput(f"train-vae parameter 'registry': {registry} cannot be read here ({one_line(err)})") \
                from None
        if not bucket_found:
            raise BadInput(f"train-vae parameter 'registry': the bucket of {registry} does not exist or cannot be "
                           "reached with these credentials")
    else:
        writable, folder = storage.creatable(registry)  # file:///x is /x
        if not writable:
            raise BadInput(f"train-vae parameter 'registry': {registry} cannot be written here ({folder})")


def needs_synthesis(source: str, synthesize_n: int) -> bool:
    """Whether to write a synthetic set at `source`: asked for, and the source is a local folder that is missing,
    empty, or a synthetic set cut short (its in-progress mark); never a folder of real images, a zip or a URL."""
    from pipeline.synth import IN_PROGRESS

    if synthesize_n <= 0 or "://" in source:
        return False
    folder = Path(source)
    return not folder.exists() or (folder.is_dir() and (not any(folder.iterdir()) or (folder / IN_PROGRESS).exists()))


def check_shards(shards: str, precisions: list[str] | None) -> None:
    """After sharding, before training: the test split the flow evaluates and promotes on holds images, and
    int8 graphs have enough images to calibrate and validate."""
    from pipeline.manifest import load_manifest
    from vae.serving.quantize import MIN_IMAGES

    splits = load_manifest(shards)["splits"]
    count = {name: int((split or {}).get("count") or 0) for name, split in splits.items()}
    if not count.get("test"):
        raise BadInput(f"shards {shards}: the test split holds no images ({count}); the flow evaluates and promotes "
                       "on it: give a source with a test partition (list_eval_partition.txt) or more images")
    if "int8" in (precisions or []) and sum(count.values()) < MIN_IMAGES:
        raise BadInput(f"shards {shards}: {sum(count.values())} images; int8 graphs need at least {MIN_IMAGES}")


def warm_start_overrides(registry: str, runs: str) -> list[str]:
    """`train.init_from=<the champion's run>`, or nothing when there is no champion yet."""
    champion = reg.read_champion(registry)
    if champion is None:
        get_run_logger().info("warm_start: no champion yet, training from scratch")
        return []
    run = champion.get("run") or str(Path(runs) / champion["version"])
    get_run_logger().info("warm_start: from champion %s (run %s)", champion["version"], run)
    return [f"train.init_from={run}"]


def _flow_run_identity() -> tuple:
    """(start time, id) of the current flow run: stable across retries of the run."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    started = flow_run.get_scheduled_start_time() if run_id else None
    return started, run_id


@flow(name="train-vae")
def train_vae(source: str, shards: str, config: str, registry: str, runs: str = "runs",
              overrides: list[str] | None = None, num_processes: int = 1, k: int | None = None,
              crop: int = DEFAULT_CROP, shard_workers: int = 1, synthesize_n: int = 0, synthesize_seed: int = 0,
              fp16: bool = False, warm_start: bool = False, precisions: list[str] | None = None) -> dict:
    """Shard, train, evaluate, export, validate and promote one model version.

    Args:
        source: The images: a CelebA folder, img_align_celeba.zip or any image folder, as a path or fsspec URL.
        shards: Where the WebDataset shards and manifest.json live (a path or URL); only new images are sharded.
        config: The YAML config file (configs/...): what differs from the defaults.
        registry: The model registry (a path or URL): versions and champion.json.
        runs: The folder of run folders; the champion's run must be kept there (re-evaluation, warm starts).
        overrides: Config overrides as key=value strings, e.g. ["train.steps=200"].
        num_processes: Training processes on this machine (accelerate launch when more than one).
        k: Importance samples of the test IWAE bound (default: the config's eval.k).
        crop: The centred square cropped before resizing (0: the largest square).
        shard_workers: Preprocessing processes while sharding.
        synthesize_n: When the source is a missing or empty local folder, write this many synthetic faces there
            first (a source that holds anything is used as it is).
        synthesize_seed: The seed of the synthetic faces.
        fp16: Also export decoder.fp16.onnx (float16 network, float32 interface) for GPU apps.
        warm_start: Start training from the champion's EMA weights, with this run's own schedule; refused before
            any work when the architecture differs. Without a champion it starts fresh.
        precisions: Reduced-precision CPU graphs to export too, e.g. ["int8"] (decoder.int8.onnx and
            encoder.int8.onnx, validated against float32).
    """
    overrides = list(overrides or [])
    check_parameters(source, shards, registry, runs, num_processes, k, crop, shard_workers, synthesize_n, precisions)
    if warm_start:
        overrides += warm_start_overrides(registry, runs)
    cfg = load_config(config, overrides)  # bad configuration fails here, before any work
    if cfg.train.init_from:
        from vae.checkpoint import warm_start_weights

        warm_start_weights(cfg)  # another architecture, or no checkpoint: one line, before any work
    version = reg.new_version(config_hash(cfg), *_flow_run_identity())
    run_dir = str(Path(runs) / version)
    if needs_synthesis(source, synthesize_n):
        synthesize_source(source, synthesize_n, synthesize_seed)
    shard_data(source, shards, cfg.model.image_size, crop, shard_workers)
    check_shards(shards, precisions)
    train_model(config, overrides, run_dir, shards, num_processes)
    metrics = evaluate_model(run_dir, k)
    export_dir = export_model(run_dir, version, fp16, precisions)
    grid = validate_model(export_dir)
    result = promote_model(registry, version, run_dir, export_dir, metrics, runs)

    create_table_artifact(key="train-vae-metrics", table=[
        {"metric": name, "value": metrics[name]} for name in METRIC_ROWS], description=f"Test metrics of {version}")
    create_markdown_artifact(key="train-vae-summary", markdown=summary_markdown(
        version, metrics, result, [("samples", Path(grid)), ("reconstructions", Path(run_dir) / "eval" /
                                                               "reconstructions.png")]))
    return {**result, "metrics": metrics, "samples": str(Path(result["path"]) / "samples.png"), "grid": grid}
