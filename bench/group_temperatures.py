"""Benchmark: prior samples of a trained hierarchical run with a temperature per latent side.

Scales the whitened prior noise of each latent side by its own temperature (the groups at 32x32 at 0.5 and the
others at 1, and so on) and prints one JSON line per profile with the valid split's download-free sample figures
(KID, precision, recall, density, coverage, SWD against as many valid images, as `vae eval` measures them: the
same draws, features and references for every profile), then writes each profile's first 64 samples as a grid.

It answers two questions: whether sampling fine groups cooler than coarse ones makes better samples (VDVAE and
NVAE show samples at reduced temperatures), and which sides a model uses at all: a side whose temperature changes
nothing carries no information (its posteriors sit on the prior).

    .venv/bin/python bench/group_temperatures.py --run RUN --shards SHARDS [--images 780] [--grids DIR]
                                                 [--profiles "16:0.6;32:0.5;8:0.8,16:0.6,32:0.4"]

A profile lists SIDE:TEMPERATURE pairs (temperatures above 1 too); sides it leaves out sample at 1. The all-ones profile is always measured
first, as the reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchkit import cpu_description

DEFAULT_PROFILES = "32:0.5;16:0.6;8:0.7;16:0.8,32:0.6;16:0.6,32:0.3;8:0.8,16:0.6,32:0.4;4:0.8,8:0.8,16:0.8,32:0.8"


def parse_profiles(text: str) -> list[dict[int, float]]:
    profiles = [{}]
    for item in filter(None, (p.strip() for p in text.split(";"))):
        profiles.append({int(side): float(t) for side, t in (pair.split(":") for pair in item.split(","))})
    return profiles


def noise_scale(model, profile: dict[int, float]):
    """A [latent_dim] tensor: each latent group's slice of the flat noise (top group first, as the model splits it)
    holds the temperature of the group's side, 1 where the profile names none."""
    import torch

    sides = [side for _, side, _ in model.group_shapes]
    unknown = sorted(set(profile) - set(sides))
    if unknown:
        raise SystemExit(f"--profiles: sides {unknown} are not among the model's latent sides {sorted(set(sides))}")
    return torch.cat([torch.full((channels * side * side,), float(profile.get(side, 1.0)))
                      for channels, side, _ in model.group_shapes])


def main() -> None:
    import numpy as np
    import torch

    from pipeline.manifest import load_manifest
    from vae.core.objectives import to_unit
    from vae.core.run import Run
    from vae.evaluation import sample_metrics as sm
    from vae.evaluation.sample_quality import SAMPLE_SEED, FeatureSpaces, collect_images, compare
    from vae_runtime.grid import label, make_grid, write_png

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--images", type=int, default=780)
    parser.add_argument("--profiles", default=DEFAULT_PROFILES)
    parser.add_argument("--grids", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = Run(args.run).model().eval()
    if not hasattr(model, "group_shapes"):
        raise SystemExit(f"--run {args.run}: not a hierarchical model (no latent groups)")
    manifest = load_manifest(args.shards)
    heldout, keys = collect_images(args.shards, "valid", args.images, manifest, 64)
    train, _ = collect_images(args.shards, "train", len(heldout), manifest, 64, exclude=set(keys))
    n = min(len(heldout), len(train))
    heldout = to_unit(heldout[:n]).float()
    spaces = FeatureSpaces(torch.device("cpu"))
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    heldout_features = spaces.embed(heldout)
    reference = sm.SwdReference(heldout, n, generator)
    noise = torch.randn((n, model.latent_dim), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    for profile in parse_profiles(args.profiles):
        scale = noise_scale(model, profile)
        with torch.no_grad():
            images = torch.cat([model.decode_mean(noise[i:i + 64] * scale).float() for i in range(0, n, 64)])
        figures = compare(reference, heldout_features, images, spaces.embed(images), generator)
        name = ",".join(f"{side}:{t:g}" for side, t in sorted(profile.items())) or "all 1"
        print(json.dumps({"run": str(args.run), "profile": name, "images": n, **cpu_description(),
                          **{k: [round(v["value"], 5), round(v["stderr"] or 0.0, 5)]
                             for k, v in figures.items() if isinstance(v, dict) and "value" in v}}), flush=True)
        if args.grids is not None:
            args.grids.mkdir(parents=True, exist_ok=True)
            picture = (images[:64].permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            stem = name.replace(":", "t").replace(",", "-").replace(" ", "")
            write_png(args.grids / f"{args.run.name}-{stem}.png", label(make_grid(picture), name))


if __name__ == "__main__":
    main()
