"""The torch-free runtime for exported models: NumPy and onnxruntime only (never import torch here).

    from vae.runtime import Decoder
    decoder = Decoder("registry/train-vae/versions/<version>/decoder.onnx")
    images = decoder.sample(16, seed=0)          # float32 [16, 3, H, W] in [0, 1]

The noise is drawn here with NumPy from the caller's seed, so the same seed gives the same images. The
provider that actually runs is reported (`.provider`); a requested CUDA provider that fell back to the CPU is
a warning, never silent. Models whose contract version is unknown are refused. `decoder.fp16.onnx` (float16
weights, float32 interface) loads the same way; use it on a GPU.

Session options (`session_options`): all graph optimizations, sequential execution, idle threads that sleep
(`spinning=True` to let them spin on dedicated cores), `threads` intra-op threads (default: onnxruntime's, one per
physical core). See the README for what was measured.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

KNOWN_CONTRACTS = ("1",)


class RuntimeModelError(ValueError):
    """The model file or the input given to it is not usable; the message names which."""


def session_options(threads: int | None = None, spinning: bool = False) -> ort.SessionOptions:
    """The session options every model here runs with (export validates with the same ones).

    `spinning=False` (the default) lets idle worker threads sleep: on CPUs shared with other processes,
    spinning threads steal the cores the work needs (2x slower measured under load). On cores dedicated to
    this model, `spinning=True` trims latency at batch 1 (about 15% measured). See bench/export.py.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # these graphs are chains: nothing to overlap
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise RuntimeModelError(f"threads: expected an integer >= 1, got {threads!r}")
        options.intra_op_num_threads = threads
    return options


def cuda_provider_options(version: str | None = None) -> dict[str, str]:
    """CUDA provider options for onnxruntime `version` (default: the installed one): NHWC convolutions
    (`prefer_nhwc`, built into onnxruntime-gpu since 1.20). Measured on an H100 with onnxruntime-gpu 1.31.1
    (README): the celeba64-gpu decoder 0.98 -> 0.68 ms at batch 1 and 20.8k -> 26.0k images/s at batch 256,
    the same outputs."""
    found = re.match(r"(\d+)\.(\d+)", version or ort.__version__)
    return {"prefer_nhwc": "1"} if found and (int(found[1]), int(found[2])) >= (1, 20) else {}


def providers_for(device: str) -> list:
    """The providers asked for: CUDA first where onnxruntime has it (onnxruntime-gpu) and it is wanted, then CPU.

    A provider that is available may still fail to start (no GPU, missing CUDA libraries): onnxruntime then
    runs on the next one, so what runs is the session's first provider, not this list's."""
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", cuda_provider_options()), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path: str, device: str, threads: int | None, spinning: bool) -> tuple[ort.InferenceSession, dict]:
    if not os.path.isfile(path):
        raise RuntimeModelError(f"model {path}: file not found")
    options = session_options(threads, spinning)
    try:
        session = ort.InferenceSession(path, options, providers=providers_for(device))
    except Exception as err:
        raise RuntimeModelError(f"model {path}: onnxruntime cannot load it ({str(err).splitlines()[0]})") from None
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        warnings.warn(f"model {path}: CUDA was requested but onnxruntime runs it on "
                      f"{session.get_providers()[0]}", RuntimeWarning, stacklevel=3)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    version = meta.get("contract_version")
    if version not in KNOWN_CONTRACTS:
        raise RuntimeModelError(f"model {path}: unknown contract version {version!r} "
                                f"(this runtime knows {', '.join(KNOWN_CONTRACTS)})")
    return session, meta


class _Model:
    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 spinning: bool = False):
        if device not in ("cpu", "cuda"):
            raise RuntimeModelError(f"device {device!r}: expected 'cpu' or 'cuda'")
        self.path = os.fspath(path)
        self.session, self.metadata = _session(self.path, device, threads, spinning)
        self.provider = self.session.get_providers()[0]
        self.latent_dim = int(self.metadata["latent_dim"])
        self.image_size = int(self.metadata["image_size"])
        self.channels = int(self.metadata["channels"])

    def card(self) -> dict:
        """The metadata as Python values (JSON-decoded where they are JSON)."""
        out = {}
        for key, value in self.metadata.items():
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        return out


class Decoder(_Model):
    """`decoder.onnx`: latents [N, latent_dim] -> images float32 [N, 3, H, W] in [0, 1]."""

    def decode(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise RuntimeModelError(f"z: expected shape [N, {self.latent_dim}], got {list(z.shape)}")
        if z.shape[0] == 0:
            raise RuntimeModelError("z: expected at least one latent, got N = 0")
        if not np.issubdtype(z.dtype, np.floating):
            raise RuntimeModelError(f"z: expected floating point values, got {z.dtype}")
        if not np.all(np.isfinite(z)):
            raise RuntimeModelError("z: contains NaN or infinite values")
        return self.session.run(["x_mean"], {"z": np.ascontiguousarray(z, dtype=np.float32)})[0]

    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """n images from the prior; z ~ N(0, temperature^2 I) drawn with NumPy from `seed`."""
        if n < 1:
            raise RuntimeModelError(f"n: expected >= 1, got {n}")
        z = np.random.default_rng(seed).standard_normal((n, self.latent_dim)) * temperature
        return self.decode(z.astype(np.float32))


class Encoder(_Model):
    """`encoder.onnx`: images -> (mu, logvar) of q(z|x), each [N, latent_dim]."""

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images: uint8 [N, H, W, 3] (0..255) or float [N, 3, H, W] in [0, 1]; returns (mu, logvar)."""
        x = self.to_input(images)
        mu, logvar = self.session.run(["mu", "logvar"], {"x": x})
        return mu, logvar

    def to_input(self, images: np.ndarray) -> np.ndarray:
        """Validate images and convert them to the graph's input: float32 [N, 3, H, W] in [0, 1]."""
        images = np.asarray(images)
        s, c = self.image_size, self.channels
        if images.dtype == np.uint8:
            if images.ndim != 4 or images.shape[1:] != (s, s, c):
                hint = " (it looks like CHW: uint8 must be HWC)" if images.shape[1:] == (c, s, s) else ""
                raise RuntimeModelError(f"images: uint8 input must be [N, {s}, {s}, {c}] (HWC), "
                                        f"got {list(images.shape)}{hint}")
            x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        elif np.issubdtype(images.dtype, np.floating):
            if images.ndim != 4 or images.shape[1:] != (c, s, s):
                hint = " (it looks like HWC: float must be CHW)" if images.shape[1:] == (s, s, c) else ""
                raise RuntimeModelError(f"images: float input must be [N, {c}, {s}, {s}] (CHW), "
                                        f"got {list(images.shape)}{hint}")
            if not np.all(np.isfinite(images)):
                raise RuntimeModelError("images: float input contains NaN or infinite values")
            low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
            if low < 0.0 or high > 1.0:
                hint = " (0..255 values? divide by 255, or pass uint8 HWC)" if high > 1.0 else ""
                raise RuntimeModelError(f"images: float input must lie in [0, 1], got [{low:g}, {high:g}]{hint}")
            x = images.astype(np.float32, copy=False)
        else:
            raise RuntimeModelError(f"images: expected uint8 HWC or float CHW, got dtype {images.dtype}")
        if x.shape[0] == 0:
            raise RuntimeModelError("images: expected at least one image, got N = 0")
        return np.ascontiguousarray(x)


def interpolate(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """Latents on the straight line from a to b, endpoints included: [steps, latent_dim].

    a and b are single codes, [latent_dim] (or [1, latent_dim], e.g. one row of `Encoder.encode`'s mu).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise RuntimeModelError(f"steps: expected an integer >= 2, got {steps!r}")
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    a = a[0] if a.ndim == 2 and a.shape[0] == 1 else a
    b = b[0] if b.ndim == 2 and b.shape[0] == 1 else b
    if a.ndim != 1 or a.shape != b.shape:
        raise RuntimeModelError(f"a, b: expected two codes of the same shape [latent_dim], got "
                                f"{list(a.shape)} and {list(b.shape)}")
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    return (1 - t) * a[None] + t * b[None]
