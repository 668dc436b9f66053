"""What the benchmarks share: where the repository and the shared CelebA sample are, timing, the JSON line, and the
model's floating-point operations against the device's peak (`flops_per_image`, `gemm_gflops`, `peak_gflops`).

The benchmarks import the installed project (`make install`, then `.venv/bin/python bench/NAME.py`); this module
sits beside them, so `from benchkit import ...` works when a script runs from any folder.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The real aligned CelebA images beside the repository (never committed); VAE_CELEBA_SAMPLE points elsewhere.
SHARED_SAMPLE = Path(os.environ.get("VAE_CELEBA_SAMPLE") or REPO.parent / "shared" / "data" / "celeba-sample")


def best_rate(run, repeats: int = 3) -> float:
    """Items per second: the best of `repeats` calls of run() -> (items, seconds)."""
    return max(n / s for n, s in (run() for _ in range(repeats)))


def calls_per_second(fn, seconds: float, min_calls: int = 3) -> float:
    """Call fn() for at least `seconds` (and `min_calls` times); calls per second."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < min_calls:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def images_per_s(run_dir) -> float:
    """Training throughput of a run (`RUN/train_log.jsonl`): the mean of the windows after the first (the first
    holds start-up and compilation), or the only window."""
    records = [json.loads(line) for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    return sum(r["images_per_s"] for r in steady) / len(steady)


def emit(result: dict) -> None:
    """The benchmark's one JSON line on stdout."""
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Work per image and the device's peak. torch (and onnxruntime) are imported only by the functions that need them.

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, by the device's name
# (upper-cased): (pattern, TFLOP/s), the first match wins. Anything else (an H100 NVL, a GPU not listed) has no
# table peak: null, with the name beside it.
GPU_BF16_DENSE_TFLOPS = ((r"\bH200\b", 989.0), (r"\bH100\b.*\bPCIE\b", 756.0),
                         (r"\bH100\b.*\b(HBM3|SXM)", 989.0), (r"\bA100\b", 312.0))


def flops_per_image(model, fn, example) -> float:
    """Floating-point operations (2 per multiply-add) of the convolutions and linear layers in `fn(example)`,
    per image: the work any framework must do (pooling, activations, interpolation and the loss are not
    counted)."""
    import torch

    total = [0]

    def count(module, inputs, output):
        if isinstance(module, torch.nn.ConvTranspose2d):  # each input value meets out_ch * kh * kw weights
            total[0] += 2 * inputs[0].numel() * module.out_channels * module.weight[0, 0].numel() // module.groups
        elif isinstance(module, torch.nn.Conv2d):
            total[0] += 2 * output.numel() * module.weight[0].numel()
        elif isinstance(module, torch.nn.Linear):
            total[0] += 2 * output.numel() * module.in_features

    kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.inference_mode():
            fn(example)
    finally:
        for hook in hooks:
            hook.remove()
    return total[0] / example.shape[0]


def training_forward_flops(model, image_size: int, in_channels: int = 3, batch: int = 2) -> float:
    """`flops_per_image` of the model's training forward `model(x01, eps)` (`VAEModel.forward`: the encoder and
    the decoder, for a top-down model the bottom-up pass and the top-down pass along the posterior), random
    input on the model's device. Training costs about 3 times this (the backward pass about twice the forward)."""
    import torch

    device = next(model.parameters()).device
    x = torch.rand(batch, in_channels, image_size, image_size, device=device)
    eps = torch.randn(batch, model.latent_dim, device=device)
    return flops_per_image(model, lambda x01: model(x01, eps), x)


def config_flops(model_cfg) -> dict:
    """GFLOP per image of a model config's training forward, and of a training step as 3x that (forward, and a
    backward of about twice the forward), counted on a freshly built float32 model on the CPU."""
    from vae.models import build_model

    forward = training_forward_flops(build_model(model_cfg).eval(), model_cfg.image_size)
    return {"forward_gflop_per_image": float(f"{forward / 1e9:.6g}"),
            "train_gflop_per_image_3x_forward": float(f"{3 * forward / 1e9:.6g}")}


def gemm_gflops(n: int = 2048, reps: int = 5, threads: int = 2) -> float:
    """The best float32 matrix-product rate of PyTorch and of onnxruntime (a one-node MatMul graph) on these
    threads, whichever is higher: about what the cores can do."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from vae_runtime import session_options

    a, b = torch.randn(n, n), torch.randn(n, n)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # any onnxruntime
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    feed = {"a": a.numpy(), "b": b.numpy()}
    best = float("inf")
    for fn in (lambda: torch.mm(a, b), lambda: session.run(None, feed)):
        fn()
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def torch_gemm_gflops(dtype: str = "bfloat16", device: str = "cpu", n: int = 2048, reps: int = 5,
                      calls: int = 1) -> float:
    """PyTorch's best matrix-product rate in `dtype` on `device` (GFLOP/s), measured as `gemm_gflops` measures
    float32: the best of `reps` timings of an n x n product (`calls` of them per timing, synchronized on a GPU).
    onnxruntime's CPU provider has no bf16 MatMul, so for bf16 this is PyTorch's alone."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        sync()
        return (time.perf_counter() - start) / calls

    timed()  # warm-up (kernel selection)
    return 2 * n ** 3 / min(timed() for _ in range(reps)) / 1e9


def gpu_bf16_dense_tflops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (`GPU_BF16_DENSE_TFLOPS`), or None when it is not in the table."""
    upper = name.upper()
    if "NVL" in upper:  # the NVL parts run at their own (lower) clocks: not in the table
        return None
    return next((tflops for pattern, tflops in GPU_BF16_DENSE_TFLOPS if re.search(pattern, upper)), None)


def peak_gflops(precision: str, threads: int = 2) -> dict:
    """The rates (GFLOP/s) training at `precision` ("float32" or "bf16") is compared with, by name, and the device.

    On a GPU: `gpu_table_bf16_dense` (the data sheet's dense bf16 peak, None for a GPU not in the table) and
    `gemm_bf16` (PyTorch's measured 8192^2 bf16 product rate), whatever the precision. On the CPU: `gemm_fp32`
    (`gemm_gflops`) for float32, `gemm_bf16` (`torch_gemm_gflops`, same size and threads) for bf16."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        table = gpu_bf16_dense_tflops(name)
        return {"device": name, "gflops": {
            "gpu_table_bf16_dense": None if table is None else table * 1e3,
            "gemm_bf16": round(torch_gemm_gflops("bfloat16", "cuda", n=8192, reps=5, calls=10), 1)}}
    if precision == "bf16":
        rates = {"gemm_bf16": round(torch_gemm_gflops("bfloat16", "cpu"), 1)}
    else:
        rates = {"gemm_fp32": round(gemm_gflops(threads=threads), 1)}
    return {"device": "cpu", "gflops": rates}


def share_of_peak(train_gflop_per_image: float, images_per_s: float, peaks: dict) -> dict:
    """Achieved training GFLOP/s (training GFLOP per image x images/s) over each peak in `peaks` ({name: GFLOP/s
    or None}): {name: share, None where the peak is unknown}."""
    achieved = train_gflop_per_image * images_per_s
    return {name: None if not peak else float(f"{achieved / peak:.4g}") for name, peak in peaks.items()}


def flop_figures(work: dict, img_s: float, peaks: dict) -> dict:
    """For a training rate of `img_s` images/s, with `work` from `config_flops` and `peaks` from `peak_gflops`:
    achieved_gflops (training GFLOP/image x images/s), the peaks, their device and the share of each."""
    train_gflop = work["train_gflop_per_image_3x_forward"]
    return {"achieved_gflops": float(f"{train_gflop * img_s:.4g}"), "peak_gflops": peaks["gflops"],
            "peak_device": peaks["device"], "share_of_peak": share_of_peak(train_gflop, img_s, peaks["gflops"])}


def cpu_description() -> dict:
    """The CPU's model name and bf16 units (`vae.core.hardware`, from /proc/cpuinfo; None where unknown)."""
    from vae.core import hardware

    cpuinfo = hardware.read_cpuinfo()
    return {"cpu": hardware.cpu_model_name(cpuinfo), "cpu_bf16_flags": hardware.cpu_bf16_units(cpuinfo)}
