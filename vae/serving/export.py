"""ONNX export with a validation gate: `encoder.onnx`, `decoder.onnx` and `model.json`.

The encoder maps `x` float32 [N, 3, H, W] in [0, 1] to `mu`, `logvar` [N, latent_dim]; the decoder maps `z`
[N, latent_dim] to `x_mean` [N, 3, H, W] in [0, 1]. N is dynamic; no random op is inside either graph (the
caller draws the noise). Both files carry the metadata in `metadata_props` as well as `model.json`.

Nothing is published at `out` unless the full ONNX check passes and onnxruntime reproduces PyTorch on real inputs
(max abs difference `TOLERANCE`) at several batch sizes: the folder is built beside `out` and switched in whole
(`vae.serving.publish`). The card's metrics are those of the exported weights (re-evaluated when the run's
`eval/metrics.json` measured other weights or is missing), and it lists every graph's sha256. The weights exported
are the run's EMA weights (what evaluation measured), never the raw training weights.

Graphs of other precisions are asked for by name (`precisions`, `vae_runtime.vocabulary`: "fp16", "int8"; the
fp32 graphs are always written). With "fp16", a third graph, `decoder.fp16.onnx`, holds the decoder in float16 for
GPUs. Its interface
stays float32 (`z` float32 in, `x_mean` float32 out, the casts are inside the graph), so the runtime and any
app use it exactly like `decoder.onnx`. It is validated against the float32 decoder within `FP16_TOLERANCE`
(max abs difference on outputs in [0, 1]) on onnxruntime's CUDA provider where onnxruntime-gpu has one, else on
the CPU provider, and the model card names the provider that ran it; where onnxruntime cannot run float16 the
check is skipped, and the model card says so and why.
"""

from __future__ import annotations

import datetime
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from vae_runtime import limits, schemas
from vae_runtime.atomic import atomic_write_json
from vae_runtime.digest import sha256_file
from vae_runtime.errors import BadInput
from vae_runtime.vocabulary import (EXPORTED, graph_name, graph_names, metadata_name, parse_graph_name,
                                    precision_names)
from vae.core.checkpoint import weights_digest
from vae.core.config import config_hash
from vae.core.run import Run
from vae_runtime.graph_files import referenced_files
from vae_runtime.grid import make_grid, write_png
from pipeline.manifest import load_manifest, require_image_size
from vae.serving.graphs import (DecoderGraph, EncoderGraph, ExportError, HalfDecoderGraph, export_onnx, random_ops,
                                set_metadata)
from vae.serving.model_card import data_record, training_record, write_model_card
from vae.serving.publish import check_out, publishing
from vae.serving.quantize import write_int8

CONTRACT_VERSION = "1"
TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2  # max abs difference of decoder.fp16.onnx from decoder.onnx, outputs in [0, 1]
VALIDATION_BATCHES = (1, 7, 64)
CHECK_IMAGES = 576  # read for the checks: int8 validates on the first 64 and calibrates on the other 512
GRAPHS = tuple(graph_names())  # the fp32 encoder and decoder, always written
FP16_DECODER = graph_name("decoder", "fp16")


def _session(path: Path, device: str = "cpu"):
    """A session configured exactly as the runtime configures its own, so we validate what apps run.

    `device="cuda"` asks for onnxruntime's CUDA provider where it has one (onnxruntime-gpu); what actually
    runs is the session's first provider."""
    import onnxruntime as ort  # lazy: only export's validation runs graphs

    from vae_runtime import providers_for, session_options  # lazy: the sessions module imports onnxruntime

    return ort.InferenceSession(str(path), session_options(), providers=providers_for(device))


def _max_abs_diff(got: list[np.ndarray], want) -> float:
    """The largest difference over all outputs; NaN when any output holds one (np.max propagates it)."""
    want = want if isinstance(want, tuple) else (want,)
    return float(np.max([np.max(np.abs(g - w.numpy())) for g, w in zip(got, want)]))


def validate(folder: Path, model: nn.Module, images: np.ndarray) -> dict:
    """Full ONNX check, no random op, onnxruntime vs PyTorch at each validation batch size.

    The encoder sees real test images; the decoder sees the codes of those images (PyTorch's `mu`)
    interleaved with draws from the prior, the two kinds of latents apps give it.
    """
    report = {"tolerance": TOLERANCE, "max_abs_diff": {}}
    for name in GRAPHS:
        try:
            onnx.checker.check_model(str(folder / name), full_check=True)
        except Exception as err:
            raise ExportError(f"{name}: fails the ONNX checker: {str(err).splitlines()[0]}") from None
        found = random_ops(folder / name)
        if found:
            raise ExportError(f"{name}: contains random ops {sorted(found)}; noise must be drawn outside")
    encoder, decoder = _session(folder / graph_name("encoder")), _session(folder / graph_name("decoder"))
    rng = np.random.default_rng(0)
    for batch in VALIDATION_BATCHES:
        x = np.ascontiguousarray(images[np.arange(batch) % len(images)], dtype=np.float32)
        with torch.no_grad():
            want_enc = model.encode(torch.from_numpy(x))
            prior = torch.from_numpy(rng.standard_normal((batch, model.latent_dim)).astype(np.float32))
            z = torch.where(torch.arange(batch)[:, None] % 2 == 0, want_enc[0], prior).contiguous()
            want_dec = model.decode_mean(z)
        if not all(torch.isfinite(t).all() for t in (*want_enc, want_dec)):
            raise ExportError(f"the model's own outputs are not finite (NaN or infinite) at batch {batch}: its "
                              "weights are broken; not exported")
        enc = _max_abs_diff(encoder.run(["mu", "logvar"], {"x": x}), want_enc)
        dec = _max_abs_diff(decoder.run(["x_mean"], {"z": z.numpy()}), want_dec)
        report["max_abs_diff"][str(batch)] = {"encoder": enc, "decoder": dec}
        if not (enc <= TOLERANCE and dec <= TOLERANCE):
            raise ExportError(f"onnxruntime disagrees with PyTorch at batch {batch}: max abs difference "
                              f"encoder {enc:.2e}, decoder {dec:.2e} > {TOLERANCE:.0e}")
    return report


def validation_images(cfg, shards: str | None, n: int = 64,
                      trained: dict | None = None) -> tuple[np.ndarray, dict, str]:
    """Up to `n` real inputs (float32 [n, 3, H, W] in [0, 1]), the preprocessing the model was trained with, and
    which splits the images came from ("test 20, valid 20, ...").

    Held-out images first: the test split, topped up from valid, then train (the shared CelebA sample has no
    test partition). The shards must hold images of the model's size, preprocessed as the run's images were
    (`trained`: `Run.preprocessing`), which is what the card says and apps apply."""
    from pipeline.loader import eval_loader  # lazy: webdataset and torch's loader, only for validation images

    given = shards or cfg.data.shards
    manifest = require_image_size(given, cfg.model.image_size)
    preprocessing = _same_preprocessing(trained, given, manifest.get("preprocessing", {}))
    batches, taken = [], []
    for split in ("test", "valid", "train"):
        room = n - sum(len(b) for b in batches)
        if room > 0 and manifest["splits"].get(split, {}).get("count", 0) > 0:
            for _, x, _ in eval_loader(given, split, room):
                batches.append((x.float() / 255.0).numpy())
                taken.append(f"{split} {len(x)}")
                break
    if not batches:
        raise ExportError(f"shards {given}: no images to validate the export against")
    return np.concatenate(batches), preprocessing, ", ".join(taken)


def _same_preprocessing(want: dict | None, given: str, found: dict) -> dict:
    """The run's preprocessing `want`, after checking that the shards `given` share it; where it is unknown here
    (an older run whose shards cannot be read), the given shards' with a warning."""
    if want is None:
        warnings.warn(f"the run's preprocessing is unknown here (its checkpoint does not record it and its shards "
                      f"cannot be read): the card takes that of {given}", RuntimeWarning, stacklevel=3)
        return found
    differ = sorted(key for key in set(want) | set(found) if want.get(key) != found.get(key))
    if differ:
        raise BadInput(f"shards {given}: preprocessed with " + ", ".join(f"{k} {found.get(k)!r}" for k in differ)
                       + "; the run trained on " + ", ".join(f"{k} {want.get(k)!r}" for k in differ)
                       + " (validate on shards made like the training shards)")
    return want


def export_graphs(model: nn.Module, folder: Path, precisions: tuple[str, ...] = ()) -> list[str]:
    """Write the fp32 graphs of `model` (no metadata, no validation) into `folder`, and the fp16 decoder when
    `precisions` holds fp16 (int8 graphs are quantized from the fp32 ones: `vae.serving.quantize`); returns their
    file names."""
    size, latent_dim = model.cfg.image_size, model.latent_dim
    export_onnx(EncoderGraph(model), torch.rand(2, 3, size, size), "x", ["mu", "logvar"],
                  folder / graph_name("encoder"))
    export_onnx(DecoderGraph(model), torch.randn(2, latent_dim), "z", ["x_mean"], folder / graph_name("decoder"))
    if "fp16" not in precision_names(precisions):
        return list(GRAPHS)
    export_onnx(HalfDecoderGraph(model), torch.randn(2, latent_dim), "z", ["x_mean"], folder / FP16_DECODER)
    return [*GRAPHS, FP16_DECODER]


def validate_fp16(folder: Path, latent_dim: int, n: int = 64) -> dict:
    """`decoder.fp16.onnx` against `decoder.onnx` on the same latents: checker, no random op, max abs diff.

    The float16 graph runs where it is meant to run, onnxruntime's CUDA provider, when this onnxruntime has one
    (onnxruntime-gpu); else on the CPU provider, where onnxruntime can run float16 there. Where it cannot, the
    numeric check is skipped (reported, with the reason) and the graph should be validated on the GPU that
    will run it. The report names the provider that actually ran it.
    """
    import onnxruntime as ort  # lazy: only export's validation runs graphs

    from vae_runtime import providers_for  # lazy: the sessions module imports onnxruntime

    path = folder / FP16_DECODER
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as err:
        raise ExportError(f"{FP16_DECODER}: fails the ONNX checker: {str(err).splitlines()[0]}") from None
    if random_ops(path):
        raise ExportError(f"{FP16_DECODER}: contains random ops {sorted(random_ops(path))}")
    z = np.random.default_rng(1).standard_normal((n, latent_dim)).astype(np.float32)
    want = _session(folder / graph_name("decoder")).run(["x_mean"], {"z": z})[0]
    try:
        session = _session(path, device="cuda")
        got = session.run(["x_mean"], {"z": z})[0]
    except Exception as err:  # onnxruntime raises NOT_IMPLEMENTED etc. for float16 kernels it lacks
        where = "on CUDA or the CPU" if len(providers_for("cuda")) > 1 else "on the CPU"
        reason = (f"onnxruntime {ort.__version__} cannot run float16 {where} here "
                  f"({str(err).splitlines()[0][:200]}); validate it on the GPU that runs it")
        warnings.warn(f"{FP16_DECODER}: validation skipped: {reason}", RuntimeWarning, stacklevel=2)
        return {"tolerance": FP16_TOLERANCE, "validated": False, "skipped": reason}
    diff = float(np.max(np.abs(got.astype(np.float32) - want)))
    if not diff <= FP16_TOLERANCE:
        raise ExportError(f"{FP16_DECODER}: differs from decoder.onnx by max abs {diff:.2e} > {FP16_TOLERANCE:.0e}")
    return {"tolerance": FP16_TOLERANCE, "validated": True, "max_abs_diff": diff,
            "provider": session.get_providers()[0]}


def current_metrics(run: Run, shards: str, split: str) -> dict:
    """The run's `eval/metrics.json` when it measured exactly the EMA weights of the checkpoint read; otherwise
    evaluate them now (the card must carry the test metrics of the weights it ships, never those of an earlier
    step)."""
    run_dir, path = run.path, run.metrics_path
    digest = weights_digest(run.model())
    metrics = run.metrics
    if metrics is not None and metrics.get("weights_sha256") == digest:
        return metrics
    from vae.evaluation.evaluate import EmptySplit, evaluate, require_images  # lazy: only a run without metrics

    try:
        require_images(shards, split, load_manifest(shards))
    except EmptySplit as err:
        raise BadInput(f"{err}; evaluate the run on another split first (vae eval --run {run_dir} --split valid)") \
            from None
    why = "missing" if metrics is None else f"from other weights (step {metrics.get('model_step')})"
    print(f"vae export: {path} is {why}: evaluating the exported weights first", file=sys.stderr)
    metrics = evaluate(run_dir, shards=shards, split=split, step=run.step)
    if metrics.get("weights_sha256") != digest:
        raise ExportError(f"run {run_dir}: its checkpoint changed while exporting; export again")
    return metrics


def best_temperature(metrics: dict) -> float:
    """The prior temperature whose samples scored best on the primary sample figure in `metrics` (its split's
    evaluation), which `vae sample` and the runtime use when the caller gives none; 1 when not measured."""
    primary = (metrics.get("samples") or {}).get("primary") or {}
    value = primary.get("temperature")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0


def export(run_dir: str | Path, out: str | Path, shards: str | None = None, version: str | None = None,
           precisions: tuple[str, ...] = ()) -> dict:
    """Export a run's EMA model to the folder `out`, published whole; returns the model card (`model.json`).

    The folder holds the graphs, `model.json` (with every graph's sha256), `metrics.json`, `samples.png` (prior
    samples from the validated decoder) and `README.md` (the human-readable model card). `out` is a link
    to a hidden sibling folder holding one complete export; a new export is built beside it and the link is
    switched in one rename, so a reader never sees two exports mixed. A real, non-empty folder at `out` is
    refused. Leftovers of a killed export are removed by the next one. `precisions` adds the graphs of those
    precisions (`vae_runtime.vocabulary`, any spelling it reads), each validated against the fp32 ones: "fp16" the
    float16 decoder for GPUs, "int8" the CPU graphs of `vae.serving.quantize`; an unknown one is refused first.
    """
    run_dir, out = Path(run_dir), Path(out)
    precisions = precision_names(precisions)
    run = Run(run_dir)  # its newest checkpoint, read once: a run still training moves on, this export does not
    model, cfg, step = run.model(ema=True), run.config, run.step
    check_out(out)
    images, preprocessing, source = validation_images(cfg, shards, CHECK_IMAGES, run.preprocessing)
    metrics = current_metrics(run, shards or cfg.data.shards, cfg.eval.split)
    if not all(schemas.finite(metrics.get(key)) for key in ("elbo_bpd", "nll_bpd")):
        raise ExportError(f"run {run_dir}: its metrics are not finite (elbo_bpd {metrics.get('elbo_bpd')!r}, "
                          f"nll_bpd {metrics.get('nll_bpd')!r}): the weights diverged; not exported")
    card = {"contract_version": CONTRACT_VERSION, "latent_dim": cfg.model.latent_dim,
            "image_size": cfg.model.image_size, "channels": 3, "likelihood": cfg.model.likelihood,
            "version": version or f"{run_dir.name}@{step}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config_hash": config_hash(cfg), "metrics": metrics, "weights": "ema", "step": step,
            "weights_sha256": metrics["weights_sha256"], "preprocessing": preprocessing,
            "temperature": best_temperature(metrics), "data": data_record(cfg.data.shards),
            "training": training_record(cfg, run.state)}
    with publishing(out) as staging:
        names = export_graphs(model, staging, precisions)
        for name in names:
            set_metadata(staging / name, {**card, "precision": metadata_name(parse_graph_name(name)[1])})
        card["validation"] = validate(staging, model, images)
        if "fp16" in precisions:
            card["validation"]["fp16_decoder"] = validate_fp16(staging, cfg.model.latent_dim)
        if "int8" in precisions:
            card["validation"]["int8"] = write_int8(model, staging, images, _session, source)
            names += [graph_name(kind, "int8") for kind in EXPORTED["int8"]]
            for name in names[-len(EXPORTED["int8"]):]:
                set_metadata(staging / name, {**card, "precision": metadata_name("int8")})
        # a file a graph keeps weights in (ONNX external data; these graphs hold theirs) is hashed like the graph
        names += sorted({data for name in names for data in referenced_files(staging / name)} - set(names))
        card["files"] = names
        card["sha256"] = {name: sha256_file(staging / name) for name in names}
        atomic_write_json(staging / "metrics.json", metrics)
        atomic_write_json(staging / "model.json", card)
        write_samples(staging)
        write_model_card(staging, card)
    return card


def existing_export(out: str | Path, run_dir: str | Path, version: str,
                    precisions: tuple[str, ...] = ()) -> dict | None:
    """The card of the export at `out` when it holds `version` of the run's current EMA weights with the graphs
    asked for, every file matching its sha256; else None. A retried flow run reuses it rather than exporting
    again: a new export differs in bytes (its `created` time), and a version half-registered on object storage
    takes only the bytes it was claimed for."""
    try:
        card = schemas.load(limits.read_file(Path(out) / "model.json", "json"), schemas.MODEL_CARD,
                            str(Path(out) / "model.json"))
    except (OSError, ValueError):  # none, over its cap, or not a card whose fields have their types: export again
        return None
    wanted = set(graph_names(precisions))
    if not isinstance(card, dict) or card.get("version") != version or not wanted <= set(card.get("sha256") or {}):
        return None
    if any(not (Path(out) / name).is_file() or sha256_file(Path(out) / name) != digest
           for name, digest in card["sha256"].items()):
        return None
    return card if card.get("weights_sha256") == weights_digest(Run(run_dir).model(ema=True)) else None


def write_samples(folder: Path, n: int = 64, seed: int = 0) -> Path:
    """`samples.png`: an 8x8 grid of prior samples decoded by the validated `decoder.onnx` through the runtime,
    exactly as an app would (noise from numpy's default_rng(seed))."""
    from vae_runtime import Decoder  # lazy: onnxruntime, only for the samples picture

    images = Decoder(folder / graph_name("decoder")).sample(n, seed=seed)
    if not (np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0):
        raise ExportError("decoder.onnx produced images outside [0, 1]")
    return Path(write_png(folder / "samples.png", make_grid(images, 8)))


