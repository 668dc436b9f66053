"""Anomaly scores: per-image NLL in bits/dim from the IWAE bound, most anomalous first.

Works on shards (every split in the manifest) or on any image folder, CelebA folder or zip, through the
same preprocessing as the shards the run was trained on (`Run.crop`; the size is the model's).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from vae_runtime import storage
from vae_runtime.atomic import atomic_write_text
from vae_runtime.errors import BadInput, VaeError
from pipeline.images import image_batches
from pipeline.loader import eval_loader
from pipeline.manifest import load_manifest
from vae.core.run import Run
from vae.core.objectives import ImageNoise, bits_per_dim, image_dims, iwae_bound


class Ranking(list):
    """[(key, nll_bpd)] from most to least anomalous, and `step`: the checkpoint whose EMA weights scored them
    (read once: a run still training moves on, this ranking does not)."""

    def __init__(self, scores: list[tuple[str, float]], step: int):
        super().__init__(scores)
        self.step = step


class ScoreError(VaeError):
    """The model gave scores that rank nothing (NaN or infinite)."""


def writable_file(out: str | Path) -> None:
    """`out` names a file this process can write (its folder may not exist yet), else one line naming it."""
    out = Path(out)
    if out.is_dir():
        raise BadInput(f"--out {out}: is a folder; name the CSV file to write, such as {out / 'scores.csv'}")
    writable, folder = storage.creatable(out.parent)
    if not writable:
        raise BadInput(f"--out {out}: {folder} cannot be written here")


def _shard_batches(shards: str, batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    for split in load_manifest(shards)["splits"]:
        for keys, x, _ in eval_loader(shards, split, batch_size):
            yield keys, x


def _image_batches(source: str, crop: int, size: int, batch_size: int, skipped: list):
    for keys, pixels in image_batches(source, crop, size, batch_size, skipped):
        yield keys, torch.from_numpy(pixels).permute(0, 3, 1, 2)  # uint8 NCHW, as the shards' loader gives


@torch.no_grad()
def score(run_dir: str | Path, source: str, k: int = 100, out: str | Path | None = None,
          batch_size: int = 64, seed: int | None = None, progress: bool = False) -> Ranking:
    """[(key, nll_bpd)] sorted from most to least anomalous (a `Ranking`, which names the checkpoint step it
    read); written as CSV to `out` when given (checked before
    any image is scored). Scores that are not finite fail the run (ScoreError): no ranking is written. Each
    image's noise is seeded by `seed` (default: the run's `train.seed`, as `vae eval` draws it) and its key."""
    if out is not None:
        writable_file(out)
    run = Run(run_dir)
    model, cfg, step = run.model(), run.config, run.step
    seed = cfg.train.seed if seed is None else seed
    size = cfg.model.image_size
    dims = image_dims(size)
    skipped: list = []
    if (Path(source) / "manifest.json").exists() or "://" in str(source):
        batches = _shard_batches(str(source), batch_size)
    else:
        batches = _image_batches(source, run.crop, size, batch_size, skipped)
    scores = []
    # shown on a terminal only (disable=None), and erased when it ends or an error ends it
    with tqdm(unit="img", desc=f"scoring K={k}", disable=None if progress else True, leave=False, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for keys, x in batches:
            if x.shape[1:] != (3, size, size):
                raise BadInput(f"source {source}: images are {list(x.shape[1:])}, the model takes "
                               f"[3, {size}, {size}]")
            # each image's noise seeded by its key: its score does not depend on the images scored with it
            nll = bits_per_dim(iwae_bound(model, x, k, cfg.eval.k_chunk, ImageNoise(seed, keys)), dims)
            scores += zip(keys, nll.tolist())
            bar.update(len(keys))
    if not scores:
        raise BadInput(f"source {source}: no usable images")
    broken = [key for key, value in scores if not np.isfinite(value)]
    if broken:
        raise ScoreError(f"run {run_dir}: {len(broken)} of {len(scores)} scores are not finite (first: {broken[0]}): "
                         "the model's bound is broken on them; no ranking written")
    scores.sort(key=lambda item: (-item[1], item[0]))
    if out is not None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["key", "nll_bpd"])
        writer.writerows((key, f"{value:.6f}") for key, value in scores)
        atomic_write_text(out, buf.getvalue())
        if skipped:
            atomic_write_text(f"{out}.skipped.json", json.dumps(skipped, indent=1))
        else:  # an earlier run's list would describe images this run did not skip
            Path(f"{out}.skipped.json").unlink(missing_ok=True)
    return Ranking(scores, step)
