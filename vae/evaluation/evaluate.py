"""Evaluation: the true bounds on a split (ELBO, IWAE, bits/dim, active units) and picture grids.

Writes `RUN_DIR/eval/metrics.json` (SPEC.md's metrics contract) and PNG grids listed in it. Evaluation always
reports the true bound (beta = 1, no free bits) with the EMA weights. Per-image sums and counts are reduced
across ranks when `torch.distributed` is initialised, so every image counts exactly once.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vae_runtime.atomic import atomic_write_json
from vae_runtime.errors import BadInput, ConfigError, VaeError
from vae_runtime.grid import label, make_grid, write_png
from pipeline.loader import eval_loader
from pipeline.manifest import load_manifest, require_image_size, split_fingerprint
from vae.core.checkpoint import weights_digest
from vae.core.distributed import end_process_group
from vae.core.config import MAX_K, MAX_SAMPLE_IMAGES, check_temperatures, config_hash
from vae.core.run import Run
from vae.evaluation.features import resolve_weights
from vae.evaluation.sample_quality import sample_quality
from vae.core.objectives import ImageNoise, bits_per_dim, elbo_terms, image_dims, iwae_bound, to_unit

ACTIVE_UNIT_THRESHOLD = 0.01
ATTRIBUTE_DIRECTIONS = ("Smiling", "Eyeglasses", "Male", "Blond_Hair")  # CelebA attributes to picture


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op on one process); NCCL needs the tensor on the GPU, gloo on the CPU."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            on_gpu = values.cuda()
            torch.distributed.all_reduce(on_gpu)
            return on_gpu.cpu()
        torch.distributed.all_reduce(values)
    return values


@torch.no_grad()
def bound_sums(model, loader, k: int, k_chunk: int, seed: int = 0, max_images: int | None = None,
               progress: bool = False, total: int | None = None) -> tuple[dict, tuple | None]:
    """Sums over a split's images (reduced across ranks) and the first batch's images.

    Sums: n, recon, kl, iwae, iwae^2, mu and mu^2 per latent dimension, and per known attribute the sum
    of mu and the count over images with (`pos`) and without (`neg`) it. Each image's noise is its own
    (`ImageNoise`, seeded by `seed` and its key), so the sums do not depend on batches or the number of ranks.
    """
    d = model.latent_dim
    zero = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    sums = {"n": zero(1), "recon": zero(1), "kl": zero(1), "iwae": zero(1), "iwae_sq": zero(1),
            "mu": zero(d), "mu_sq": zero(d), "attr_mu": zero(len(ATTRIBUTE_DIRECTIONS), 2, d),
            "attr_n": zero(len(ATTRIBUTE_DIRECTIONS), 2)}
    # shown on a terminal only (disable=None), and erased when it ends or an error ends it
    bar = tqdm(total=total, unit="img", desc=f"IWAE K={k}", disable=None if progress else True, leave=False,
               file=sys.stderr, dynamic_ncols=True)
    with bar:
        first = _accumulate(model, loader, k, k_chunk, seed, sums, max_images, bar)
    sums = {name: _all_reduce(value) for name, value in sums.items()}
    return sums, first


def _accumulate(model, loader, k: int, k_chunk: int, seed: int, sums: dict, max_images: int | None, bar):
    """Add each batch's bounds and codes to `sums`; returns the first batch's images and keys."""
    device, d, first = next(model.parameters()).device, model.latent_dim, None
    for keys, x, metas in loader:
        if max_images is not None:  # a fixed subset (the first images of the split), e.g. for benchmarks
            room = max_images - int(sums["n"])
            if room <= 0:
                break
            keys, x, metas = keys[:room], x[:room], metas[:room]
        if first is None:
            first = (x[:16].clone(), keys[:16])
        x = x.to(device, non_blocking=True)
        noise = ImageNoise(seed, keys, device)
        terms = elbo_terms(model, x, noise.normal(1, d)[0])  # the training objective's own pass, for every model
        recon, kl, mu = terms["recon"], terms["kl"], terms["mu"]
        iwae = iwae_bound(model, x, k, k_chunk, noise)
        sums["n"] += x.shape[0]
        sums["recon"] += recon.double().sum().cpu()
        sums["kl"] += kl.double().sum().cpu()
        sums["iwae"] += iwae.double().sum().cpu()
        sums["iwae_sq"] += iwae.double().pow(2).sum().cpu()
        mu = mu.cpu()
        sums["mu"] += mu.double().sum(0)
        sums["mu_sq"] += mu.double().pow(2).sum(0)
        for a, name in enumerate(ATTRIBUTE_DIRECTIONS):
            values = torch.tensor([m.get("attrs", {}).get(name, 0) for m in metas])
            for side, sign in enumerate((1, -1)):
                chosen = values == sign
                sums["attr_mu"][a, side] += mu[chosen].double().sum(0)
                sums["attr_n"][a, side] += chosen.sum()
        bar.update(x.shape[0])
    return first


def metrics_from_sums(s: dict, dims: int) -> dict:
    n = int(s["n"])
    if n == 0:
        raise ValueError("the split holds no images")
    iwae = float(s["iwae"] / n)
    var = max(0.0, float(s["iwae_sq"] / n) - iwae * iwae) * n / max(1, n - 1)
    mu_var = s["mu_sq"] / n - (s["mu"] / n) ** 2
    elbo = float((s["recon"] - s["kl"]) / n)
    return {"n_images": n, "elbo_nats": elbo, "recon_nats": float(s["recon"] / n),
            "kl_nats": float(s["kl"] / n), "iwae_nats": iwae, "iwae_stderr_nats": math.sqrt(var / n),
            "elbo_bpd": bits_per_dim(elbo, dims), "nll_bpd": bits_per_dim(iwae, dims),
            "active_units": int((mu_var > ACTIVE_UNIT_THRESHOLD).sum())}


def attribute_directions(sums: dict, min_images: int = 2) -> dict[str, torch.Tensor]:
    """Mean latent of images with an attribute minus without, for attributes seen both ways."""
    out = {}
    for a, name in enumerate(ATTRIBUTE_DIRECTIONS):
        n_pos, n_neg = (float(v) for v in sums["attr_n"][a])
        if n_pos >= min_images and n_neg >= min_images:
            out[name] = sums["attr_mu"][a, 0] / n_pos - sums["attr_mu"][a, 1] / n_neg
    return out


@torch.no_grad()
def write_grids(model, first_images: torch.Tensor, out: Path, seed: int = 0,
                directions: dict[str, torch.Tensor] | None = None,
                tempered: dict[float, torch.Tensor] | None = None) -> dict[str, str]:
    """Reconstructions beside inputs, prior samples, interpolations and attribute directions, and the first 64
    prior samples the sample metrics drew at each temperature (`samples-t0.8.png`, labelled): {name: file}."""
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
    grids = [("reconstructions", pairs, 8), ("samples", samples, 8), ("interpolations", interpolations, 8)]
    for name, direction in (directions or {}).items():
        # each row: one test image moved along the attribute's direction, from -1.5 to +1.5 times it
        scales = torch.linspace(-1.5, 1.5, 7).view(1, 7, 1)
        base = mu[: min(6, len(mu))].unsqueeze(1)
        moved = (base + scales * direction.float().view(1, 1, -1)).flatten(0, 1)
        grids.append((f"attribute-{name}", model.decode_mean(moved), 7))
    files = {}
    for name, images, ncols in grids:
        files[name] = write_png(out / f"{name}.png", make_grid(images.numpy(), ncols))
    for t, images in (tempered or {}).items():
        picture = label(make_grid(images.numpy(), 8), f"temperature {t:g}")
        files[f"samples-t{t:g}"] = write_png(out / f"samples-t{t:g}.png", picture)
    return {k: Path(v).name for k, v in files.items()}


class EmptySplit(BadInput):
    """The split to evaluate holds no images."""


def require_images(shards: str, split: str, manifest: dict) -> None:
    if not int((manifest["splits"].get(split) or {}).get("count") or 0):
        raise EmptySplit(f"shards {shards}: the {split} split holds no images (nothing to evaluate it on)")


def require_finite_weights(model, run_dir: str | Path, step: int) -> None:
    """A diverged run (NaN or infinite weights) fails in one line, rather than measuring NaN bounds that look
    like results (exit 0) and could be exported or compared."""
    bad = [name for name, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise VaeError(f"run {run_dir}: its weights at step {step} are not finite ({len(bad)} tensors, e.g. "
                       f"{bad[0]}): the training diverged, nothing to evaluate (train it again, or from an earlier "
                       "checkpoint)")


def checked_inputs(run_dir: str | Path, split: str | None = None, k: int | None = None, shards: str | None = None,
                   step: int | None = None):
    """(model, cfg, step, split, k, shards, manifest) after the checks `evaluate` makes before any work, on the
    checkpoint at `step` (default the newest); run once before launching several processes too, so bad input is
    one line rather than a traceback per rank, and the ranks are given the step it read."""
    run = Run(run_dir, step)
    model, cfg, step = run.model(), run.config, run.step
    require_finite_weights(model, run_dir, step)
    split, k, shards = split or cfg.eval.split, k or cfg.eval.k, shards or cfg.data.shards
    if not 1 <= k <= MAX_K:
        raise BadInput(f"k: must be in [1, {MAX_K}], got {k}")
    manifest = require_image_size(shards, cfg.model.image_size)
    require_images(shards, split, manifest)
    return model, cfg, step, split, k, shards, manifest


def reusable_metrics(run_dir: str | Path, split: str | None = None, k: int | None = None) -> dict | None:
    """`RUN_DIR/eval/metrics.json` when it measured the run's current weights on the split's current images (its
    fingerprint), at K, without an image cap; else None (evaluate again)."""
    run = Run(run_dir)
    try:
        metrics = run.metrics
    except (OSError, BadInput):  # unreadable or damaged: evaluate again
        return None
    if metrics is None or metrics.get("max_images") is not None:
        return None
    model, cfg = run.model(), run.config
    split, k = split or cfg.eval.split, k or cfg.eval.k
    try:
        fingerprint = split_fingerprint(load_manifest(cfg.data.shards), split)
    except (BadInput, OSError):
        return None
    same = (metrics.get("split") == split and metrics.get("k") == k and metrics.get("split_fingerprint") == fingerprint
            and metrics.get("weights_sha256") == weights_digest(model) and metrics.get("samples") is not None)
    return metrics if same else None


def evaluate(run_dir: str | Path, split: str | None = None, k: int | None = None,
             shards: str | None = None, rank: int = 0, world_size: int = 1, max_images: int | None = None,
             out: str | Path | None = None, grids: bool = True, progress: bool = False, samples: bool = True,
             temperatures: list[float] | None = None, sample_images: int | None = None,
             inception_weights: str | None = None, step: int | None = None) -> dict:
    """Evaluate a run's EMA model on a split; writes `metrics.json` into `out` (default `RUN_DIR/eval`, main
    rank) and returns it. The checkpoint read is the one at `step` (default the newest; several ranks are given
    their launcher's), and `model_step` names it. The metrics say which images (the split's fingerprint), which
    weights (their sha256) and which K they measured, so promotion compares only like with like. With `samples` the main rank
    adds the sample-quality figures (`sample_quality.py`) at `temperatures` (default the config's) over
    `sample_images` images, with FID when `inception_weights` (or $VAE_INCEPTION_WEIGHTS, or the config's) is
    given; the weights file is checked before any evaluation."""
    run_dir = Path(run_dir)
    model, cfg, step, split, k, shards, manifest = checked_inputs(run_dir, split, k, shards, step)
    plan = sample_plan(cfg, temperatures, sample_images, inception_weights) if samples and rank == 0 else None
    weights = weights_digest(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # each rank on its own GPU
        torch.cuda.set_device(torch.cuda.current_device() if world_size == 1 else rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    model.to(device)
    fingerprint = split_fingerprint(manifest, split, max_images)
    loader = eval_loader(shards, split, cfg.eval.batch_size, rank, world_size, manifest=manifest)
    share = -(-int(manifest["splits"][split].get("count") or 0) // world_size)  # this rank's images, for the bar
    sums, first = bound_sums(model, loader, k, cfg.eval.k_chunk, seed=cfg.train.seed, max_images=max_images,
                             progress=progress and rank == 0, total=min(share, max_images or share) or None)
    dims = image_dims(cfg.model.image_size)
    metrics = {"split": split, "k": k, **metrics_from_sums(sums, dims),
               "likelihood": cfg.model.likelihood, "likelihood_is_density": model.likelihood.is_density,
               "world_size": world_size, "config_hash": config_hash(cfg), "model_version": f"{run_dir.name}@{step}",
               "model_step": step, "weights_sha256": weights, "run": str(run_dir),
               "split_fingerprint": fingerprint, "shards": str(shards), "image_size": cfg.model.image_size,
               "max_images": max_images}
    if rank == 0:
        out = Path(out) if out is not None else Run(run_dir).eval_dir
        directions = attribute_directions(sums)
        metrics["attribute_directions"] = sorted(directions)
        drawn = {}
        if plan is not None:
            metrics["samples"], drawn = sample_quality(
                model, shards, split, manifest, plan["temperatures"], plan["n_images"], cfg.eval.batch_size,
                inception=plan["inception"], fid_reason=plan["fid_reason"])
        model.cpu()
        metrics["images"] = write_grids(model, first[0], out, cfg.train.seed, directions, drawn) \
            if first and grids else {}
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


def check_sample_inputs(cfg, temperatures: list[float] | None, inception_weights: str | None) -> None:
    """The sample metrics' inputs checked without loading anything big (before launching several ranks)."""
    plan_settings(cfg, temperatures, None)
    path = resolve_weights(inception_weights, cfg.eval.inception_weights)
    if path:
        from vae.evaluation import inception  # torchvision's import is paid only where FID runs

        inception.check_weights(path)


NO_INCEPTION = ("no Inception weights given (vae eval --inception-weights PATH, $VAE_INCEPTION_WEIGHTS or "
                "eval.inception_weights; the file is pt_inception-2015-12-05-6726825d.pth, docs/model.md)")


def plan_settings(cfg, temperatures: list[float] | None, sample_images: int | None) -> tuple[list[float], int]:
    """The temperatures and image count of the sample metrics: the arguments, else the config's; checked."""
    try:
        temperatures = check_temperatures(cfg.eval.temperatures if temperatures is None else temperatures,
                                          "eval.temperatures")
    except ConfigError as err:
        raise BadInput(str(err)) from None
    n_images = cfg.eval.sample_images if sample_images is None else sample_images
    if not 2 <= n_images <= MAX_SAMPLE_IMAGES:
        raise BadInput(f"sample images: must be in [2, {MAX_SAMPLE_IMAGES}], got {n_images}")
    return temperatures, n_images


def sample_plan(cfg, temperatures: list[float] | None, sample_images: int | None, inception_weights: str | None
                ) -> dict:
    """What the sample metrics will measure, checked before any evaluation: temperatures, image count, and the
    FID Inception network loaded from a verified weights file (or why there is none)."""
    temperatures, n_images = plan_settings(cfg, temperatures, sample_images)
    path, network = resolve_weights(inception_weights, cfg.eval.inception_weights), None
    if path:
        from vae.evaluation import inception  # torchvision's import is paid only where FID runs

        network = inception.load_inception(path, device="cuda" if torch.cuda.is_available() else "cpu")
    return {"temperatures": temperatures, "n_images": n_images, "inception": network,
            "fid_reason": None if network is not None else NO_INCEPTION}


def main(argv: list[str] | None = None) -> None:
    """Entry point for `accelerate launch -m vae.evaluation.evaluate --run RUN [...]` (`vae eval --num-processes N`)."""
    import torch.distributed  # the launched entry point's own: the library path needs no process group
    from accelerate import Accelerator  # lazy: only the launched entry point runs under Accelerate

    parser = argparse.ArgumentParser(prog="vae.evaluation.evaluate")
    parser.add_argument("--run", required=True)
    parser.add_argument("--split", default=None)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--shards", default=None)
    parser.add_argument("--temperatures", default=None, help="comma-separated, as `vae eval --temperatures`")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--step", type=int, default=None, help="the checkpoint every rank reads (the launcher's)")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # sets up the process group (gloo on CPU)
    temperatures = [float(t) for t in args.temperatures.split(",")] if args.temperatures else None
    evaluate(args.run, split=args.split, k=args.k, shards=args.shards,
             rank=accelerator.process_index, world_size=accelerator.num_processes, temperatures=temperatures,
             inception_weights=args.inception_weights, step=args.step)
    accelerator.wait_for_everyone()
    end_process_group()


if __name__ == "__main__":
    main()
