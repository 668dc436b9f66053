"""Benchmark: training images/s fed by the shard loader against the same loop fed from memory.

Prints one JSON line: images/s of `vae train` with the real shard loader (`data.in_memory=false`), with the
train split already in (device) memory (`data.in_memory=true`), and their ratio (target >= 0.9: the input
pipeline costs < 10% of a step). Both runs use the same config, steps and device, measured in one run after
a warm-up window. Data: `--shards DIR`, else the shared real CelebA sample sharded at 64x64 into a temporary
folder, else synthetic faces.

    .venv/bin/python bench/train.py [--config configs/celeba64.yaml] [--steps 40] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchkit import REPO, SHARED_SAMPLE  # noqa: E402


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


def images_per_s(run_dir: Path) -> float:
    """Throughput of the windows after the first (the first holds start-up and compilation)."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    return sum(r["images_per_s"] for r in steady) / len(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "celeba64.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shards", default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import torch

    from vae.config import load_config
    from vae.training.train import train

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    log_every = max(1, args.steps // 4)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        shards, data = prepare_shards(args, tmp)
        rates = {}
        for mode in ("false", "true"):
            cfg = load_config(args.config, [*args.overrides, f"run_dir={tmp / f'run-{mode}'}", f"data.shards={shards}",
                                            f"train.steps={args.steps}", f"train.log_every={log_every}",
                                            f"train.checkpoint_every={args.steps}", "train.tensorboard=false",
                                            f"data.in_memory={mode}"])
            started = time.time()
            train(cfg, progress=False)
            rates[mode] = (images_per_s(tmp / f"run-{mode}"), time.time() - started)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    print(json.dumps({
        "bench": "train", "device": device, "data": data, "steps": args.steps, "batch_size": cfg.data.batch_size,
        "image_size": cfg.model.image_size, "mixed_precision": cfg.train.mixed_precision,
        "num_workers": cfg.data.num_workers, "compile": cfg.train.compile, "channels_last": cfg.train.channels_last,
        "shard_loader_img_s": round(rates["false"][0], 1), "in_memory_img_s": round(rates["true"][0], 1),
        "ratio": round(rates["false"][0] / rates["true"][0], 3), "target_ratio": 0.9,
        "wall_s": {"shard_loader": round(rates["false"][1], 1), "in_memory": round(rates["true"][1], 1)}}))


if __name__ == "__main__":
    main()
