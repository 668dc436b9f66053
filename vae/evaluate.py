"""Evaluation: the true bounds on a split (ELBO, IWAE, bits/dim, active units) and picture grids.

Writes `RUN_DIR/eval/metrics.json` (SPEC.md's metrics contract) and PNG grids listed in it. Evaluation always
reports the true bound (beta = 1, no free bits) with the EMA weights. Per-image sums and counts are reduced
across ranks when `torch.distributed` is initialised, so every image counts exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.loader import eval_loader
from vae.atomic import atomic_write_json
from vae.checkpoint import load_trained
from vae.config import config_hash
from vae.grid import make_grid, write_png
from vae.objectives import bits_per_dim, gaussian_kl, iwae_bound, to_unit

ACTIVE_UNIT_THRESHOLD = 0.01


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


@torch.no_grad()
def bound_sums(model, loader, k: int, k_chunk: int, seed: int = 0) -> tuple[dict, list]:
    """Sums over a split's images of the ELBO parts and the IWAE bound, and the first batch's images."""
    generator = torch.Generator().manual_seed(seed)
    d = model.latent_dim
    sums = torch.zeros(5 + 2 * d, dtype=torch.float64)  # n, recon, kl, iwae, iwae^2, mu (d), mu^2 (d)
    first = None
    for keys, x, metas in loader:
        if first is None:
            first = (x[:16].clone(), keys[:16])
        mu, logvar = model.encode(to_unit(x))
        mu, logvar = mu.float(), logvar.float()
        eps = torch.randn(mu.shape, generator=generator)
        params = model.decode(mu + torch.exp(0.5 * logvar) * eps)
        recon = model.likelihood.log_prob(params, x)
        kl = gaussian_kl(mu, logvar).sum(1)
        iwae = iwae_bound(model, x, k, k_chunk, generator)
        sums[0] += x.shape[0]
        sums[1] += recon.double().sum()
        sums[2] += kl.double().sum()
        sums[3] += iwae.double().sum()
        sums[4] += iwae.double().pow(2).sum()
        sums[5:5 + d] += mu.double().sum(0)
        sums[5 + d:] += mu.double().pow(2).sum(0)
    sums = _all_reduce(sums)
    return {"n": int(sums[0]), "elbo": sums[1] - sums[2], "recon": sums[1], "kl": sums[2], "iwae": sums[3],
            "iwae_sq": sums[4], "mu": sums[5:5 + d], "mu_sq": sums[5 + d:]}, first


def metrics_from_sums(s: dict, dims: int) -> dict:
    n = s["n"]
    if n == 0:
        raise ValueError("the split holds no images")
    iwae = float(s["iwae"] / n)
    var = max(0.0, float(s["iwae_sq"] / n) - iwae * iwae) * n / max(1, n - 1)
    mu_var = s["mu_sq"] / n - (s["mu"] / n) ** 2
    elbo = float(s["elbo"] / n)
    return {"n_images": n, "elbo_nats": elbo, "recon_nats": float(s["recon"] / n),
            "kl_nats": float(s["kl"] / n), "iwae_nats": iwae, "iwae_stderr_nats": math.sqrt(var / n),
            "elbo_bpd": bits_per_dim(elbo, dims), "nll_bpd": bits_per_dim(iwae, dims),
            "active_units": int((mu_var > ACTIVE_UNIT_THRESHOLD).sum())}


@torch.no_grad()
def write_grids(model, first_images: torch.Tensor, out: Path, seed: int = 0) -> dict[str, str]:
    """Reconstructions beside inputs, samples from the prior, interpolations; returns {name: file}."""
    generator = torch.Generator().manual_seed(seed)
    x = first_images
    mu, _ = model.encode(to_unit(x))
    recon = model.decode_mean(mu)
    pairs = torch.stack([to_unit(x), recon], dim=1).flatten(0, 1)  # input, reconstruction, ...
    samples = model.decode_mean(torch.randn((64, model.latent_dim), generator=generator))
    a, b = mu[: min(4, len(mu))], mu.roll(1, 0)[: min(4, len(mu))]
    steps = torch.linspace(0, 1, 8).view(1, 8, 1)
    path = (a.unsqueeze(1) * (1 - steps) + b.unsqueeze(1) * steps).flatten(0, 1)
    interpolations = model.decode_mean(path)
    files = {}
    for name, images, ncols in (("reconstructions", pairs, 8), ("samples", samples, 8),
                                ("interpolations", interpolations, 8)):
        files[name] = write_png(out / f"{name}.png", make_grid(images.numpy(), ncols))
    return {k: Path(v).name for k, v in files.items()}


def evaluate(run_dir: str | Path, split: str | None = None, k: int | None = None,
             shards: str | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Evaluate a run's EMA model on a split; writes `eval/metrics.json` (main rank) and returns it."""
    run_dir = Path(run_dir)
    model, cfg, step = load_trained(run_dir)
    split = split or cfg.eval.split
    k = k or cfg.eval.k
    loader = eval_loader(shards or cfg.data.shards, split, cfg.eval.batch_size, rank, world_size)
    sums, first = bound_sums(model, loader, k, cfg.eval.k_chunk, seed=cfg.train.seed + rank)
    dims = 3 * cfg.model.image_size ** 2
    metrics = {"split": split, "k": k, **metrics_from_sums(sums, dims),
               "likelihood": cfg.model.likelihood, "likelihood_is_density": model.likelihood.is_density,
               "world_size": world_size, "config_hash": config_hash(cfg), "model_version": f"{run_dir.name}@{step}", "model_step": step,
               "run": str(run_dir)}
    if rank == 0:
        out = run_dir / "eval"
        metrics["images"] = write_grids(model, first[0], out, seed=cfg.train.seed) if first else {}
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


def load_metrics(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "eval" / "metrics.json").read_text())



def main(argv: list[str] | None = None) -> None:
    """Entry point for `accelerate launch -m vae.evaluate --run RUN [...]` (`vae eval --num-processes N`)."""
    import argparse

    import torch.distributed
    from accelerate import Accelerator

    parser = argparse.ArgumentParser(prog="vae.evaluate")
    parser.add_argument("--run", required=True)
    parser.add_argument("--split", default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--shards", default=None)
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # sets up the process group (gloo on CPU)
    evaluate(args.run, split=args.split, k=args.k, shards=args.shards,
             rank=accelerator.process_index, world_size=accelerator.num_processes)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
