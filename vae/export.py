"""ONNX export with a validation gate: `encoder.onnx`, `decoder.onnx` and `model.json`.

The encoder maps `x` float32 [N, 3, H, W] in [0, 1] to `mu`, `logvar` [N, latent_dim]; the decoder maps `z`
[N, latent_dim] to `x_mean` [N, 3, H, W] in [0, 1]. N is dynamic; no random op is inside either graph (the
caller draws the noise). Both files carry the metadata in `metadata_props` as well as `model.json`.

Nothing is written to `out` unless the full ONNX check passes and onnxruntime reproduces PyTorch on real
inputs (max abs difference `TOLERANCE`) at several batch sizes: files are built in a temporary folder and
renamed into place one by one only after validation.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from vae.atomic import atomic_write_json
from vae.checkpoint import load_trained
from vae.config import config_hash
from vae.errors import VaeError

CONTRACT_VERSION = "1"
TOLERANCE = 1e-4
VALIDATION_BATCHES = (1, 7, 64)
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
              "Bernoulli"}


class ExportError(VaeError):
    """The exported graphs failed validation; nothing was written."""


class EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(x)


class DecoderGraph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode_mean(z)


def _export_graph(module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str],
                  path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=[input_name], output_names=output_names,
            dynamic_shapes={input_name: {0: torch.export.Dim("batch", min=1, max=65536)}},
            external_data=False, verbose=False)
    program.save(str(path), external_data=False)


def _set_metadata(path: Path, metadata: dict) -> None:
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(graph, str(path))


def random_ops(path: Path) -> set[str]:
    graph = onnx.load(str(path))
    found = {n.op_type for n in graph.graph.node if n.op_type in RANDOM_OPS}
    for fn in graph.functions:
        found |= {n.op_type for n in fn.node if n.op_type in RANDOM_OPS}
    return found


def _check_parity(path: Path, torch_fn, inputs: dict[str, np.ndarray], outputs: list[str]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(outputs, inputs)
    with torch.no_grad():
        want = torch_fn(*[torch.from_numpy(v) for v in inputs.values()])
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.max(np.abs(g - w.numpy()))) for g, w in zip(got, want))


def validate(folder: Path, model: nn.Module, images: np.ndarray) -> dict:
    """Full ONNX check, no random op, onnxruntime vs PyTorch at each validation batch size."""
    report = {"tolerance": TOLERANCE, "max_abs_diff": {}}
    for name in ("encoder.onnx", "decoder.onnx"):
        try:
            onnx.checker.check_model(str(folder / name), full_check=True)
        except Exception as err:
            raise ExportError(f"{name}: fails the ONNX checker: {str(err).splitlines()[0]}") from None
        found = random_ops(folder / name)
        if found:
            raise ExportError(f"{name}: contains random ops {sorted(found)}; noise must be drawn outside")
    rng = np.random.default_rng(0)
    for batch in VALIDATION_BATCHES:
        x = images[np.arange(batch) % len(images)].astype(np.float32)
        z = rng.standard_normal((batch, model.latent_dim)).astype(np.float32)
        enc = _check_parity(folder / "encoder.onnx", model.encode, {"x": x}, ["mu", "logvar"])
        dec = _check_parity(folder / "decoder.onnx", model.decode_mean, {"z": z}, ["x_mean"])
        report["max_abs_diff"][str(batch)] = {"encoder": enc, "decoder": dec}
        if not (enc <= TOLERANCE and dec <= TOLERANCE):
            raise ExportError(f"onnxruntime disagrees with PyTorch at batch {batch}: max abs difference "
                              f"encoder {enc:.2e}, decoder {dec:.2e} > {TOLERANCE:.0e}")
    return report


def validation_images(cfg, shards: str | None, n: int = 64) -> np.ndarray:
    """Real inputs from the test split (float32 [n, 3, H, W] in [0, 1])."""
    from pipeline.loader import eval_loader

    loader = eval_loader(shards or cfg.data.shards, "test", n)
    for _, x, _ in loader:
        return (x.float() / 255.0).numpy()
    raise ExportError("no test images to validate the export against")


def export(run_dir: str | Path, out: str | Path, shards: str | None = None, version: str | None = None) -> dict:
    """Export a run's EMA model to `out`; returns the model card (`model.json`)."""
    run_dir, out = Path(run_dir), Path(out)
    model, cfg, step = load_trained(run_dir)
    metrics_path = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    size = cfg.model.image_size
    card = {"contract_version": CONTRACT_VERSION, "latent_dim": cfg.model.latent_dim, "image_size": size,
            "channels": 3, "likelihood": cfg.model.likelihood,
            "version": version or f"{run_dir.name}@{step}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config_hash": config_hash(cfg), "metrics": metrics}
    images = validation_images(cfg, shards)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        _export_graph(EncoderGraph(model), torch.rand(2, 3, size, size), "x", ["mu", "logvar"],
                      tmp / "encoder.onnx")
        _export_graph(DecoderGraph(model), torch.randn(2, cfg.model.latent_dim), "z", ["x_mean"],
                      tmp / "decoder.onnx")
        for name in ("encoder.onnx", "decoder.onnx"):
            _set_metadata(tmp / name, card)
        card["validation"] = validate(tmp, model, images)
        atomic_write_json(tmp / "model.json", card)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("encoder.onnx", "decoder.onnx", "model.json"):
            shutil.move(str(tmp / name), str(out / f".{name}.incoming"))
            (out / f".{name}.incoming").replace(out / name)
    return card
