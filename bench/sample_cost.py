"""Benchmark: what the sample metrics add to `vae eval`'s time on the demo (target: at most 10%).

Builds the demo's data (2,000 synthetic faces at 32x32, as `make demo` does), trains `configs/demo.yaml` briefly
(the evaluation's cost depends on the model's size, not on how long it trained), then times `evaluate` on the
test split with and without the sample metrics (no Inception weights), alternating, and prints one JSON line:
each side's times, their medians and the share the sample metrics add (median against median).

    .venv/bin/python bench/sample_cost.py [--repeats 7] [--steps 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchkit import REPO, cpu_description, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    from pipeline.shard import shard
    from pipeline.synth import synthesize
    from vae.core.config import load_config
    from vae.evaluation.evaluate import evaluate
    from vae.training.train import train

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-sample-cost-") as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "data", 2000, seed=0)
        shard(tmp / "data", tmp / "shards", size=32, progress=False)
        cfg = load_config(REPO / "configs" / "demo.yaml", [f"run_dir={tmp / 'run'}", f"data.shards={tmp / 'shards'}",
                                                           f"train.steps={args.steps}", "train.tensorboard=false",
                                                           f"train.checkpoint_every={args.steps}"])
        train(cfg, progress=False)
        evaluate(tmp / "run", samples=True, out=tmp / "warm")  # imports and caches, outside the timing
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for samples in (False, True):
                start = time.perf_counter()
                metrics = evaluate(tmp / "run", samples=samples, out=tmp / f"eval-{samples}")
                times[samples].append(time.perf_counter() - start)
        without, with_samples = statistics.median(times[False]), statistics.median(times[True])
        emit({"bench": "sample_cost", **cpu_description(), "threads": args.threads, "config": "configs/demo.yaml",
              "split": metrics["split"], "k": metrics["k"], "n_images": metrics["n_images"],
              "sample_images": metrics["samples"]["n_generated"], "temperatures": metrics["samples"]["temperatures"],
              "eval_s_without": [round(t, 3) for t in times[False]],
              "eval_s_with": [round(t, 3) for t in times[True]],
              "median_without_s": round(without, 3), "median_with_s": round(with_samples, 3),
              "added_share": round(with_samples / without - 1, 4), "target": 0.10})


if __name__ == "__main__":
    main()
