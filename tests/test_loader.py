"""Loaders: evaluation visits every sample exactly once across ranks x workers; training streams are
endless, shuffled, deterministic in (seed, rank, start step) and disjoint across ranks."""

import itertools

import pytest
import torch

from pipeline.loader import TrainStream, eval_loader, partition, train_loader
from pipeline.manifest import split_shards
from pipeline.records import iter_samples


def _all_keys(shards, split):
    return sorted(k for ref in split_shards(str(shards), split)
                  for k, _, _ in iter_samples(open(ref.url, "rb").read()))


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_eval_visits_every_sample_exactly_once(tiny_shards, world, workers):
    # train has 4-5 shards of at most 25: not divisible by ranks x workers
    seen = []
    for rank in range(world):
        for keys, x, metas in eval_loader(str(tiny_shards), "train", 7, rank, world, num_workers=workers):
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) and len(keys) == len(x) == len(metas)
            assert all(m["image_id"] == k for k, m in zip(keys, metas))
            seen += keys
    assert sorted(seen) == _all_keys(tiny_shards, "train")  # no loss, no duplicate


def test_partition_covers_range():
    for total, parts in [(10, 3), (3, 4), (0, 2), (101, 8)]:
        pieces = [partition(total, parts, i) for i in range(parts)]
        assert pieces[0][0] == 0 and pieces[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        assert max(b - a for a, b in pieces) - min(b - a for a, b in pieces) <= 1


def _keys_of_train_stream(refs, **kw):
    # every synthetic image's pixels are unique: map them back to their keys
    lookup = {}
    for ref in refs:
        for k, px, _ in iter_samples(open(ref.url, "rb").read()):
            lookup[px.tobytes()] = k
    stream = TrainStream(refs, **kw)
    batches = list(itertools.islice(iter(stream), 6))
    for keys, batch in batches:  # the keys name the pixels they come with
        assert keys == [lookup[b.permute(1, 2, 0).contiguous().numpy().tobytes()] for b in batch]
    return [keys for keys, _ in batches]


def test_train_stream_is_deterministic_and_seeded_by_rank_and_step(tiny_shards):
    refs = split_shards(str(tiny_shards), "train")
    a = _keys_of_train_stream(refs, batch_size=8, seed=1, start_step=0)
    assert a == _keys_of_train_stream(refs, batch_size=8, seed=1, start_step=0)
    assert a != _keys_of_train_stream(refs, batch_size=8, seed=1, start_step=100)
    assert a != _keys_of_train_stream(refs, batch_size=8, seed=2, start_step=0)


def test_train_stream_ranks_read_disjoint_shards(tiny_shards):
    refs = split_shards(str(tiny_shards), "train")
    assert len(refs) >= 2
    r0 = {k for b in _keys_of_train_stream(refs, batch_size=8, seed=1, rank=0, world_size=2) for k in b}
    r1 = {k for b in _keys_of_train_stream(refs, batch_size=8, seed=1, rank=1, world_size=2) for k in b}
    assert r0 and r1 and not (r0 & r1)


def test_train_loader_batches_with_workers(tiny_shards):
    loader = train_loader(str(tiny_shards), 16, seed=0, num_workers=2)
    batches = list(itertools.islice(iter(loader), 5))
    assert all(b.shape == (16, 3, 16, 16) and b.dtype == torch.uint8 and len(k) == 16 for k, b in batches)


def test_missing_manifest_is_a_clear_error(tmp_path):
    from vae_runtime.errors import BadInput

    with pytest.raises(BadInput, match="no manifest.json"):
        split_shards(str(tmp_path), "train")


def test_missing_or_corrupt_shard_is_a_one_line_error_naming_it(tiny_shards, tmp_path):
    import shutil

    from vae_runtime.errors import BadInput

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    victim = sorted((shards / "train").glob("*.tar"))[1]
    victim.write_bytes(b"garbage" * 100)
    with pytest.raises(BadInput, match=f"shard .*{victim.name}: sha256 differs from the manifest's"):
        list(eval_loader(str(shards), "train", 8))
    victim.unlink()
    with pytest.raises(BadInput, match=f"shard .*{victim.name}: listed in the manifest but missing"):
        list(eval_loader(str(shards), "train", 8))
    (shards / "manifest.json").write_text("[]")
    with pytest.raises(BadInput, match="manifest.json: not a shard manifest"):
        train_loader(str(shards), 8, seed=0)


def test_loader_workers_leave_sigterm_to_the_trainer(tiny_shards):
    """A launcher that signals the whole process group must not kill the workers before the trainer has taken
    its checkpoint."""
    import os
    import signal
    import time

    from pipeline.loader import train_loader

    batches = iter(train_loader(str(tiny_shards), batch_size=4, seed=0, num_workers=1))
    next(batches)
    for worker in batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    for _ in range(3):
        keys, images = next(batches)[:2]
        assert len(keys) == 4
