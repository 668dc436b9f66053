"""Benchmark: IWAE evaluation throughput against the bare forward passes it needs, and its peak memory.

Prints one JSON line:
- iwae_samples_per_s: images x K per second of `iwae_bound` at K (default 1000, chunked)
- bare_samples_per_s: the same encoder pass + K decoder passes, forward only, no likelihood or logsumexp
- ratio = iwae / bare (target >= 0.7)
- peak_rss_mb at K=100 and K=5000 (each in a fresh process) and their ratio (target within 15%)
The model is configs/celeba64.yaml's (64x64) with its initial weights: speed and memory do not depend on
training. Run: .venv/bin/python bench/eval.py [--k 1000] [--batch 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from benchkit import REPO
from vae.core.config import load_config  # noqa: E402
from vae.models import build_model  # noqa: E402
from vae.core.objectives import iwae_bound, to_unit  # noqa: E402


def make(args):
    cfg = load_config(REPO / "configs" / "celeba64.yaml", args.override)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    size = cfg.model.image_size
    x = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    return cfg, model, x


@torch.no_grad()
def bare(model, x, k, chunk):
    mu, logvar = model.encode(to_unit(x))
    done = 0
    while done < k:
        step = min(chunk, k - done)
        z = mu.repeat(step, 1) + torch.exp(0.5 * logvar).repeat(step, 1)
        model.decode(z)
        done += step


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_child(args) -> None:
    cfg, model, x = make(args)
    iwae_bound(model, x, args.k, cfg.eval.k_chunk)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-k", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("override", nargs="*", help="config key=value overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_k is not None:
        args.k = args.memory_k
        memory_child(args)
        return
    cfg, model, x = make(args)
    chunk = cfg.eval.k_chunk
    iwae_bound(model, x[:1], chunk, chunk)  # warm up
    t_bare = best_of(lambda: bare(model, x, args.k, chunk), args.repeats)
    t_iwae = best_of(lambda: iwae_bound(model, x, args.k, chunk), args.repeats)
    samples = args.batch * args.k
    rss = {}
    for k in (100, 5000):
        out = subprocess.run([sys.executable, __file__, "--memory-k", str(k), "--batch", str(args.batch),
                              "--threads", str(args.threads), *args.override],
                             capture_output=True, text=True, check=True)
        rss[k] = float(out.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "bench": "eval", "k": args.k, "batch": args.batch, "k_chunk": chunk, "threads": args.threads,
        "image_size": cfg.model.image_size, "iwae_samples_per_s": round(samples / t_iwae, 1),
        "bare_samples_per_s": round(samples / t_bare, 1), "ratio": round(t_bare / t_iwae, 3),
        "peak_rss_mb_k100": round(rss[100], 1), "peak_rss_mb_k5000": round(rss[5000], 1),
        "memory_ratio": round(rss[5000] / rss[100], 3)}))


if __name__ == "__main__":
    main()
