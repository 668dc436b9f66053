"""The `train-vae` Prefect flow: shard -> train -> evaluate -> export -> validate -> promote.

Parameters are plain values (paths, URLs, numbers); tasks pass paths, never models. Training runs `vae train`
as a subprocess (Accelerate, N processes) whose output streams into the Prefect logs; a retried training
task resumes from the run's last checkpoint because the run folder is fixed before the first attempt.
Runs without a server (Prefect starts a temporary one) or as a deployment of `prefect.yaml`
(`train-vae/celeba-64`, `train-vae/demo`); with `synthesize_n > 0` a missing source folder is first filled with
a synthetic CelebA-layout set, so the demo deployment works on a fresh machine.
torch, onnx, onnxruntime and torchvision are imported inside the tasks that use them: `prefect deploy` and
the worker load this module to find the flow and need none of them for that.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run

from vae_runtime import storage
from vae_runtime.digest import sha256_file
from vae_runtime.errors import BadInput, one_line
from vae_runtime.limits import read_file
from vae_runtime.vocabulary import precision_names
from pipeline.manifest import load_manifest
from vae_runtime.schemas import DEFAULT_CROP
from pipeline.shard import changed_note, shard
from pipeline.synth import IN_PROGRESS, synthesize
from vae.core.config import MAX_K, config_hash, load_config
from vae.core.run import Run
from vae_runtime import registry as reg
from vae.serving import promotion, versions
from vae.serving.champion_store import champion_store

CHAMPION_EVENT = "vae.champion.promoted"
MAX_EMBEDDED_PICTURE = 200_000  # bytes of one picture embedded in the summary artifact (before base64)
# The whole summary artifact. Prefect 3's server stores artifact data without a size check, but Prefect 1's server
# refused artifacts over 1 MB, proxies in front of an API (nginx's default client_max_body_size is 1 MiB) refuse
# larger requests, and the UI loads the whole markdown on every visit: the summary stays under 1 MB.
MAX_SUMMARY_BYTES = 1_000_000
MIN_PICTURE_WIDTH = 256  # pixels: a picture narrower is enlarged (nearest neighbour), never shrunk below this
JPEG_QUALITIES = (90, 80, 70, 60)  # tried at each width, largest width first; lower ones only at the smallest
LAST_RESORT_QUALITIES = (50, 40, 30, 20)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLE_FIGURES = ("kid", "precision", "recall", "density", "coverage", "swd", "fid")
MEMORISATION_ROWS = (("ratio_to_heldout", "nearest-training distance / held-out's"),  # well below 1: copies
                     ("train_to_heldout", "samples' nearest-training / nearest-held-out distance"))
VERSION_EXTRAS = ("model.json", "metrics.json", "samples.png", "README.md")  # beside the graphs of model.json
# How long a retried shard or training task waits for the folder's lock while an earlier attempt (a launcher or
# ranks that outlived it) still holds the folder, before it fails naming the holder.
LOCK_WAIT_S = 600.0
METRIC_ROWS = ("n_images", "elbo_nats", "recon_nats", "kl_nats", "iwae_nats", "iwae_stderr_nats", "k",
               "elbo_bpd", "nll_bpd", "active_units")


@task
def synthesize_source(source: str, n: int, seed: int = 0) -> dict:
    """Write a synthetic CelebA-layout data set of `n` images into `source` (the demo's data)."""
    summary = synthesize(source, n, seed=seed)
    get_run_logger().info("synthesized %d images into %s (splits %s)", summary["n"], source, summary["splits"])
    return summary


@task(retries=2, retry_delay_seconds=[5, 30])
def shard_data(source: str, shards: str, size: int, crop: int = DEFAULT_CROP, workers: int = 1,
               lock_wait_s: float = LOCK_WAIT_S) -> dict:
    """Shard the source (no work when the manifest is current; new images land in new shards); waits up to
    `lock_wait_s` for another run sharding into the same folder."""
    summary = shard(source, shards, crop=crop, size=size, workers=workers, progress=False, wait_s=lock_wait_s)
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
def train_model(config: str, overrides: list[str], run_dir: str, shards: str, num_processes: int = 1,
                lock_wait_s: float = LOCK_WAIT_S) -> str:
    """`vae train` in a subprocess; resumes from the run's last checkpoint when retried. A retry whose earlier
    attempt still holds the run folder (its launcher or ranks still ending) waits up to `lock_wait_s` for it
    rather than failing beside it (`vae train --wait`)."""
    cmd = [sys.executable, "-m", "vae.cli", "train", "--config", config, *overrides,
           f"run_dir={run_dir}", f"data.shards={shards}", "--num-processes", str(num_processes),
           "--wait", f"{lock_wait_s:g}"]
    get_run_logger().info("running %s", " ".join(cmd))
    code = _stream(cmd)
    if code == 143:  # preempted (SIGTERM) after a checkpoint: the retry resumes from it
        raise RuntimeError("vae train was stopped by SIGTERM (exit 143) after a checkpoint; a retry resumes it")
    if code != 0:
        raise RuntimeError(f"vae train exited with code {code}")
    return run_dir


@task(retries=1, retry_delay_seconds=[10])
def evaluate_model(run_dir: str, k: int | None = None, inception_weights: str | None = None) -> dict:
    """The test metrics of the run's weights, with the sample-quality figures (FID too with `inception_weights`);
    a retried flow run reuses those its first attempt wrote when they measured these weights on these images at
    this K, with sample figures on the same Inception weights (IWAE at K=1000 over the test split takes long)."""
    from vae.evaluation.evaluate import evaluate, reusable_metrics

    metrics = reusable_metrics(run_dir, split="test", k=k)
    if metrics is not None and not samples_as_asked(metrics, inception_weights):
        metrics = None
    metrics = metrics or evaluate(run_dir, split="test", k=k, inception_weights=inception_weights)
    logger = get_run_logger()
    logger.info("test nll_bpd %.4f (K=%d), elbo_bpd %.4f over %d images",
                metrics["nll_bpd"], metrics["k"], metrics["elbo_bpd"], metrics["n_images"])
    primary = promotion.sample_primary(metrics.get("samples"))
    if primary is not None:
        logger.info("samples: %s %s at temperature %s (measure %s)", str(primary["metric"]).upper(),
                    _figure(primary), primary["temperature"], primary["measure"])
    return metrics


def samples_as_asked(metrics: dict, inception_weights: str | None) -> bool:
    """Whether `metrics` hold sample figures measured with these Inception weights (none: no FID)."""
    samples = metrics.get("samples")
    if not isinstance(samples, dict) or promotion.sample_primary(samples) is None:
        return False
    inception = (samples.get("features") or {}).get("inception")
    if not inception_weights:
        return inception is None

    try:
        return isinstance(inception, dict) and inception.get("sha256") == sha256_file(inception_weights)
    except OSError:
        return False


@task(retries=1, retry_delay_seconds=[10])
def export_model(run_dir: str, version: str, precisions: list[str] | None = None) -> str:
    """Export and validate (ONNX check + onnxruntime parity; the graphs of `precisions` too, e.g. fp16's
    `decoder.fp16.onnx`, validated against fp32); raises and writes nothing on failure."""
    from vae.serving.export import existing_export, export

    out = Path(run_dir) / "export"
    if existing_export(out, run_dir, version, tuple(precisions or ())) is None:  # a retry reuses its export
        export(run_dir, out, version=version, precisions=tuple(precisions or ()))
    return str(out.resolve())  # the complete folder the link points to now


@task
def validate_model(export_dir: str, seed: int = 0) -> str:
    """Load the exported folder with the torch-free runtime (graphs checked against model.json's sha256), decode
    a seeded grid and check the images are sane; returns the export's own sample grid."""

    from vae_runtime import Decoder

    images = Decoder(export_dir).sample(64, seed=seed)
    if not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
        raise ValueError(f"{export_dir}/decoder.onnx produced images outside [0, 1]")
    return str(Path(export_dir) / "samples.png")


def reevaluate_champion(champion: dict, challenger: dict, runs: str, inception_weights: str | None = None) -> dict:
    """The champion's test metrics measured as the challenger's were: its test set and K, and (when the challenger
    has sample figures) the same temperatures, image count and Inception weights, from the champion's run folder
    (kept under `runs`: its checkpoint is what was exported); cached in that run as
    `eval-<fingerprint>-k<K>[-s<sample measure>]/`, reused only when it measured the same way."""
    from vae.evaluation.evaluate import evaluate

    run = Path(champion.get("run") or Path(runs) / champion["version"])
    if not Run(run).checkpoints():
        raise reg.RegistryError(f"its run folder {run} is gone (champion runs must be kept)")
    wanted = challenger.get("sample_primary")
    measure = str((wanted or {}).get("measure") or "")
    if measure and not re.fullmatch(r"[0-9a-f]{1,64}", measure):  # read from a record: never a path
        measure = hashlib.sha256(measure.encode()).hexdigest()[:16]
    out = run / f"eval-{challenger['split_fingerprint'][:16]}-k{challenger['k']}{f'-s{measure}' if measure else ''}"
    if (out / "metrics.json").exists():
        cached = json.loads(read_file(out / "metrics.json", "json"))
        if promotion.comparable(promotion.evidence_of(cached), challenger):
            return cached
    try:
        metrics = evaluate(run, split=challenger["split"], k=challenger["k"], shards=challenger["shards"], out=out,
                           grids=False, samples=wanted is not None,
                           temperatures=(wanted or {}).get("temperatures") or None,
                           sample_images=(wanted or {}).get("n_images") or None,
                           inception_weights=inception_weights if wanted is not None else None)
    except (BadInput, OSError) as err:
        raise reg.RegistryError(str(err)) from None
    recorded = promotion.champion_evidence(champion).get("weights_sha256")
    if recorded and metrics["weights_sha256"] != recorded:
        raise reg.RegistryError(f"its run folder {run} now holds other weights than the promoted ones")
    return metrics


@task(retries=2, retry_delay_seconds=[2, 10])
def promote_model(registry: str, version: str, run_dir: str, export_dir: str, metrics: dict, runs: str,
                  sample_tolerance: float = promotion.SAMPLE_TOLERANCE, inception_weights: str | None = None) -> dict:
    """Register the export folder whole as the version, then promote it when it beats the champion on the same
    test set and K and its primary sample figure is not worse beyond `sample_tolerance` standard errors
    (re-evaluating the champion first when it was measured on other images, at another K, or its samples another
    way: with `inception_weights` as the challenger's were)."""
    export = Path(export_dir)
    card = json.loads(read_file(export / "model.json", "json"))
    if card["weights_sha256"] != metrics["weights_sha256"]:
        raise ValueError(f"{export}: exported other weights than the evaluated ones")
    files = {name: export / name for name in [*card["files"], *VERSION_EXTRAS]}
    target = versions.register(registry, version, files)
    logger = get_run_logger()

    def reevaluate(champion: dict, challenger: dict) -> dict:
        logger.info("champion %s was measured another way (%s): re-evaluating it on this test set at K=%d%s",
                    champion["version"], promotion.difference(promotion.champion_evidence(champion), challenger),
                    challenger["k"],
                    " with this version's sample measure" if challenger.get("sample_primary") else "")
        return reevaluate_champion(champion, challenger, runs, inception_weights)

    outcome = promotion.promote(registry, version, metrics, run=str(Path(run_dir).resolve()),
                                reevaluate=reevaluate, sample_tolerance=sample_tolerance)
    logger.info("version %s %s: %s", version, "promoted" if outcome["promoted"] else "kept, not promoted",
                outcome["reason"])
    if outcome["promoted"]:  # also "already the champion": a retry after a crash between the swap and the event
        announce_champion(registry, version, metrics, outcome)
    return {"version": version, "path": str(target), **outcome}


def _figure(figure: dict | None, digits: int = 4) -> str:
    """`value ± stderr` of a figure ({"value", "stderr"}), or a dash when there is none."""
    if not isinstance(figure, dict) or not isinstance(figure.get("value"), (int, float)):
        return "–"
    value, se = figure["value"], figure.get("stderr")
    text = f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return text + (f" ± {se:.2g}" if isinstance(se, (int, float)) and math.isfinite(se) else "")


def _best_prior(samples: dict) -> tuple[str, dict]:
    """(temperature key, figures) of the prior samples at the primary figure's (best) temperature."""
    key = f"{samples['primary']['temperature']:g}"
    return key, (samples.get("prior") or {}).get(key) or {}


def sample_summary_lines(samples: dict) -> list[str]:
    """The sample-quality figures in markdown: the primary one with its floor, FID or why it is missing, and a
    table of every figure of the floor, the prior samples at each temperature and the reconstructions."""
    primary, floor = samples["primary"], samples.get("floor") or {}
    metric = primary["metric"]
    best, best_figures = _best_prior(samples)
    temperatures = [f"{t:g}" for t in samples.get("temperatures") or [primary["temperature"]]]
    space = ((samples.get("features") or {}).get("random") or {}).get("name", "random features")
    lines = [f"- samples: {metric.upper()} **{_figure(primary)}** (prior samples at temperature {best}, the best of "
             f"{', '.join(temperatures)}; lower is better), real-versus-real floor {_figure(floor.get(metric))}; "
             f"{samples.get('n_generated')} samples against {samples.get('n_heldout')} held-out and "
             f"{samples.get('n_train')} training images, in {space} features (measure `{samples.get('measure')}`)"]
    if isinstance(best_figures.get("fid"), dict):
        lines.append(f"- FID {_figure(best_figures['fid'])} at temperature {best} (floor {_figure(floor.get('fid'))})")
    else:
        lines.append(f"- FID: not measured: {samples.get('fid_reason') or 'no Inception weights given'}")
    prior = samples.get("prior") or {}
    columns = [("floor (held-out vs training)", floor)]
    columns += [(f"prior t={t}" + (" (best)" if t == best else ""), prior.get(t) or {}) for t in temperatures]
    columns.append(("reconstructions", samples.get("reconstructions") or {}))
    lines += ["", "| figure | " + " | ".join(name for name, _ in columns) + " |",
              "| --- |" + " --- |" * len(columns)]
    for name in SAMPLE_FIGURES:
        lines.append(f"| {name} | " + " | ".join(_figure(figures.get(name)) for _, figures in columns) + " |")
    for key, label in MEMORISATION_ROWS:
        ratios = [(figures.get("memorisation") or {}).get(key) if name.startswith("prior") else None
                  for name, figures in columns]
        if any(isinstance(r, (int, float)) for r in ratios):
            lines.append(f"| {label} | " + " | ".join(
                f"{r:.3g}" if isinstance(r, (int, float)) else "–" for r in ratios) + " |")
    lines.append("")
    return lines


def sample_rows(samples: dict | None) -> list[dict]:
    """The table artifact's rows of the sample figures (values only, flattened names: `samples.prior.kid` is the
    prior samples' KID at the best temperature, `samples.prior.t0.8.kid` at each temperature)."""
    if promotion.sample_primary(samples) is None:
        return []
    primary, metric = samples["primary"], samples["primary"]["metric"]
    rows = [(f"samples.primary.{metric}", primary.get("value")), (f"samples.primary.{metric}_stderr",
                                                                   primary.get("stderr")),
            ("samples.primary.temperature", primary.get("temperature")), ("samples.measure", samples.get("measure")),
            ("samples.n_heldout", samples.get("n_heldout"))]
    best, best_figures = _best_prior(samples)

    def values(prefix: str, figures: dict, names=SAMPLE_FIGURES) -> list[tuple]:
        return [(f"{prefix}.{name}", (figures.get(name) or {}).get("value")) for name in names
                if isinstance(figures.get(name), dict)]

    rows += values("samples.floor", samples.get("floor") or {})
    rows += values("samples.prior", best_figures)
    memorisation = best_figures.get("memorisation") or {}
    rows.append(("samples.prior.memorisation_ratio", memorisation.get("ratio_to_heldout")))
    if "train_to_heldout" in memorisation:
        rows.append(("samples.prior.memorisation_train_to_heldout", memorisation["train_to_heldout"]))
    for t, figures in (samples.get("prior") or {}).items():
        rows += values(f"samples.prior.t{t}", figures, (metric,))
    rows += values("samples.reconstructions", samples.get("reconstructions") or {})
    if samples.get("fid_reason"):
        rows.append(("samples.fid_reason", samples["fid_reason"]))
    return [{"metric": name, "value": value} for name, value in rows]


def metric_rows(metrics: dict) -> list[dict]:
    """The rows of the table artifact `train-vae-metrics`: the bounds, then the sample figures."""
    return [{"metric": name, "value": metrics.get(name)} for name in METRIC_ROWS] + sample_rows(metrics.get("samples"))


def embeddable_picture(path: Path, limit: int = MAX_EMBEDDED_PICTURE) -> tuple[str, bytes] | None:
    """(MIME type, bytes) of the picture at `path` in at most `limit` bytes and at least MIN_PICTURE_WIDTH pixels
    wide: the PNG as it is when it fits (a narrower one enlarged by a whole factor, nearest neighbour, first),
    else JPEG at decreasing quality, then at decreasing widths (never below MIN_PICTURE_WIDTH, or the picture's
    own width if that is less); the result is decoded back once to check it is a whole picture. None when the
    file is not a picture or nothing fits."""

    try:
        with Image.open(path) as opened:
            picture = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    width, height = picture.size
    data, mime = path.read_bytes(), "image/png"
    if width < MIN_PICTURE_WIDTH:
        factor = -(-MIN_PICTURE_WIDTH // width)
        picture = picture.resize((width * factor, height * factor), Image.NEAREST)
        width, height = picture.size
        buffer = io.BytesIO()
        picture.save(buffer, "PNG", optimize=True)
        data = buffer.getvalue()
    if data[:8] != PNG_SIGNATURE or len(data) > limit:
        data, mime = _jpeg_within(picture, limit), "image/jpeg"
        if data is None:
            return None
    try:
        with Image.open(io.BytesIO(data)) as check:
            check.load()
    except (OSError, ValueError):
        return None
    return mime, data


def _jpeg_within(picture, limit: int) -> bytes | None:
    """The RGB Pillow `picture` as JPEG in at most `limit` bytes: each quality of JPEG_QUALITIES at the full width,
    then at widths shrinking by a fifth down to MIN_PICTURE_WIDTH (or the picture's width, if less), then lower
    qualities at that width; None when nothing fits."""

    width, height = picture.size
    smallest, widths = min(width, MIN_PICTURE_WIDTH), [width]
    while widths[-1] > smallest:
        widths.append(max(smallest, int(widths[-1] * 0.8)))
    tries = [(w, q) for w in widths for q in JPEG_QUALITIES] + [(widths[-1], q) for q in LAST_RESORT_QUALITIES]
    for w, quality in tries:
        shown = picture if w == width else picture.resize((w, max(1, round(height * w / width))), Image.LANCZOS)
        buffer = io.BytesIO()
        shown.save(buffer, "JPEG", quality=quality, optimize=True)
        if len(buffer.getvalue()) <= limit:
            return buffer.getvalue()
    return None


def summary_pictures(run_dir: str | Path, grid: str | Path, metrics: dict) -> list[tuple[str, Path, str]]:
    """(name, file, caption) of the summary's pictures: the exported decoder's samples, the reconstructions, and
    the evaluation's prior samples at each temperature of the sample metrics."""
    folder = Run(run_dir).eval_dir
    pictures = [("samples", Path(grid), "decoder.onnx, the exported graph, through onnxruntime: 64 prior samples "
                                        "(seed 0, temperature 1)"),
                ("reconstructions", folder / "reconstructions.png",
                 "reconstructions: test images, each followed by its reconstruction (the decoded posterior mean)")]
    samples, images = metrics.get("samples") or {}, metrics.get("images") or {}
    best = (samples.get("primary") or {}).get("temperature")
    for t in samples.get("temperatures") or []:
        name = f"samples-t{t:g}"
        if images.get(name):
            pictures.append((name, folder / images[name], f"prior samples at temperature {t:g}: the first 64 of the "
                             f"{samples.get('n_generated')} the sample metrics measured"
                             + (" (the best temperature: the primary figure)" if t == best else "")))
    return pictures


def summary_markdown(version: str, metrics: dict, result: dict, pictures: list[tuple]) -> str:
    """The run's summary for the Prefect UI: the decision and why, the numbers (bits/dim and the sample figures),
    and the pictures embedded as data URIs (the UI is served over http and cannot show file:// images), each with
    a caption. `pictures` holds (name, path) or (name, path, caption). The pictures share what MAX_SUMMARY_BYTES
    leaves after the text, smallest file first, each at most an equal share of what is left and
    MAX_EMBEDDED_PICTURE bytes: a PNG that fits is embedded as it is, a larger one as JPEG
    (`embeddable_picture`); one that cannot fit is named instead."""
    previous, again = result["previous"], result["reevaluated"]
    comparison = "no previous champion"
    theirs = None
    if previous and again:
        comparison = (f"champion {previous['version']} re-evaluated on this test set at K={again['k']}: nll_bpd "
                      f"{again['nll_bpd']:.4f}")
        theirs = again.get("sample_primary")
    elif previous:
        comparison = f"champion {previous['version']}: nll_bpd {previous['nll_bpd']}"
        theirs = (promotion.champion_evidence(previous) or {}).get("sample_primary")
    if theirs and previous.get("version") != version:
        comparison += (f", {str(theirs.get('metric')).upper()} {_figure(theirs)} at temperature "
                       f"{theirs.get('temperature')}")
    lines = [f"# train-vae {version}",
             f"- **{'promoted' if result['promoted'] else 'not promoted'}**: {result['reason']}",
             f"- test nll_bpd **{metrics['nll_bpd']:.4f}** (IWAE, K={metrics['k']}), elbo_bpd "
             f"{metrics['elbo_bpd']:.4f}, {metrics['n_images']} images; {comparison}"]
    samples = metrics.get("samples")
    if promotion.sample_primary(samples) is not None:
        lines += sample_summary_lines(samples)
    else:
        lines.append("- samples: no sample-quality figures in these metrics")
    lines += [f"- version folder: `{result['path']}`", ""]
    text = "\n".join(lines)
    shown = [(item[0], Path(item[1]), item[2] if len(item) > 2 else item[0]) for item in pictures]
    shown = [item for item in shown if item[1].is_file()]
    room = MAX_SUMMARY_BYTES - len(text.encode()) - sum(300 + len(caption.encode()) for _, _, caption in shown)
    room = max(0, room) * 3 // 4  # bytes of pictures: base64 takes 4 characters for 3 bytes
    encoded = {}
    for i in sorted(range(len(shown)), key=lambda i: shown[i][1].stat().st_size):  # small ones leave room to others
        encoded[i] = embeddable_picture(shown[i][1], min(MAX_EMBEDDED_PICTURE, room // (len(shown) - len(encoded))))
        room -= len(encoded[i][1]) if encoded[i] else 0
    for i, (name, path, caption) in enumerate(shown):
        picture = encoded[i]
        if picture is None:
            lines += [f"- {name}: `{path}` ({path.stat().st_size // 1024} KB, too large to embed): {caption}", ""]
            continue
        mime, data = picture
        lines += [f"![{name}](data:{mime};base64,{base64.b64encode(data).decode()})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def champion_event_id(registry: str, version: str) -> uuid.UUID:
    """One id per promotion (a version is promoted at most once: a rolled-back one never again), so the event a
    retried task sends again is the same event, which Prefect stores once."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{CHAMPION_EVENT}:{registry}:{version}")


def announce_champion(registry: str, version: str, metrics: dict, outcome: dict) -> None:
    """The Prefect event `vae.champion.promoted`, for automations and apps that react to a new champion."""
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
                     crop: int, shard_workers: int, synthesize_n: int, precisions: list[str] | None = None,
                     sample_tolerance: float = promotion.SAMPLE_TOLERANCE, inception_weights: str | None = None,
                     lock_wait_s: float = LOCK_WAIT_S) -> None:
    """Reject bad flow parameters before any work, with one line that names the parameter."""
    try:
        promotion.check_tolerance(sample_tolerance)
    except reg.RegistryError:
        raise BadInput(f"train-vae parameter 'sample_tolerance': must be a finite number >= 0 (standard errors of "
                       f"the difference a challenger's primary sample figure may be worse by), got "
                       f"{sample_tolerance!r}") from None
    if inception_weights is not None:
        check_inception_weights(inception_weights, "inception_weights")

    precision_names(precisions, BadInput, "train-vae parameter 'precisions': precision")
    for name, value in (("source", source), ("shards", shards), ("registry", registry), ("runs", runs)):
        if not str(value).strip():
            raise BadInput(f"train-vae parameter '{name}': must not be empty")
    for name, value, low in (("num_processes", num_processes, 1), ("shard_workers", shard_workers, 1),
                             ("crop", crop, 0), ("synthesize_n", synthesize_n, 0)):
        if value < low:
            raise BadInput(f"train-vae parameter '{name}': must be >= {low}, got {value}")
    if k is not None and not 1 <= k <= MAX_K:
        raise BadInput(f"train-vae parameter 'k': must be in [1, {MAX_K}] or null, got {k}")
    if isinstance(lock_wait_s, bool) or not (isinstance(lock_wait_s, (int, float)) and 0 <= lock_wait_s < math.inf):
        raise BadInput(f"train-vae parameter 'lock_wait_s': must be a finite number of seconds >= 0, got "
                       f"{lock_wait_s!r}")
    if synthesize_n == 0 and "://" not in source and not Path(source).exists():
        raise BadInput(f"train-vae parameter 'source': {source} does not exist (point it at a CelebA folder, "
                       "img_align_celeba.zip or an image folder, or set synthesize_n to generate a synthetic set)")
    check_registry(registry)


def check_inception_weights(path: str, where: str) -> None:
    """The FID Inception weights file is readable, is the published one and loads (one line naming `where`)."""
    from vae.evaluation.inception import check_weights

    if not str(path).strip():
        raise BadInput(f"train-vae parameter '{where}': must not be empty (leave it null for no FID)")
    try:
        check_weights(path)
    except BadInput as err:
        raise BadInput(f"train-vae parameter '{where}': {' '.join(str(err).split())}") from None


def check_registry(registry: str) -> None:
    """The registry can take versions and promotions here: a scheme with conditional writes, its fsspec backend
    installed, a local folder that can be written (else the run would fail after training)."""
    try:
        champion_store(registry)  # schemes without conditional writes are refused here
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
    if synthesize_n <= 0 or "://" in source:
        return False
    folder = Path(source)
    return not folder.exists() or (folder.is_dir() and (not any(folder.iterdir()) or (folder / IN_PROGRESS).exists()))


def check_shards(shards: str, precisions: list[str] | None) -> None:
    """After sharding, before training: the test split the flow evaluates and promotes on holds images, and
    int8 graphs have enough images to calibrate and validate."""
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
    run_id = flow_run.get_id()
    started = flow_run.get_scheduled_start_time() if run_id else None
    return started, run_id


@flow(name="train-vae")
def train_vae(source: str, shards: str, config: str, registry: str, runs: str = "runs",
              overrides: list[str] | None = None, num_processes: int = 1, k: int | None = None,
              crop: int = DEFAULT_CROP, shard_workers: int = 1, synthesize_n: int = 0, synthesize_seed: int = 0,
              warm_start: bool = False, precisions: list[str] | None = None,
              sample_tolerance: float = promotion.SAMPLE_TOLERANCE, inception_weights: str | None = None,
              lock_wait_s: float = LOCK_WAIT_S) -> dict:
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
        warm_start: Start training from the champion's EMA weights, with this run's own schedule; refused before
            any work when the architecture differs. Without a champion it starts fresh.
        precisions: Graphs of other precisions to export too, validated against fp32 (vae_runtime.vocabulary):
            "fp16" (decoder.fp16.onnx: float16 network, float32 interface, for GPU apps) and "int8"
            (decoder.int8.onnx and encoder.int8.onnx, for CPU apps), e.g. ["fp16", "int8"].
        sample_tolerance: How many standard errors of the difference the primary sample figure (KID of prior
            samples, lower is better) may be worse than the champion's while a lower test nll_bpd still promotes;
            0 refuses any worse KID.
        inception_weights: The FID Inception weights file (pt_inception-2015-12-05-6726825d.pth, no download) for
            FID in the sample metrics, of this version and of a re-evaluated champion; null: $VAE_INCEPTION_WEIGHTS
            or the config's eval.inception_weights, else no FID. Checked before any work.
        lock_wait_s: How long sharding and training (a retry above all) wait for their folder while another
            process still holds it (an earlier attempt's launcher or ranks ending), before failing naming it.
    """
    overrides = list(overrides or [])
    check_parameters(source, shards, registry, runs, num_processes, k, crop, shard_workers, synthesize_n, precisions,
                     sample_tolerance, inception_weights, lock_wait_s)
    precisions = list(precision_names(precisions))  # the vocabulary's names, in its order (older spellings read)
    if warm_start:
        overrides += warm_start_overrides(registry, runs)
    cfg = load_config(config, overrides)  # bad configuration fails here, before any work
    if cfg.train.init_from:
        from vae.core.checkpoint import warm_start_weights

        warm_start_weights(cfg)  # another architecture, or no checkpoint: one line, before any work
    from vae.evaluation.features import resolve_weights  # imports no torchvision

    # one weights file for this version and a re-evaluated champion, whatever the champion's config says
    weights = resolve_weights(inception_weights, cfg.eval.inception_weights)
    if weights and weights != inception_weights:  # from $VAE_INCEPTION_WEIGHTS or the config: checked here too
        check_inception_weights(weights, "inception_weights ($VAE_INCEPTION_WEIGHTS or eval.inception_weights)")
    version = versions.new_version(config_hash(cfg), *_flow_run_identity())
    run_dir = str(Path(runs) / version)
    if needs_synthesis(source, synthesize_n):
        synthesize_source(source, synthesize_n, synthesize_seed)
    shard_data(source, shards, cfg.model.image_size, crop, shard_workers, lock_wait_s)
    check_shards(shards, precisions)
    train_model(config, overrides, run_dir, shards, num_processes, lock_wait_s)
    metrics = evaluate_model(run_dir, k, weights)
    export_dir = export_model(run_dir, version, precisions)
    grid = validate_model(export_dir)
    result = promote_model(registry, version, run_dir, export_dir, metrics, runs, sample_tolerance, weights)

    create_table_artifact(key="train-vae-metrics", table=metric_rows(metrics),
                          description=f"Test metrics of {version}")
    create_markdown_artifact(key="train-vae-summary", markdown=summary_markdown(
        version, metrics, result, summary_pictures(run_dir, grid, metrics)))
    return {**result, "metrics": metrics, "samples": str(Path(result["path"]) / "samples.png"), "grid": grid}
