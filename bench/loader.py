"""Loader benchmark: images per second per core into batched uint8 tensors, side by side in one run.

    python bench/loader.py [--source DIR] [--batch 256] [--seconds 1.5]

(a) torchvision's usual CelebA path on the real JPEGs: PIL decode + CenterCrop(148) + Resize(64) + ToTensor,
    batched with torch.stack, one process;
(b) our shard loader (`train_loader`: resampled shards, shuffle buffer) into uint8 [B, 3, 64, 64], one process;
(c) the same with 2 DataLoader worker processes (per core = total / 2);
(d) the stock `webdataset` pipeline on the same shards into the same batches (resampled shards, shuffle buffer,
    its default `.npy` decoder, uint8 [B, 3, 64, 64]), one process: what our reader costs or gains against it;
and the ratios b/a (target >= 20) and b/d. Also our evaluation loader, and the stored-pixel-format comparison behind
the shard layout: reading .npy pixels from a shard against decoding the same 64x64 images stored as PNG.

The source is the shared real CelebA sample (`../shared/data/celeba-sample` beside the repo, or --source); it
is sharded at 64x64 into a temporary folder first (not timed). Each figure is the best of 3 timed repeats
after a warm-up, with one torch thread. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchkit import SHARED_SAMPLE, best_rate


def torchvision_rate(paths: list[Path], batch: int, seconds: float):
    import torch
    from PIL import Image
    from torchvision import transforms

    transform = transforms.Compose([transforms.CenterCrop(148), transforms.Resize(64), transforms.ToTensor()])
    cycle = itertools.cycle(paths)

    def run():
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            images = [transform(Image.open(next(cycle)).convert("RGB")) for _ in range(batch)]
            torch.stack(images)
            n += batch
        return n, time.perf_counter() - start

    run()  # warm-up
    return best_rate(run)


def webdataset_rate(shards: str, batch: int, seconds: float) -> float:
    """(d): the stock reader, as its docs compose it, on the shards `train_loader` reads."""
    import torch
    import webdataset as wds

    from pipeline.manifest import split_shards

    urls = [ref.url for ref in split_shards(shards, "train")]

    def to_chw(pixels):
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def make():
        # resampled: shards drawn at random, as train_loader does (shardshuffle applies to unresampled lists)
        return (wds.WebDataset(urls, resampled=True, shardshuffle=False, empty_check=False)
                .shuffle(2000).decode().to_tuple("__key__", "npy").map_tuple(None, to_chw)
                .batched(batch, partial=False))

    return loader_rate(make, batch, seconds, count=lambda b: len(b[1]))


def loader_rate(make_loader, batch: int, seconds: float, count=lambda b: len(b)):
    def run():
        it = iter(make_loader())
        next(it)  # start-up (worker processes, first shards) is not part of the steady state
        n, start = 0, time.perf_counter()
        for b in it:
            n += count(b)
            if time.perf_counter() - start > seconds:
                break
        return n, time.perf_counter() - start

    return best_rate(run)


def _repeat(make):
    """Endless passes over a finite loader (a fresh iterator each pass; nothing is cached)."""
    while True:
        yield from make()


def pixel_formats(shards: str, n: int = 1000) -> dict:
    """Stored-pixel-format comparison on the same n preprocessed 64x64 images: .npy from a shard (our reader)
    against PNG (PIL decode, and torchvision.io.decode_png), with bytes per image."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import decode_png

    from vae_runtime.storage import read_bytes
    from pipeline.manifest import split_shards
    from pipeline.records import encode_npy, read_shard

    data = read_bytes(split_shards(shards, "train")[0].url)
    keys, pixels, _ = read_shard(data)
    pixels = pixels[:n]
    pngs = []
    for px in pixels:
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "PNG")
        pngs.append(buf.getvalue())

    def npy():
        start = time.perf_counter()
        read_shard(data, meta=False)
        return len(keys), time.perf_counter() - start

    def png_pil():
        start = time.perf_counter()
        np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs])
        return len(pngs), time.perf_counter() - start

    tensors = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in pngs]

    def png_tv():
        start = time.perf_counter()
        torch.stack([decode_png(t) for t in tensors])
        return len(tensors), time.perf_counter() - start

    return {"npy_read_img_s": round(best_rate(npy)), "png_pil_decode_img_s": round(best_rate(png_pil)),
            "png_torchvision_decode_img_s": round(best_rate(png_tv)),
            "npy_bytes_per_image": len(encode_npy(pixels[0])),
            "png_bytes_per_image": round(sum(map(len, pngs)) / len(pngs)),
            "raw_bytes_per_image": int(pixels[0].nbytes)}


def verification(shards: str, batch: int, seconds: float) -> dict:
    """What checking shard bytes against the manifest's sha256 costs. The loader checks each shard once per
    process, so a training stream pays it on its first pass over the shards only; evaluation reads every shard
    once, so it pays it in full. Measured: sha256 alone, and the evaluation loader with every read checked
    (the set of checked shards emptied before each pass) against the same loader with nothing left to check."""
    from vae_runtime.storage import read_bytes
    from pipeline import loader
    from pipeline.manifest import split_shards

    refs = split_shards(shards, "train")
    blobs = [read_bytes(ref.url) for ref in refs]
    n = sum(ref.count for ref in refs)

    def hashing():
        start = time.perf_counter()
        for blob in blobs:
            loader.hashlib.sha256(blob).hexdigest()
        return n, time.perf_counter() - start

    def fresh_eval():
        loader._VERIFIED.clear()
        return loader.eval_loader(shards, "train", batch)

    count = lambda b: len(b[0])  # noqa: E731
    checked = loader_rate(lambda: _repeat(fresh_eval), batch, seconds, count=count)
    loader_rate(lambda: _repeat(lambda: loader.eval_loader(shards, "train", batch)), batch, 0.1, count=count)
    unchecked = loader_rate(lambda: _repeat(lambda: loader.eval_loader(shards, "train", batch)), batch, seconds,
                            count=count)
    return {"sha256_img_s_per_core": round(best_rate(hashing)),
            "eval_loader_every_read_verified_img_s": round(checked),
            "eval_loader_already_verified_img_s": round(unchecked),
            "verification_cost_first_read_pct": round(100 * (unchecked / checked - 1), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(SHARED_SAMPLE),
                        help="real CelebA folder (img_align_celeba/ + list_eval_partition.txt)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=1.5, help="length of each timed repeat")
    args = parser.parse_args(argv)
    source = Path(args.source)
    images = sorted((source / "img_align_celeba").glob("*.jpg")) if source.is_dir() else []
    if not images:
        print(f"bench/loader.py: skipped: no real CelebA JPEGs under {source}/img_align_celeba "
              "(pass --source or set VAE_CELEBA_SAMPLE)", file=sys.stderr)
        print(json.dumps({"bench": "loader", "skipped": f"no real CelebA JPEGs under {source}"}))
        return 0

    import torch

    torch.set_num_threads(1)
    from pipeline.loader import eval_loader, train_loader
    from pipeline.shard import shard

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        shards = str(Path(tmp) / "shards")
        summary = shard(source, shards, size=64, crop=148, workers=2, progress=False)  # not timed
        b = args.batch
        a = torchvision_rate(images[:2000], b, args.seconds)
        images_in = lambda batch: len(batch[1])  # noqa: E731  (train batches are (keys, pixels))
        ours = loader_rate(lambda: train_loader(shards, b, seed=0), b, args.seconds, count=images_in)
        ours_2 = loader_rate(lambda: train_loader(shards, b, seed=0, num_workers=2), b, args.seconds,
                             count=images_in)
        stock = webdataset_rate(shards, b, args.seconds)
        ours_eval = loader_rate(lambda: _repeat(lambda: eval_loader(shards, "train", b)), b, args.seconds,
                                count=lambda batch: len(batch[0]))
        formats = pixel_formats(shards)
        verified = verification(shards, b, args.seconds)
    result = {
        "bench": "loader", "images": summary["written"], "batch": b, "image_size": 64,
        "cpu": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "a_torchvision_img_s_per_core": round(a),
        "b_shards_img_s_per_core": round(ours),
        "c_shards_2_workers_img_s": round(ours_2), "c_shards_2_workers_img_s_per_core": round(ours_2 / 2),
        "eval_loader_img_s_per_core": round(ours_eval),
        "d_stock_webdataset_img_s_per_core": round(stock),
        "ratio_b_over_a": round(ours / a, 1), "target_ratio": 20, "ratio_b_over_d": round(ours / stock, 2),
        **formats, **verified,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
