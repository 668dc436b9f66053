"""The exported decoder on a GPU: onnxruntime's CUDA provider (float32 and float16 graphs) against PyTorch.

    python bench/gpu_onnx.py --run RUN_DIR --model MODEL_DIR [--seconds 3]

MODEL_DIR is `vae export --run RUN_DIR --out MODEL_DIR --fp16`. Prints ONE JSON line:
- which provider actually ran each graph when CUDA was asked for (`vae.runtime.Decoder(device="cuda")`), and
  any fallback warning;
- agreement on 256 prior draws, max abs difference on outputs in [0, 1]: float32 on CUDA and float16 on CUDA
  against float32 on the CPU provider (the export's reference), and PyTorch on the GPU against the same;
- decoding speed at batch 1 (ms per call) and 256 (images/s): onnxruntime through the runtime (NumPy in and
  out, so host-device copies are counted) against PyTorch eager on the GPU in float32 and in float16
  (`model.half()`), each also copying z in and images out.

Without a GPU it still runs (everything falls back to the CPU, PyTorch rows are null): a dry run of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from vae.checkpoint import load_trained  # noqa: E402
from vae.runtime import Decoder  # noqa: E402


def timed(fn, seconds: float) -> float:
    """Seconds per call: warm up, then call for about `seconds`."""
    for _ in range(3):
        fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def torch_decoder(model, dtype):
    device = torch.device("cuda")
    net = model.to(device=device, dtype=dtype).eval()

    def decode(z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = net.decode_mean(torch.from_numpy(z).to(device=device, dtype=dtype))
            return out.float().cpu().numpy()
    return decode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    args = parser.parse_args()
    model_dir = Path(args.model)
    result: dict = {"bench": "gpu_onnx", "onnxruntime": ort.__version__, "torch": torch.__version__,
                    "available_providers": ort.get_available_providers(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    decoders, warned = {}, {}
    for label, name in (("fp32", "decoder.onnx"), ("fp16", "decoder.fp16.onnx")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            decoders[label] = Decoder(model_dir / name, device="cuda")
        warned[label] = [str(w.message)[:200] for w in caught]
    reference = Decoder(model_dir / "decoder.onnx", device="cpu")
    result["provider_ran"] = {label: d.provider for label, d in decoders.items()}
    result["fallback_warnings"] = warned

    latent_dim = reference.latent_dim
    z = np.random.default_rng(0).standard_normal((256, latent_dim)).astype(np.float32)
    want = reference.decode(z)
    agree = {f"ort_{label}": float(np.abs(d.decode(z) - want).max()) for label, d in decoders.items()}
    torch_fns = {}
    if torch.cuda.is_available():
        model, _, _ = load_trained(args.run, ema=True)
        torch_fns["torch_fp32"] = torch_decoder(model, torch.float32)
        model16, _, _ = load_trained(args.run, ema=True)
        torch_fns["torch_fp16"] = torch_decoder(model16, torch.float16)
        torch.backends.cudnn.benchmark = True
        for label, fn in torch_fns.items():
            agree[label] = float(np.abs(fn(z) - want).max())
    result["max_abs_diff_vs_cpu_fp32"] = {k: float(f"{v:.3g}") for k, v in agree.items()}

    fns = {f"ort_{label}": d.decode for label, d in decoders.items()} | torch_fns
    speed: dict = {}
    for batch in (1, 256):
        zb = np.ascontiguousarray(z[:batch])
        for label, fn in fns.items():
            per_call = timed(lambda: fn(zb), args.seconds)
            speed.setdefault(label, {})
            if batch == 1:
                speed[label]["b1_ms"] = round(1e3 * per_call, 3)
            else:
                speed[label]["b256_img_s"] = round(batch / per_call, 1)
    result["speed"] = speed
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
