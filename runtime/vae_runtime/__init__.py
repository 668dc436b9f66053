"""vae_runtime: the torch-free side of vae-pipeline. NumPy, onnxruntime and fsspec only; never torch.

For apps, the exported models and a registry's champion:

    from vae_runtime import Champion
    champion = Champion("s3://bucket/registry")  # or a local registry path; files cached and sha256-verified
    decoder = champion.decoder()                 # or Decoder(model_folder), Decoder("decoder.onnx")
    images = decoder.sample(16, seed=0)          # float32 [16, 3, H, W] in [0, 1]

For the pipeline, which builds on it, the torch-free base layer: `errors` (the exit-code types), `atomic`
(atomic writes), `storage` (local paths and fsspec URLs), `limits` (size caps on what is read), `schemas`
(type-checked records), `digest`, `grid` (PNG grids), `registry` (versions and the champion record).

The app's names below are imported on first use (PEP 562), so the pipeline's `import vae_runtime.errors` does
not start onnxruntime.
"""

from __future__ import annotations

import importlib

_APP = {"Champion": "runtime", "Decoder": "runtime", "Encoder": "runtime", "RunTimeout": "runtime",
        "RuntimeModelError": "runtime", "KNOWN_CONTRACTS": "runtime", "cuda_provider_options": "runtime",
        "default_cache_dir": "runtime", "graph_name": "runtime", "interpolate": "runtime",
        "providers_for": "runtime", "resolve_model": "runtime", "session_options": "runtime",
        "verified_graph": "runtime"}

__all__ = sorted(_APP)


def __getattr__(name: str):
    if name in _APP:
        return getattr(importlib.import_module(f"vae_runtime.{_APP[name]}"), name)
    raise AttributeError(f"module 'vae_runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_APP])
