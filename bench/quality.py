"""Benchmark: model quality at equal compute on the real CelebA sample.

Trains each named config for the same wall-clock budget (default 10 minutes, 2 threads) on the official-train
images of ../shared/data/celeba-sample (center crop 148, 64x64), then prints one JSON line per model with the
valid-partition ELBO and IWAE (K=100) in bits/dim, the same on (up to 780) training images, steps, images/s,
active units and the valid split's sample figures (KID, precision, recall, density, coverage and SWD of prior
samples at each temperature and of reconstructions, each with its standard error, beside the real-versus-real
floor: vae/evaluation/sample_quality.py), and a last line comparing each model with the plain baseline. The baseline is the plain conv VAE
the issue describes: 4 stride-2 convs 32-64-128-256, latent 128, factorized discretized logistic, Adam 1e-3 with
cosine decay, batch 64, float32, no EMA.

    .venv/bin/python bench/quality.py [--minutes 10] [--models conv-cpu,cpu,hierarchical] [--grids DIR]
                                      [--temperatures 0.6,0.8,1.0]

`--models` also takes config files, to compare a variant; `--grids` keeps each model's prior-sample grid.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchkit import REPO, SHARED_SAMPLE, cpu_description  # noqa: E402

MODELS = {
    "baseline": (None, ["model.channels=[32,64,128,256]", "model.latent_dim=128", "model.res_blocks=0",
                        "model.likelihood=discretized_logistic",
                        "train.lr=1e-3", "train.warmup_steps=0", "train.ema_decay=0", "data.batch_size=64",
                        "train.weight_decay=0"]),
    "default": (REPO / "configs" / "celeba64.yaml", []),
    "hierarchical": (REPO / "configs" / "celeba64-hier.yaml", []),
    "cpu": (REPO / "configs" / "celeba64-cpu.yaml", []),
    "conv-cpu": (REPO / "configs" / "celeba64-conv-cpu.yaml", []),
}


def model_spec(name: str) -> tuple[Path | None, list[str]]:
    """A named model, or any config file (a variant to compare: `--models baseline,my.yaml`)."""
    if name in MODELS:
        return MODELS[name]
    return Path(name), []


def run_model(name: str, minutes: float, shards: str, tmp: Path, k: int, train_images: int,
              grids: Path | None = None, temperatures: tuple[float, ...] = (1.0,)) -> dict:
    import torch

    from vae.core.config import load_config
    from vae.evaluation.evaluate import evaluate
    from vae.training.train import train

    config, overrides = model_spec(name)
    label = Path(name).stem if name not in MODELS else name
    common = [f"data.shards={shards}", "data.num_workers=0", "train.tensorboard=false", "train.log_every=20"]
    # A short probe sets the step count so the learning-rate schedule ends with the budget: its steady
    # windows (not the first, which holds start-up) give the step time; max_seconds still caps the run.
    probe = load_config(config, [*overrides, *common, f"run_dir={tmp / (label + '-probe')}", "train.steps=24",
                                 "train.checkpoint_every=24", "train.log_every=6"])
    train(probe, progress=False)
    records = [json.loads(line) for line in (tmp / (label + "-probe") / "train_log.jsonl").read_text().splitlines()]
    steps = planned_steps([r["images_per_s"] for r in records[1:]], minutes, probe.data.batch_size)
    cfg = load_config(config, [*overrides, *common, f"run_dir={tmp / label}", f"train.steps={steps}",
                               f"train.checkpoint_every={steps}", f"train.max_seconds={minutes * 60}"])
    started = time.time()
    train(cfg, progress=False)
    seconds = time.time() - started
    from vae.core.run import latest_checkpoint

    done = int(latest_checkpoint(tmp / label).stem.split("-")[1])  # steps reached within the budget
    if seconds < 0.9 * minutes * 60:
        print(f"{label}: trained {seconds:.0f} s of the {minutes * 60:.0f} s budget: the probe's step time was "
              f"off (a busy machine?); its figures are not at equal compute", file=sys.stderr)
    valid = evaluate(tmp / label, split="valid", k=k, temperatures=temperatures)
    if grids is not None:  # prior samples only: the other grids show CelebA images, which stay out of the repo
        grids.mkdir(parents=True, exist_ok=True)
        stem = Path(config).stem if config is not None else label  # celeba64-cpu-samples-t0.8.png in docs/quality
        for t in temperatures:
            shutil.copyfile(tmp / label / "eval" / valid["images"][f"samples-t{t:g}"],
                            grids / f"{stem}-samples-t{t:g}.png")
    train_metrics = evaluate(tmp / label, split="train", k=k, max_images=train_images, samples=False)
    return {"model": label, **cpu_description(), "minutes": minutes,
            "train_s": round(seconds, 1), "threads": torch.get_num_threads(),
            "steps": done,
            "planned_steps": steps, "images_per_s": round(done * cfg.data.batch_size / seconds, 1),
            "valid_elbo_bpd": round(valid["elbo_bpd"], 4), "valid_nll_bpd": round(valid["nll_bpd"], 4),
            "train_elbo_bpd": round(train_metrics["elbo_bpd"], 4), "train_nll_bpd": round(train_metrics["nll_bpd"], 4),
            "active_units": valid["active_units"], "k": k, "samples": sample_figures(valid["samples"])}


def planned_steps(window_images_per_s: list[float], minutes: float, batch_size: int) -> int:
    """Steps that fill the budget at the probe's speed: the median of its steady windows' images/s, so one slow
    window (a checkpoint write, another process) does not shrink the plan."""
    return max(20, int(minutes * 60 * statistics.median(window_images_per_s) / batch_size))


def sample_figures(samples: dict) -> dict:
    """The valid split's sample figures, rounded: the primary one (KID of prior samples at the best temperature) and
    its real-versus-real floor, then every download-free figure per temperature and for reconstructions."""
    def values(group: dict) -> dict:
        out = {name: [round(group[name]["value"], 5), round(group[name]["stderr"] or 0.0, 5)]
               for name in ("kid", "precision", "recall", "density", "coverage", "swd")}
        if "memorisation" in group:
            out["memorisation"] = [round(group["memorisation"][key], 4) for key in ("ratio_to_heldout",
                                                                                     "train_to_heldout")]
        return out

    primary = samples["primary"]
    return {"primary": [primary["metric"], primary["temperature"], round(primary["value"], 5),
                        round(primary["stderr"] or 0.0, 5)],
            "floor": values(samples["floor"]), "images": samples["n_heldout"], "features": samples["measure"],
            "prior": {t: values(group) for t, group in samples["prior"].items()},
            "reconstructions": values(samples["reconstructions"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--models", default="conv-cpu,cpu,hierarchical")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--train-images", type=int, default=780, help="training images evaluated")
    parser.add_argument("--grids", type=Path, default=None, help="copy each model's prior-sample grids here")
    parser.add_argument("--temperatures", default="0.6,0.8,1.0",
                        help="prior temperatures of the sample figures and grids (the best is the primary figure's)")
    args = parser.parse_args()
    if not SHARED_SAMPLE.is_dir():
        print(json.dumps({"bench": "quality", "skipped": f"no shared CelebA sample at {SHARED_SAMPLE}"}))
        return
    import torch

    from pipeline.shard import shard

    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS and not Path(n).is_file()]
    if unknown:
        raise SystemExit(f"--models: {unknown} are neither known models ({', '.join(MODELS)}) nor config files")
    labels = [n if n in MODELS else Path(n).stem for n in names]
    if len(set(labels)) != len(labels):  # each label names a run folder: a repeat would resume another's run
        raise SystemExit(f"--models: the names {labels} repeat; give config files distinct names")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        tmp = Path(tmp)
        shard(SHARED_SAMPLE, tmp / "shards", size=64, crop=148, workers=2, progress=False)
        for name in names:
            result = run_model(name, args.minutes, str(tmp / "shards"), tmp, args.k, args.train_images, args.grids,
                               tuple(float(t) for t in args.temperatures.split(",")))
            results[result["model"]] = result
            print(json.dumps({"bench": "quality", **result}), flush=True)
    if "baseline" in results:
        base = results["baseline"]["valid_nll_bpd"]
        print(json.dumps({"bench": "quality", "compare_to_baseline": {
            name: round(1 - r["valid_nll_bpd"] / base, 4) for name, r in results.items() if name != "baseline"},
            "target": 0.10}))


if __name__ == "__main__":
    main()
