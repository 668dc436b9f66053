"""Benchmark: training images/s fed by the shard loader against the same loop fed from memory; or bf16 against
float32 training of the same recipe.

`--compare loader` (the default) prints one JSON line: images/s of `vae train` with the real shard loader
(`data.in_memory=false`), with the train split already in (device) memory (`data.in_memory=true`), and their
ratio (target >= 0.9: the input pipeline costs < 10% of a step). Both runs use the same config, steps and
device, measured in one run after a warm-up window.

`--compare precision` trains the same recipe for the same steps twice, from memory: float32
(`train.mixed_precision=no`) and bf16 autocast with `train.channels_last=true`, and prints steps/s of each, their
ratio (target on CPUs: 1.8 with AMX-BF16, 1.3 with AVX512-BF16 alone), and bits/dim after the equal steps (the
last logged training window, and the ELBO of the final weights in float32 on up to `--valid-images` valid images
with the same noise: target within 1%), with the CPU's model name and bf16 flags. Each run is its own process:
Accelerate fixes mixed precision once per process.

Both modes also give the model's work and the share of the device's peak it reaches (`benchkit`):
`forward_gflop_per_image` is the convolutions and linear layers of the training forward `model(x01, eps)` (for
the hierarchical models the bottom-up pass and the top-down pass along the posterior), counted on the config's
model; `train_gflop_per_image_3x_forward` is 3x that (the backward pass about twice the forward: the usual
approximation, not a count); `achieved_gflops` = training GFLOP/image x images/s. `peak_gflops` holds the rates
it is compared with, measured in the same run after training: on the CPU the float32 GEMM rate (`gemm_fp32`: the
best of PyTorch and onnxruntime on 2048x2048, `--threads` threads) for float32 training and PyTorch's bf16 GEMM
rate (`gemm_bf16`, measured the same way) for bf16; on a GPU the data sheet's dense bf16 peak by device name
(`gpu_table_bf16_dense`: H100 SXM 989 TFLOP/s, H100 PCIe 756, H200 989, A100 312; null for another name, given
in `peak_device`) and a measured 8192x8192 bf16 GEMM rate (`gemm_bf16`). `share_of_peak` is achieved over each
(`--compare loader`: of the in-memory run; `shard_loader_share_of_peak` of the other).
The CPU's model name and bf16 units are in the line (`cpu`, `cpu_bf16_flags`).

Data: `--shards DIR`, else the shared real CelebA sample sharded at 64x64 into a temporary folder, else
synthetic faces.

    .venv/bin/python bench/train.py [--compare loader|precision] [--config configs/celeba64.yaml] [--steps 40]
        [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import (REPO, SHARED_SAMPLE, config_flops, cpu_description, flop_figures, images_per_s,  # noqa: E402
                      peak_gflops, share_of_peak)


def prepare_shards(args, tmp: Path) -> tuple[str, str]:
    from pipeline.shard import shard

    if args.shards:
        return args.shards, "given"
    if SHARED_SAMPLE.is_dir():
        shard(SHARED_SAMPLE, tmp / "shards", size=64, workers=2, progress=False)
        return str(tmp / "shards"), "celeba-sample"
    from pipeline.synth import synthesize

    synthesize(tmp / "synth", 2000, seed=0)
    shard(tmp / "synth", tmp / "shards", size=64, workers=2, progress=False)
    return str(tmp / "shards"), "synthetic"


MIXED_PRECISIONS = {"float32": ["train.mixed_precision=no"],
                    "bf16_channels_last": ["train.mixed_precision=bf16", "train.channels_last=true"]}
CPU_BF16_TARGETS = {"amx_bf16": 1.8, "avx512_bf16": 1.3}  # SPEC.md: bf16 steps/s over float32 on such CPUs


def valid_bpd(run_dir: Path, max_images: int) -> float:
    """ELBO bits/dim of the run's final (not EMA) weights in float32 on the first `max_images` valid images,
    one posterior sample each from a fixed generator: the same images and noise for every run compared."""
    import torch

    from pipeline.loader import eval_loader
    from vae.core.objectives import bits_per_dim, elbo_terms, image_dims
    from vae.core.run import Run

    run = Run(run_dir)
    model, cfg = run.model(ema=False), run.config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    generator = torch.Generator().manual_seed(0)
    total, n = 0.0, 0
    with torch.no_grad():
        for _, x, _ in eval_loader(cfg.data.shards, "valid", cfg.eval.batch_size):
            x = x[:max_images - n]
            eps = torch.randn((x.shape[0], cfg.model.latent_dim), generator=generator).to(device)
            total += float(elbo_terms(model, x.to(device), eps)["elbo"].double().sum())
            n += x.shape[0]
            if n >= max_images:
                break
    return float(bits_per_dim(total / n, image_dims(cfg.model.image_size)))


def train_one(args) -> None:
    """The child of `--compare precision`: train one configuration, write its figures to `args.child` (JSON)."""
    import torch

    from vae.core.config import load_config
    from vae.training.train import train

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    run_dir = Path(args.child).with_suffix("")
    cfg = load_config(args.config, [*args.overrides, f"run_dir={run_dir}", f"data.shards={args.shards}",
                                    f"train.steps={args.steps}", f"train.log_every={max(1, args.steps // 4)}",
                                    f"train.checkpoint_every={args.steps}", "train.tensorboard=false",
                                    "data.in_memory=true"])
    started = time.time()
    train(cfg, progress=False)
    wall = time.time() - started
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    per_step = cfg.data.batch_size * cfg.train.grad_accum_steps
    img_s = images_per_s(run_dir)
    Path(args.child).write_text(json.dumps({
        "steps_per_s": round(img_s / per_step, 3), "images_per_s": round(img_s, 1), "wall_s": round(wall, 1),
        "train_bpd": records[-1]["elbo_bpd"], "valid_bpd": round(valid_bpd(run_dir, args.valid_images), 4),
        "mixed_precision": cfg.train.mixed_precision, "channels_last": cfg.train.channels_last,
        "skipped_steps": records[-1]["skipped_steps"]}))


def compare_precision(args, shards: str, data: str, tmp: Path) -> dict:
    import torch

    from vae.core import hardware
    from vae.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    results = {}
    for name, overrides in MIXED_PRECISIONS.items():
        out = tmp / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--config", args.config,
               "--steps", str(args.steps), "--shards", shards, "--threads", str(args.threads),
               "--valid-images", str(args.valid_images), "--", *args.overrides, *overrides]
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        results[name] = json.loads(out.read_text())
    work = config_flops(cfg.model)
    for name, result in results.items():
        peaks = peak_gflops("bf16" if name.startswith("bf16") else "float32", args.threads)
        result.update(flop_figures(work, result["images_per_s"], peaks))
    cpuinfo = hardware.read_cpuinfo()
    flags = hardware.cpu_bf16_units(cpuinfo)
    target = next((CPU_BF16_TARGETS[f] for f in CPU_BF16_TARGETS if f in (flags or [])), None)
    fp32, bf16 = results["float32"], results["bf16_channels_last"]
    return {
        "bench": "train-precision", "device": device_name(), "cpu": hardware.cpu_model_name(cpuinfo),
        "cpu_bf16_flags": flags, "threads": args.threads, "data": data, "steps": args.steps,
        "batch_size": cfg.data.batch_size, "image_size": cfg.model.image_size, "in_memory": True, **work, **results,
        "bf16_speedup": round(bf16["steps_per_s"] / fp32["steps_per_s"], 3),
        "target_bf16_speedup": None if torch.cuda.is_available() else target,
        "valid_bpd_rel_diff": round(abs(bf16["valid_bpd"] - fp32["valid_bpd"]) / fp32["valid_bpd"], 4),
        "target_bpd_rel_diff": 0.01, "valid_images": args.valid_images}


def precision_of(cfg) -> str:
    """The precision whose peak a run is compared with: bf16 autocast, else float32 (fp16 autocast is a no-op on
    the CPU, and on a GPU every run is compared with the bf16 peak)."""
    return "bf16" if cfg.train.mixed_precision == "bf16" else "float32"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("loader", "precision"), default="loader")
    parser.add_argument("--config", default=str(REPO / "configs" / "celeba64.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shards", default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--valid-images", type=int, default=512, help="--compare precision: images for bits/dim")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.child:
        return train_one(args)
    import torch

    from vae.core.config import load_config
    from vae.training.train import train

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    log_every = max(1, args.steps // 4)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        shards, data = prepare_shards(args, tmp)
        if args.compare == "precision":
            print(json.dumps(compare_precision(args, shards, data, tmp)))
            return
        rates = {}
        for mode in ("false", "true"):
            cfg = load_config(args.config, [*args.overrides, f"run_dir={tmp / f'run-{mode}'}", f"data.shards={shards}",
                                            f"train.steps={args.steps}", f"train.log_every={log_every}",
                                            f"train.checkpoint_every={args.steps}", "train.tensorboard=false",
                                            f"data.in_memory={mode}"])
            started = time.time()
            train(cfg, progress=False)
            rates[mode] = (images_per_s(tmp / f"run-{mode}"), time.time() - started)
    work = config_flops(cfg.model)
    peaks = peak_gflops(precision_of(cfg), args.threads)
    print(json.dumps({
        "bench": "train", "device": device_name(), "data": data, "steps": args.steps, "batch_size": cfg.data.batch_size,
        "image_size": cfg.model.image_size, "mixed_precision": cfg.train.mixed_precision,
        "num_workers": cfg.data.num_workers, "compile": cfg.train.compile, "channels_last": cfg.train.channels_last,
        "shard_loader_img_s": round(rates["false"][0], 1), "in_memory_img_s": round(rates["true"][0], 1),
        "ratio": round(rates["false"][0] / rates["true"][0], 3), "target_ratio": 0.9,
        "wall_s": {"shard_loader": round(rates["false"][1], 1), "in_memory": round(rates["true"][1], 1)},
        **cpu_description(), **work,
        **flop_figures(work, rates["true"][0], peaks),  # of the in-memory run: the model's own rate
        "shard_loader_share_of_peak": share_of_peak(work["train_gflop_per_image_3x_forward"], rates["false"][0],
                                                    peaks["gflops"])}))


if __name__ == "__main__":
    main()
