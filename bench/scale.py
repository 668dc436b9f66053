"""Full-CelebA size on one box: 202,599 real JPEGs (the shared sample repeated under new names, as hard links:
CelebA's size and decode cost, no download), then one JSON line of what each step costs.

    .venv/bin/python bench/scale.py [--images 202599] [--out /tmp/vae-scale] [--keep]

Steps, each in its own process (so its peak RSS is its own):
- shard with 1 worker and with 2 workers (images/s, peak RSS, manifest size, one manifest write's time);
- a rerun on the unchanged source (must take seconds: the listing's fingerprint matches);
- a rerun after adding 1,000 images (cost against the full run: it must track the new images);
- the training loader over as many samples as the train split holds, 2 ranks at once (images/s per rank);
- the evaluation loader over the test split with 2 ranks x 2 workers: every image exactly once;
- the same sharding at a tenth of the images, so memory growth with the number of images can be read off.
CelebA's official partition sizes (162,770 train, 19,867 valid, 19,962 test) are kept in proportion.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import SHARED_SAMPLE, emit

CELEBA = {"train": 162_770, "valid": 19_867, "test": 19_962}
SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}


def build_source(root: Path, n: int, start: int = 0) -> None:
    """`n` images named after CelebA's (start+1 .. start+n), hard links to the shared sample's JPEGs in turn,
    and the partition file (CelebA's proportions; images added later go to train)."""
    images = sorted((SHARED_SAMPLE / "img_align_celeba").glob("*.jpg"))
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True, exist_ok=True)
    total = sum(CELEBA.values())
    bounds = [CELEBA["train"] * n // total, (CELEBA["train"] + CELEBA["valid"]) * n // total]
    lines = []
    for i in range(n):
        name = f"{start + i + 1:06d}.jpg"
        target = folder / name
        if not target.exists():
            try:
                os.link(images[i % len(images)], target)
            except OSError:  # another file system: copy
                shutil.copyfile(images[i % len(images)], target)
        split = "train" if start or i < bounds[0] else "valid" if i < bounds[1] else "test"
        lines.append(f"{name} {SPLIT_CODE[split]}\n")
    with open(root / "list_eval_partition.txt", "a") as f:
        f.writelines(lines)


def run_step(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; its last stdout line is JSON. Adds wall seconds and peak RSS (MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"bench/scale.py: a step failed ({proc.returncode}): {code[:80]}")
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    result["seconds"] = round(seconds, 2)
    return result


SHARD = """
import json, resource, sys, time
from pipeline.shard import shard
started = time.perf_counter()
summary = shard(sys.argv[1], sys.argv[2], size=64, workers=int(sys.argv[3]), progress=False)
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"written": summary["written"], "up_to_date": summary["up_to_date"],
                  "shard_seconds": round(time.perf_counter() - started, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "worker_peak_rss_mb": round(children / 1024)}))
"""

MANIFEST_WRITE = """
import json, sys, time
from pipeline.manifest import read_manifest, write_manifest
manifest = read_manifest(sys.argv[1])
started = time.perf_counter()
write_manifest(sys.argv[1], manifest)
print(json.dumps({"manifest_write_s": round(time.perf_counter() - started, 3)}))
"""

TRAIN_LOADER = """
import json, resource, sys, time
from pipeline.loader import train_loader
shards, rank, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
batches = iter(train_loader(shards, 256, seed=0, rank=rank, world_size=2))
next(batches)
seen, started = 0, time.perf_counter()
while seen < n:
    seen += len(next(batches)[0])
print(json.dumps({"images": seen, "img_s": round(seen / (time.perf_counter() - started)),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""

EVAL_LOADER = """
import json, resource, sys
from pipeline.loader import eval_loader
keys = [k for batch in eval_loader(sys.argv[1], "test", 256, rank=int(sys.argv[2]), world_size=2, num_workers=2)
        for k in batch[0]]
open(sys.argv[3], "w").write("\\n".join(keys))
rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps({"images": len(keys), "peak_rss_mb": rss}))
"""


def parallel(code: str, argsets: list[list[str]]) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
             for args in argsets]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"bench/scale.py: a loader process failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def shard_step(source: Path, out: Path, workers: int) -> dict:
    result = run_step(SHARD, str(source), str(out), str(workers))
    result["img_s"] = round(result["written"] / result["shard_seconds"]) if result["written"] else None
    result["manifest_mb"] = round((out / "manifest.json").stat().st_size / 2**20, 2)
    result.update(run_step(MANIFEST_WRITE, str(out)))
    result.pop("seconds", None)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=sum(CELEBA.values()))
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not (SHARED_SAMPLE / "img_align_celeba").is_dir():
        emit({"bench": "scale", "skipped": f"no real CelebA sample under {SHARED_SAMPLE}"})
        return 0
    work = args.out or Path(tempfile.mkdtemp(prefix="vae-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"bench": "scale", "images": args.images, "cpu": os.cpu_count()}
    try:
        started = time.perf_counter()
        build_source(work / "source", args.images)
        result["build_source_s"] = round(time.perf_counter() - started, 1)

        result["shard_1_worker"] = shard_step(work / "source", work / "shards-1", 1)
        result["shard_2_workers"] = shard_step(work / "source", work / "shards-2", 2)
        rerun = run_step(SHARD, str(work / "source"), str(work / "shards-2"), "2")
        result["rerun_unchanged"] = {k: rerun[k] for k in ("up_to_date", "shard_seconds", "peak_rss_mb")}
        build_source(work / "source", 1000, start=args.images)
        added = run_step(SHARD, str(work / "source"), str(work / "shards-2"), "2")
        full = result["shard_2_workers"]["shard_seconds"]
        result["rerun_after_1000_new"] = {"written": added["written"], "shard_seconds": added["shard_seconds"],
                                          "peak_rss_mb": added["peak_rss_mb"],
                                          "seconds_vs_full_run": round(added["shard_seconds"] / full, 4),
                                          "images_vs_full_run": round(1000 / args.images, 4)}

        shards = str(work / "shards-2")
        manifest = json.loads((work / "shards-2" / "manifest.json").read_text())
        train = manifest["splits"]["train"]["count"]
        ranks = parallel(TRAIN_LOADER, [[shards, str(r), str(train // 2)] for r in (0, 1)])
        result["train_loader_2_ranks"] = {"images_per_rank": train // 2,
                                          "img_s_per_rank": [r["img_s"] for r in ranks],
                                          "peak_rss_mb": [r["peak_rss_mb"] for r in ranks]}
        evals = parallel(EVAL_LOADER, [[shards, str(r), str(work / f"eval-keys-{r}.txt")] for r in (0, 1)])
        keys = [k for r in (0, 1) for k in (work / f"eval-keys-{r}.txt").read_text().split("\n") if k]
        test = manifest["splits"]["test"]["count"]
        result["eval_2_ranks_x_2_workers"] = {"test_images": test, "seen": len(keys), "distinct": len(set(keys)),
                                              "exactly_once": len(keys) == len(set(keys)) == test,
                                              "peak_rss_mb": [r["peak_rss_mb"] for r in evals]}

        tenth = max(1000, args.images // 10)
        build_source(work / "source-tenth", tenth)
        result["shard_2_workers_at_a_tenth"] = {"images": tenth, **shard_step(work / "source-tenth",
                                                                               work / "shards-tenth", 2)}
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    result["bench_s"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime)
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
