"""Streaming shards back into training and evaluation, on one process or many ranks.

- Training (`train_loader`): resampled shards (each rank its own subset when there are at least as many
  shards as ranks), a shuffle buffer, batches (keys, uint8 [B, 3, H, W]); endless, so every rank yields the same
  number of batches; seeded from (seed, rank, worker, start_step) so a run that restarts its stream at
  `start_step` continues deterministically.
- Evaluation (`eval_loader`): every sample of a split exactly once across all ranks x workers: the global
  sample range is cut into equal contiguous pieces using the manifest's per-shard counts, whatever the
  number of shards. Batches are (keys, uint8 [B, 3, H, W], metas).

Shards are local paths or fsspec URLs (s3://, gs://, http://). Never pass these loaders through
`accelerator.prepare`: they are already split by rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.records import iter_samples
from pipeline.storage import join, read_bytes
from pipeline.shard import MANIFEST
from vae.errors import BadInput


@dataclass(frozen=True)
class ShardRef:
    url: str
    count: int


def load_manifest(shards: str) -> dict:
    try:
        manifest = json.loads(read_bytes(join(shards, MANIFEST)))
    except FileNotFoundError:
        raise BadInput(f"shards {shards}: no {MANIFEST} (run `vae data shard` first)") from None
    return manifest


def split_shards(shards: str, split: str, manifest: dict | None = None) -> list[ShardRef]:
    manifest = manifest or load_manifest(shards)
    if split not in manifest["splits"]:
        raise BadInput(f"shards {shards}: no split {split!r} in the manifest")
    return [ShardRef(join(shards, split, rec["name"]), rec["count"])
            for rec in manifest["splits"][split]["shards"] if rec["count"] > 0]


def _to_batch(pixels: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)


def _consumer() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """Endless shuffled batches from resampled shards, for one rank."""

    def __init__(self, shards: list[ShardRef], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, shuffle_buffer: int = 2000):
        if not shards:
            raise BadInput("training split has no shards")
        # Ranks resample disjoint subsets of the shards when there are enough of them.
        self.shards = shards[rank::world_size] if len(shards) >= world_size else shards
        self.batch_size = batch_size
        self.seed, self.rank, self.start_step, self.shuffle_buffer = seed, rank, start_step, shuffle_buffer

    def __iter__(self):
        worker, _ = _consumer()
        rng = np.random.default_rng([self.seed, self.rank, worker, self.start_step])
        buffer: list[tuple[str, np.ndarray]] = []
        total = sum(s.count for s in self.shards)
        target = max(self.batch_size, min(self.shuffle_buffer, total))
        weights = np.array([s.count for s in self.shards], dtype=np.float64)
        weights /= weights.sum()
        while True:
            while len(buffer) < target:
                ref = self.shards[rng.choice(len(self.shards), p=weights)]
                buffer.extend((key, pixels) for key, pixels, _ in iter_samples(read_bytes(ref.url)))
            picks = []
            for _ in range(self.batch_size):  # draw without replacement from the buffer
                i = int(rng.integers(len(buffer)))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                picks.append(buffer.pop())
            yield [key for key, _ in picks], _to_batch([pixels for _, pixels in picks])


def partition(total: int, parts: int, index: int) -> tuple[int, int]:
    """The [start, stop) piece `index` of `parts` near-equal contiguous pieces of range(total)."""
    return total * index // parts, total * (index + 1) // parts


class EvalStream(IterableDataset):
    """Each sample of a split exactly once across ranks x workers, in batches."""

    def __init__(self, shards: list[ShardRef], batch_size: int, rank: int = 0, world_size: int = 1):
        self.shards, self.batch_size, self.rank, self.world_size = shards, batch_size, rank, world_size

    def __iter__(self):
        worker, workers = _consumer()
        total = sum(s.count for s in self.shards)
        start, stop = partition(total, self.world_size * workers, self.rank * workers + worker)
        keys, pixels, metas = [], [], []
        offset = 0
        for ref in self.shards:
            lo, hi = offset, offset + ref.count
            offset = hi
            if hi <= start or lo >= stop:
                continue
            for i, (key, px, meta) in enumerate(iter_samples(read_bytes(ref.url))):
                if start <= lo + i < stop:
                    keys.append(key)
                    pixels.append(px)
                    metas.append(json.loads(bytes(meta)) if meta is not None else {})
                    if len(keys) == self.batch_size:
                        yield keys, _to_batch(pixels), metas
                        keys, pixels, metas = [], [], []
        if keys:
            yield keys, _to_batch(pixels), metas


def train_loader(shards: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, num_workers: int = 0, shuffle_buffer: int = 2000) -> DataLoader:
    stream = TrainStream(split_shards(shards, "train"), batch_size, seed, rank, world_size, start_step,
                         shuffle_buffer)
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def eval_loader(shards: str, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0) -> DataLoader:
    stream = EvalStream(split_shards(shards, split), batch_size, rank, world_size)
    return DataLoader(stream, batch_size=None, num_workers=num_workers)
