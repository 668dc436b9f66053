"""The in-memory training stream: a rank's share of the train split as one uint8 tensor on a device.

For data sets that fit (CelebA-64 train is about 2 GB), batches are gathered by index on the device itself,
so a GPU never waits for the input pipeline. Like the shard stream it yields (keys, uint8 [B, 3, H, W]) and
is seeded from (seed, rank, start step), so resumed runs replay the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from vae_runtime.errors import BadInput
from pipeline.loader import read_verified
from pipeline.manifest import split_shards


def stream_seed(seed: int, rank: int, step: int) -> int:
    """One seed for what a rank does from `step` on (noise and in-memory batch order)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


class MemoryStream:
    def __init__(self, shards: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu"):
        refs = split_shards(shards, "train")
        refs = refs[rank::world_size] if len(refs) >= world_size else refs
        keys, pixels = [], []
        for ref in refs:
            data, index = read_verified(ref, meta=False)
            keys += index.keys
            pixels.append(index.pixels(data))
        if len(keys) < batch_size:  # also an empty split: nothing to train on
            raise BadInput(f"shards {shards}: the train split gives this process {len(keys)} images, fewer than a "
                           f"batch ({batch_size}); lower data.batch_size or shard more images")
        self.keys = np.array(keys, dtype=object)
        self.pixels = torch.from_numpy(np.concatenate(pixels)).to(device)  # [N, H, W, 3] uint8
        self.batch_size, self.seed, self.rank = batch_size, seed, rank

    def batches(self, start_step: int):
        """Endless (keys, uint8 [B, 3, H, W] on the device): shuffled epochs without replacement."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, start_step))
        n, b = len(self.keys), self.batch_size
        while True:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n - b + 1, b):
                picks = order[i:i + b]
                yield self.keys[picks.numpy()].tolist(), self.pixels[picks.to(self.pixels.device)].permute(0, 3, 1, 2)
