"""The exported decoder on a GPU: onnxruntime's CUDA provider (float32 and float16 graphs) against PyTorch.

    python bench/gpu_onnx.py --run RUN_DIR --model MODEL_DIR [--seconds 3] [--explore]

MODEL_DIR is `vae export --run RUN_DIR --out MODEL_DIR --fp16`. Prints ONE JSON line:
- which provider actually ran each graph when CUDA was asked for (`vae.runtime.Decoder(device="cuda")`), and
  any fallback warning;
- agreement on 256 prior draws, max abs difference on outputs in [0, 1]: float32 on CUDA and float16 on CUDA
  against float32 on the CPU provider (the export's reference), and PyTorch on the GPU against the same;
- decoding speed at batch 1 (ms per call) and 256 (images/s): onnxruntime through the runtime (NumPy in and
  out, so host-device copies are counted) against PyTorch eager on the GPU in float32 and in float16
  (`model.half()`), each also copying z in and images out.

`device_resident` times the same with z and the images kept on the device on both sides (onnxruntime's I/O
binding through `Decoder.decode_on_device`, PyTorch on GPU tensors), the comparison the GPU goals are set in.

`--explore` adds both graphs under other CUDA provider options (the runtime's, none, heuristic convolution
search, TF32 off), timed one after another, under "cuda_options".

Without a GPU it still runs (everything falls back to the CPU, with no PyTorch rows): a dry run of the script.
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

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from vae.checkpoint import load_trained  # noqa: E402
from vae.serving.runtime import Decoder, cuda_provider_options, session_options  # noqa: E402

CUDA_VARIANTS = {"runtime": cuda_provider_options(), "none": {},
                 "heuristic_search": {**cuda_provider_options(), "cudnn_conv_algo_search": "HEURISTIC"},
                 "no_tf32": {**cuda_provider_options(), "use_tf32": "0"}}


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


def explore(model_dir: Path, z: np.ndarray, want: np.ndarray, seconds: float) -> dict:
    """Each graph under each of CUDA_VARIANTS: provider that ran, b1 ms, b256 images/s, max abs diff."""
    found = {}
    for name in ("decoder.onnx", "decoder.fp16.onnx"):
        for label, options in CUDA_VARIANTS.items():
            session = ort.InferenceSession(str(model_dir / name), session_options(),
                                           providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"])
            one = np.ascontiguousarray(z[:1])
            found[f"{name}:{label}"] = {
                "provider": session.get_providers()[0],
                "b1_ms": round(1e3 * timed(lambda: session.run(None, {"z": one}), seconds), 3),
                "b256_img_s": round(len(z) / timed(lambda: session.run(None, {"z": z}), seconds), 1),
                "max_abs_diff": float(f"{np.abs(session.run(None, {'z': z})[0] - want).max():.3g}")}
    return found


def device_resident(decoders: dict, run: str, z: np.ndarray, seconds: float) -> dict:
    """Both sides with z and the images on the device: onnxruntime through `Decoder.decode_on_device` (I/O
    binding, OrtValues on the GPU) against PyTorch eager on GPU tensors (synchronized per call), float32 and
    half, at batch 1 and 256; ratios of the float16 graph against PyTorch half."""
    out: dict = {}
    for label, decoder in decoders.items():
        device = "cuda" if decoder.provider == "CUDAExecutionProvider" else "cpu"
        for batch in (1, 256):
            zv = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(z[:batch]), device, 0)
            per_call = timed(lambda: decoder.decode_on_device(zv), seconds)
            out.setdefault(f"ort_{label}", {})["b1_ms" if batch == 1 else "b256_img_s"] = (
                round(1e3 * per_call, 3) if batch == 1 else round(batch / per_call, 1))
    if torch.cuda.is_available():
        for label, dtype in (("torch_fp32", torch.float32), ("torch_fp16", torch.float16)):
            model, _, _ = load_trained(run, ema=True)
            model = model.to("cuda", dtype).eval()
            for batch in (1, 256):
                zt = torch.from_numpy(np.ascontiguousarray(z[:batch])).to("cuda", dtype)

                def call():
                    with torch.inference_mode():
                        model.decode_mean(zt)
                    torch.cuda.synchronize()

                per_call = timed(call, seconds)
                out.setdefault(label, {})["b1_ms" if batch == 1 else "b256_img_s"] = (
                    round(1e3 * per_call, 3) if batch == 1 else round(batch / per_call, 1))
        if "ort_fp16" in out:
            out["fp16_b1_speedup_vs_torch_half"] = round(out["torch_fp16"]["b1_ms"] / out["ort_fp16"]["b1_ms"], 2)
            out["fp16_b256_speedup_vs_torch_half"] = round(
                out["ort_fp16"]["b256_img_s"] / out["torch_fp16"]["b256_img_s"], 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    parser.add_argument("--explore", action="store_true", help="also time other CUDA provider options")
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
    result["device_resident"] = device_resident(decoders, args.run, z, args.seconds)
    if args.explore:
        result["cuda_options"] = explore(model_dir, z, want, args.seconds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
