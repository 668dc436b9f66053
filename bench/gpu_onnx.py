"""The exported decoder on a GPU: onnxruntime's CUDA provider (float32 and float16 graphs) against PyTorch.

    python bench/gpu_onnx.py --run RUN_DIR --model MODEL_DIR [--seconds 3] [--explore]

MODEL_DIR is `vae export --run RUN_DIR --out MODEL_DIR --precision fp16`. Prints ONE JSON line:
- which provider actually ran each graph when CUDA was asked for (`vae_runtime.Decoder(device="cuda")`), and
  any fallback warning;
- agreement on 256 prior draws, max abs difference on outputs in [0, 1]: float32 on CUDA and float16 on CUDA
  against float32 on the CPU provider (the export's reference), and PyTorch on the GPU against the same;
- decoding speed at batch 1 (ms per call) and 256 (images/s): onnxruntime through the runtime (NumPy in and
  out, so host-device copies are counted) against PyTorch eager on the GPU in float32 and in float16
  (`model.half()`), each also copying z in and images out.

`device_resident` times the same with z and the images kept on the GPU on both sides, the comparison the GPU
goals are set in: onnxruntime through the runtime's device-buffer calls (an OrtValue in; torch tensors bound in
place; a CUDA graph replayed on fixed buffers) against PyTorch eager (and, for reference, a torch CUDA graph).
Its keys name graph, batch and baseline: `decoder_fp16_b1.speedup_vs_torch_half`.

`--explore` adds both graphs under other CUDA provider options (the runtime's, none, heuristic convolution
search, TF32 off), timed one after another, under "cuda_options"; and under "tensorrt", the float32 graph on
onnxruntime's TensorRT provider (TensorRT builds its own float16 engine and CUDA graph) with z and the images on
the device, or why that provider could not run (it needs TensorRT's libraries, which onnxruntime-gpu does not
bring).

Without a GPU it still runs (everything falls back to the CPU, with no PyTorch rows): a dry run of the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from vae.core.checkpoint import load_trained  # noqa: E402
from vae_runtime import Decoder, cuda_provider_options, session_options  # noqa: E402

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


def tensorrt(model_dir: Path, z: np.ndarray, want: np.ndarray, seconds: float) -> dict:
    """The float32 graph on the TensorRT provider, one engine per batch size (1 and 256), z and the images bound
    on the device (I/O binding): b1 ms, b256 images/s, max abs diff; or why it did not run."""
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return {"unavailable": "onnxruntime lists no TensorrtExecutionProvider"}
    found: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        for batch in (1, 256):
            zb = np.ascontiguousarray(z[:batch])
            shape = f"z:{batch}x{z.shape[1]}"  # one fixed-shape engine: no rebuild per call
            options = {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
                       "trt_cuda_graph_enable": "True", "trt_profile_min_shapes": shape,
                       "trt_profile_opt_shapes": shape, "trt_profile_max_shapes": shape}
            try:
                session = ort.InferenceSession(
                    str(model_dir / "decoder.onnx"), session_options(),
                    providers=[("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", {}),
                               "CPUExecutionProvider"])
                if session.get_providers()[0] != "TensorrtExecutionProvider":
                    return {"unavailable": f"the session fell back to {session.get_providers()[0]} (TensorRT's "
                                           "libraries missing?)"}
                output = session.get_outputs()[0]
                binding = session.io_binding()
                binding.bind_ortvalue_input("z", ort.OrtValue.ortvalue_from_numpy(zb, "cuda", 0))
                images = ort.OrtValue.ortvalue_from_shape_and_type((batch, *want.shape[1:]), np.float32, "cuda", 0)
                binding.bind_ortvalue_output(output.name, images)
                key, figure = per_call_figure(batch, timed(lambda: session.run_with_iobinding(binding), seconds))
                found[key] = figure
                diff = float(np.abs(images.numpy() - want[:batch]).max())
                found["max_abs_diff"] = max(found.get("max_abs_diff", 0.0), float(f"{diff:.3g}"))
            except Exception as err:  # the other rows still count
                found[f"b{batch}_error"] = f"{type(err).__name__}: {err}"[:300]
    return found


def per_call_figure(batch: int, seconds_per_call: float) -> tuple[str, float]:
    return ("b1_ms", round(1e3 * seconds_per_call, 3)) if batch == 1 else \
        (f"b{batch}_img_s", round(batch / seconds_per_call, 1))


def ort_device_modes(decoder, stream, z: np.ndarray, batch: int, seconds: float) -> dict:
    """One graph at one batch, z and the images on the GPU, three ways: an OrtValue in and an output
    onnxruntime allocates; torch tensors bound in place (`out=`); a CUDA graph replayed on fixed torch buffers,
    each call first copying the next z into its input (as an app does). Seconds per call, and the largest
    difference of the replayed graph from the NumPy path (a stale or wrong capture shows here)."""
    found = {}
    zb = np.ascontiguousarray(z[:batch])
    side = decoder.image_size
    cuda = stream is not None  # else a CPU dry run: NumPy views of CPU tensors stand in for device buffers
    zv = ort.OrtValue.ortvalue_from_numpy(zb, "cuda" if cuda else "cpu", 0)
    found["ortvalue"] = timed(lambda: decoder.decode_on_device(zv), seconds)
    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        device = "cuda" if cuda else "cpu"
        zt = torch.from_numpy(zb).to(device)
        out = torch.empty(batch, 3, side, side, device=device)
        found["bound"] = timed(lambda: decoder.decode_on_device(bufferable(zt), out=bufferable(out)), seconds)
        zin = torch.zeros_like(zt)
        try:
            graph = decoder.capture(bufferable(zin), bufferable(torch.empty_like(out)))
        except Exception as err:  # the other modes' figures still count
            found["cuda_graph_error"] = f"{type(err).__name__}: {err}"[:300]
            return found

        def replay():
            zin.copy_(zt)
            return graph.replay()

        found["cuda_graph"] = timed(replay, seconds)
        stream.synchronize()
        found["cuda_graph_max_abs_diff"] = float(f"{np.abs(replay().cpu().numpy() - decoder.decode(zb)).max():.3g}")
    return found


def bufferable(tensor: torch.Tensor):
    """A CUDA tensor as it is (it has __cuda_array_interface__); a CPU tensor as a NumPy view of its memory."""
    return tensor if tensor.is_cuda else tensor.numpy()


def torch_device_modes(model, dtype, z: np.ndarray, batch: int, seconds: float) -> dict:
    """PyTorch with z and the images on the GPU: eager (synchronized per call, cuDNN benchmark mode), and, as
    a reference beyond the goal's baseline, the same forward captured as a torch CUDA graph."""
    zt = torch.from_numpy(np.ascontiguousarray(z[:batch])).to("cuda", dtype)

    def eager():
        with torch.inference_mode():
            model.decode_mean(zt)
        torch.cuda.synchronize()

    found = {"eager": timed(eager, seconds)}
    static = zt.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            model.decode_mean(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        model.decode_mean(static)

    def replay():
        static.copy_(zt)
        graph.replay()
        torch.cuda.synchronize()

    found["cuda_graph"] = timed(replay, seconds)
    return found


def device_resident(model_dir: Path, run: str, z: np.ndarray, seconds: float) -> dict:
    """Both sides with z and the images on the device, at batch 1 and 256: onnxruntime through the runtime's
    device-buffer calls (float32 and float16 graphs, on a torch stream it shares) against PyTorch eager in
    float32 and half; the goal's ratios are the float16 graph's best mode against PyTorch eager half."""
    out: dict = {}
    cuda = torch.cuda.is_available()
    stream = torch.cuda.Stream() if cuda else None
    for label, name in (("fp32", "decoder.onnx"), ("fp16", "decoder.fp16.onnx")):
        decoder = Decoder(model_dir / name, device="cuda" if cuda else "cpu",
                          cuda_stream=stream.cuda_stream if cuda else None)
        for batch in (1, 256):
            try:
                modes = ort_device_modes(decoder, stream, z, batch, seconds)
            except Exception as err:  # one failing mode must not lose the others' figures
                out.setdefault("errors", {})[f"ort_{label}_b{batch}"] = f"{type(err).__name__}: {err}"[:300]
                continue
            for mode, value in modes.items():
                if mode.endswith("error"):
                    out.setdefault("errors", {})[f"ort_{label}_b{batch}_{mode}"] = value
                    continue
                key, figure = per_call_figure(batch, value) if not mode.endswith("diff") else (f"b{batch}", value)
                out.setdefault(f"ort_{label}_{mode}", {})[key] = figure
    if not cuda:
        return out
    torch.backends.cudnn.benchmark = True
    for label, dtype in (("torch_fp32", torch.float32), ("torch_fp16", torch.float16)):
        model = load_trained(run, ema=True)[0].to("cuda", dtype).eval()
        for batch in (1, 256):
            try:
                modes = torch_device_modes(model, dtype, z, batch, seconds)
            except Exception as err:
                out.setdefault("errors", {})[f"{label}_b{batch}"] = f"{type(err).__name__}: {err}"[:300]
                continue
            for mode, value in modes.items():
                key, figure = per_call_figure(batch, value)
                out.setdefault(f"{label}_{mode}", {})[key] = figure
    half = out.get("torch_fp16_eager", {})
    for batch, key in ((1, "b1_ms"), (256, "b256_img_s")):
        ours = [out[k][key] for k in ("ort_fp16_ortvalue", "ort_fp16_bound", "ort_fp16_cuda_graph")
                if key in out.get(k, {})]
        if ours and key in half:
            best = min(ours) if batch == 1 else max(ours)
            out[f"decoder_fp16_b{batch}.speedup_vs_torch_half"] = round(
                half[key] / best if batch == 1 else best / half[key], 2)
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
            key, figure = per_call_figure(batch, timed(lambda: fn(zb), args.seconds))
            speed.setdefault(label, {})[key] = figure
    result["speed"] = speed
    result["device_resident"] = device_resident(model_dir, args.run, z, args.seconds)
    if args.explore:
        result["cuda_options"] = explore(model_dir, z, want, args.seconds)
        result["tensorrt"] = tensorrt(model_dir, z, want, args.seconds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
