"""vae_runtime: the torch-free side of vae-pipeline. NumPy, onnxruntime and fsspec only; never torch.

For apps, the exported models and a registry's champion:

    from vae_runtime import Champion
    champion = Champion("s3://bucket/registry")  # or a local registry path; files cached and sha256-verified
    decoder = champion.decoder()                 # or Decoder(model_folder), Decoder("decoder.onnx")
    images = decoder.sample(16, seed=0)          # float32 [16, 3, H, W] in [0, 1]

The app's API lives in modules of one concern each: `models` (Decoder, Encoder, interpolate, resolve_model),
`champion` (Champion, default_cache_dir), `model_folder` (verified_graph: a folder's graphs against its card),
`sessions` (session_options, providers_for, cuda_provider_options), `vocabulary` (graph_name: the graph kinds and
precisions and their file names); import them from here, the one public path.

For the pipeline, which builds on it, the torch-free base layer: `errors` (the exit-code types), `atomic`
(atomic writes), `storage` (local paths and fsspec URLs), `limits` (size caps on what is read), `schemas`
(type-checked records), `digest`, `grid` (PNG grids), `registry` (versions and the champion record),
`vocabulary` (the graphs' names).

The app's names below are imported on first use (PEP 562), so the pipeline's `import vae_runtime.errors` does
not start onnxruntime.
"""

from __future__ import annotations

import importlib

_APP = {"Champion": "champion", "default_cache_dir": "champion",
        "Decoder": "models", "Encoder": "models", "interpolate": "models", "resolve_model": "models",
        "RunTimeout": "errors", "RuntimeModelError": "errors",
        "KNOWN_CONTRACTS": "sessions", "cuda_provider_options": "sessions", "providers_for": "sessions",
        "session_options": "sessions",
        "graph_name": "vocabulary", "verified_graph": "model_folder"}

__all__ = sorted(_APP)


def __getattr__(name: str):
    if name in _APP:
        return getattr(importlib.import_module(f"vae_runtime.{_APP[name]}"), name)
    raise AttributeError(f"module 'vae_runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_APP])
