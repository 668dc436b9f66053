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

import hashlib
import json
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vae_runtime.errors import BadInput
from vae_runtime.storage import read_bytes
from pipeline.manifest import ShardRef, split_shards
from pipeline.records import index_shard

_VERIFIED: set[tuple[str, str]] = set()  # (url, sha256) whose bytes this process checked


def verify(ref: ShardRef, data: bytes) -> None:
    """The shard's bytes against the manifest's sha256, once per shard and process (training re-reads shards
    many times; bench/loader.py measures the cost). A mismatch is one line naming the shard."""
    if ref.sha256 is None or (ref.url, ref.sha256) in _VERIFIED:
        return
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise BadInput(f"shard {ref.url}: sha256 differs from the manifest's (damaged or altered); restore it, or "
                       "shard the source into a fresh folder (a re-run into this one keeps its shards)")
    _VERIFIED.add((ref.url, ref.sha256))


def read_verified(ref: ShardRef, meta: bool):
    """A shard's bytes (checked against the manifest) and index; a missing, altered or unreadable shard is one
    line naming it and, for damage, the offset."""
    try:
        data = read_bytes(ref.url)
    except FileNotFoundError:
        raise BadInput(f"shard {ref.url}: listed in the manifest but missing") from None
    verify(ref, data)
    return data, decode_shard(data, ref.url, meta)


def decode_shard(data: bytes, where: str, meta: bool = True):
    """The index of a shard's bytes (`pipeline.records.index_shard`); damage is one `BadInput` line naming the
    shard and the offset. The reader itself: no checksum here (see `verify`)."""
    try:
        return index_shard(data, meta)
    except ValueError as err:
        raise BadInput(f"shard {where}: unreadable ({err})") from None


def parse_meta(payload, where: str, key: str) -> dict:
    """A sample's `json` member as a dict; anything else is one `BadInput` line naming the shard and key."""
    if payload is None:
        return {}
    try:
        meta = json.loads(bytes(payload))
    except (ValueError, RecursionError) as err:
        raise BadInput(f"shard {where}: sample {key!r} has a json member that is not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise BadInput(f"shard {where}: sample {key!r} has a json member that is not an object")
    return meta


def _to_batch(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> a uint8 [B, 3, H, W] tensor sharing its memory (a view, no copy)."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


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
        counts = np.array([s.count for s in self.shards], dtype=np.int64)
        target = int(max(self.batch_size, min(self.shuffle_buffer, counts.sum())))
        weights = counts / counts.sum()
        buffer = _ShuffleBuffer(target + int(counts.max()))
        while True:
            while len(buffer) < target:
                ref = self.shards[rng.choice(len(self.shards), p=weights)]
                buffer.add(ref.url, *read_verified(ref, meta=False))
            keys, batch = buffer.draw(rng, self.batch_size)
            yield keys, batch.permute(0, 3, 1, 2)


class _ShuffleBuffer:
    """A shuffle buffer held in one uint8 array: a shard's pixels are copied straight from its bytes into
    free rows, a batch is drawn without replacement by index (one gather), and its rows become free.
    Each image is copied twice in all (shard bytes -> buffer -> batch), with no per-sample Python objects."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.pool: np.ndarray | None = None  # [capacity, nbytes] uint8, allocated at the first shard
        self.keys = np.empty(capacity, dtype=object)  # the key of the image in each row
        self.shape: tuple[int, ...] = ()
        self.occupied = np.empty(0, np.int64)  # rows holding images not yet drawn
        self.free = np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.occupied)

    def add(self, url: str, data: bytes, index) -> None:
        if self.pool is None:
            self.shape = (*index.shape,)
            self.pool = np.empty((self.capacity, index.nbytes), np.uint8)
            self.free = np.arange(self.capacity, dtype=np.int64)
        if index.shape != self.shape or index.dtype != np.uint8:
            raise BadInput(f"shard {url}: images of {index.shape} {index.dtype}, earlier shards {self.shape} uint8")
        n = len(index)
        if n > len(self.free):  # a shard bigger than the manifest said: grow
            extra = n - len(self.free)
            self.pool = np.concatenate([self.pool, np.empty((extra, self.pool.shape[1]), np.uint8)])
            self.keys = np.concatenate([self.keys, np.empty(extra, dtype=object)])
            self.free = np.concatenate([self.free, np.arange(self.capacity, self.capacity + extra)])
            self.capacity += extra
        rows, self.free = self.free[:n], self.free[n:]
        self.pool[rows] = index.rows(data)
        self.keys[rows] = index.keys
        self.occupied = np.concatenate([self.occupied, rows])

    def draw(self, rng: np.random.Generator, batch_size: int) -> tuple[list[str], torch.Tensor]:
        """(keys, uint8 [batch_size, H, W, C]), drawn without replacement."""
        picks = rng.choice(len(self.occupied), batch_size, replace=False)
        rows = self.occupied[picks]
        keep = np.ones(len(self.occupied), bool)
        keep[picks] = False
        self.occupied = self.occupied[keep]
        self.free = np.concatenate([self.free, rows])
        batch = torch.empty((batch_size, self.pool.shape[1]), dtype=torch.uint8)
        if get_worker_info() is not None:
            # in a DataLoader worker, gather straight into shared memory: the batch then reaches the main
            # process without the extra copy DataLoader would make to share it
            batch.share_memory_()
        np.take(self.pool, rows, axis=0, out=batch.numpy())
        return self.keys[rows].tolist(), batch.view(batch_size, *self.shape)


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
        pending: list[tuple] = []
        pending_size = 0
        offset = 0
        for ref in self.shards:
            lo, hi = offset, offset + ref.count
            offset = hi
            if hi <= start or lo >= stop:
                continue
            data, index = read_verified(ref, meta=True)
            keys = index.keys
            metas = [parse_meta(m, ref.url, k) for k, m in zip(keys, index.metas)]
            rows = index.rows(data)  # a view over the shard's bytes: only this consumer's rows get copied
            if index.dtype != np.uint8:
                raise BadInput(f"shard {ref.url}: pixels are {index.dtype}, expected uint8")
            if len(keys) != ref.count:
                raise BadInput(f"shard {ref.url}: holds {len(keys)} samples, the manifest says {ref.count}")
            a, b = max(start - lo, 0), min(stop - lo, ref.count)
            while a < b:
                take = min(self.batch_size - pending_size, b - a)
                pending.append((keys[a:a + take], rows[a:a + take], metas[a:a + take], index.shape))
                pending_size += take
                a += take
                if pending_size == self.batch_size:
                    yield _join(pending)
                    pending, pending_size = [], 0
        if pending:
            yield _join(pending)


def _join(pieces: list[tuple]) -> tuple[list[str], torch.Tensor, list[dict]]:
    """(keys, uint8 [B, 3, H, W], metas) from pieces of shards; one copy of the pixels, into the batch."""
    keys = [k for piece in pieces for k in piece[0]]
    if any(piece[3] != pieces[0][3] for piece in pieces):
        raise BadInput(f"shards hold images of different shapes: {sorted({piece[3] for piece in pieces})}")
    pixels = np.concatenate([piece[1] for piece in pieces]).reshape(len(keys), *pieces[0][3])
    metas = [m for piece in pieces for m in piece[2]]
    return keys, _to_batch(pixels), metas


def train_loader(shards: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, num_workers: int = 0, shuffle_buffer: int = 2000) -> DataLoader:
    stream = TrainStream(split_shards(shards, "train"), batch_size, seed, rank, world_size, start_step,
                         shuffle_buffer)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, worker_init_fn=_ignore_sigterm,
                      persistent_workers=False, prefetch_factor=4 if num_workers else None)


def _ignore_sigterm(_worker: int) -> None:
    """Loader workers leave SIGTERM to the trainer: a launcher that signals the whole process group would
    otherwise kill them first, and the trainer could not take its checkpoint before stopping."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def eval_loader(shards: str, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, manifest: dict | None = None) -> DataLoader:
    """`manifest`: the shards' manifest when the caller has read it already."""
    stream = EvalStream(split_shards(shards, split, manifest), batch_size, rank, world_size)
    # batches are already (keys, tensor, metas): skip DataLoader's per-element conversion walk over metas
    return DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_as_is)


def _as_is(batch):
    return batch
