"""The graphs `vae export` writes, as PyTorch modules, and the small ONNX helpers around them (export with a
dynamic batch, metadata, the random-op check)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from vae_runtime.atomic import atomic_write_bytes, naming
from vae_runtime.errors import VaeError

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


class HalfDecoderGraph(nn.Module):
    """The decoder network in float16 behind a float32 interface; the likelihood's mean (a few elementwise
    ops on its parameters) in float32, as in `decoder.onnx`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.likelihood.mean(self.model.decode(z.half()).float())


def export_onnx(module: nn.Module, example: torch.Tensor, input_name: str, output_names: list[str],
                  path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=[input_name], output_names=output_names,
            dynamic_shapes={input_name: {0: torch.export.Dim("batch", min=1, max=65536)}},
            external_data=False, verbose=False)
    with naming(path):  # a full disk names the graph being written
        program.save(str(path), external_data=False)


def set_metadata(path: Path, metadata: dict) -> None:
    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    atomic_write_bytes(path, graph.SerializeToString())


def random_ops(path: Path) -> set[str]:
    graph = onnx.load(str(path))
    found = {n.op_type for n in graph.graph.node if n.op_type in RANDOM_OPS}
    for fn in graph.functions:
        found |= {n.op_type for n in fn.node if n.op_type in RANDOM_OPS}
    return found
