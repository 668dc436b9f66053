"""The torch-free runtime for exported models: NumPy and onnxruntime only (never import torch here).

    from vae.runtime import Decoder
    decoder = Decoder("registry/train-vae/versions/<version>/decoder.onnx")
    images = decoder.sample(16, seed=0)          # float32 [16, 3, H, W] in [0, 1]

The noise is drawn here with NumPy from the caller's seed, so the same seed gives the same images. The
provider that actually runs is reported (`.provider`); a requested CUDA provider that fell back to the CPU is
a warning, never silent. Models whose contract version is unknown are refused.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort  # noqa: E402

KNOWN_CONTRACTS = ("1",)


class RuntimeModelError(ValueError):
    """The model file or the input given to it is not usable; the message names which."""


def _session(path: str, device: str) -> tuple[ort.InferenceSession, dict]:
    if not os.path.isfile(path):
        raise RuntimeModelError(f"model {path}: file not found")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(path, options, providers=providers)
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
    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise RuntimeModelError(f"device {device!r}: expected 'cpu' or 'cuda'")
        self.path = os.fspath(path)
        self.session, self.metadata = _session(self.path, device)
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
        if not np.issubdtype(z.dtype, np.floating):
            raise RuntimeModelError(f"z: expected floating point values, got {z.dtype}")
        if not np.all(np.isfinite(z)):
            raise RuntimeModelError("z: contains NaN or infinite values")
        return self.session.run(["x_mean"], {"z": z.astype(np.float32, copy=False)})[0]

    def sample(self, n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
        """n images from the prior; z ~ N(0, temperature^2 I) drawn with NumPy from `seed`."""
        if n < 1:
            raise RuntimeModelError(f"n: expected >= 1, got {n}")
        z = np.random.default_rng(seed).standard_normal((n, self.latent_dim)) * temperature
        return self.decode(z.astype(np.float32))


class Encoder(_Model):
    """`encoder.onnx`: images -> (mu, logvar) of q(z|x), each [N, latent_dim]."""

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images: uint8 [N, H, W, 3] (0..255) or float [N, 3, H, W] in [0, 1]."""
        images = np.asarray(images)
        s = self.image_size
        if images.dtype == np.uint8:
            if images.ndim != 4 or images.shape[1:] != (s, s, self.channels):
                raise RuntimeModelError(f"images: uint8 input must be [N, {s}, {s}, {self.channels}] (HWC), "
                                        f"got {list(images.shape)}")
            x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        elif np.issubdtype(images.dtype, np.floating):
            if images.ndim != 4 or images.shape[1:] != (self.channels, s, s):
                raise RuntimeModelError(f"images: float input must be [N, {self.channels}, {s}, {s}] (CHW), "
                                        f"got {list(images.shape)}")
            if not np.all(np.isfinite(images)) or images.min() < 0.0 or images.max() > 1.0:
                raise RuntimeModelError("images: float input must lie in [0, 1]")
            x = images.astype(np.float32, copy=False)
        else:
            raise RuntimeModelError(f"images: expected uint8 or float, got {images.dtype}")
        mu, logvar = self.session.run(["mu", "logvar"], {"x": np.ascontiguousarray(x)})
        return mu, logvar


def interpolate(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """Latents on the straight line from a to b, endpoints included: [steps, latent_dim]."""
    if steps < 2:
        raise RuntimeModelError(f"steps: expected >= 2, got {steps}")
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)[:, None]
    return (1 - t) * np.asarray(a, np.float32)[None] + t * np.asarray(b, np.float32)[None]
