"""Sharding: a source of images to WebDataset tar shards and `SHARDS/manifest.json`.

Deterministic (shard contents depend on the source and settings only, not on the worker count), atomic
(each shard and the manifest are written to a temporary name and renamed), idempotent (a source whose
fingerprint matches the manifest does no work) and incremental (images not yet in the manifest land in new
shards, existing shards untouched). Every input that cannot be used is recorded in `skipped`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from vae.atomic import atomic_write_bytes, atomic_write_json
from pipeline.preprocess import SkipImage, preprocess
from pipeline.records import sample_members
from pipeline.sources import LISTING_REASONS, SPLITS, Entry, Source, open_source
from vae.errors import BadInput

FORMAT_VERSION = 1
PIXEL_FORMAT = "npy:uint8:HWC:RGB"
MANIFEST = "manifest.json"


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def read_manifest(shards: str | os.PathLike) -> dict | None:
    path = Path(shards) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BadInput(f"{path}: unknown format_version {manifest.get('format_version')!r}")
    return manifest


def _empty_manifest(dataset: str, preprocessing: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "dataset": dataset, "preprocessing": preprocessing,
            "source": {}, "splits": {s: {"count": 0, "shards": []} for s in SPLITS},
            "skipped": [], "partition_missing": []}


# Worker processes hold the source and settings once, instead of receiving them with every image.
_WORKER: dict = {}


def _init_worker(source: Source, crop: int, size: int) -> None:
    _WORKER.update(source=source, crop=crop, size=size)


def _process(entry: Entry) -> tuple[Entry, object]:
    try:
        data = _WORKER["source"].read(entry.name)
        return entry, preprocess(data, _WORKER["crop"], _WORKER["size"])
    except SkipImage as err:
        return entry, str(err)
    except OSError as err:
        return entry, f"unreadable: {err}"


def _write_shard(path: Path, samples: list[tuple[str, object, dict]]) -> dict:
    """Write one tar atomically; returns its manifest record."""
    import io

    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, user="vae", group="vae") as writer:
        for key, pixels, meta in samples:
            writer.write(sample_members(key, pixels, meta))
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return {"name": path.name, "count": len(samples), "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "keys": [key for key, _, _ in samples]}


def shard(source: str | os.PathLike, out: str | os.PathLike, *, crop: int = 148, size: int = 64,
          workers: int = 1, dataset: str = "celeba", maxcount: int = 1000, progress: bool = True) -> dict:
    """Shard `source` into `out`; returns a summary {written, skipped, seconds, up_to_date, counts}."""
    started = time.time()
    if size < 1 or crop < 0 or maxcount < 1 or workers < 1:
        raise BadInput(f"shard settings: need size >= 1, crop >= 0, maxcount >= 1, workers >= 1 "
                       f"(got size={size}, crop={crop}, maxcount={maxcount}, workers={workers})")
    src = open_source(source)
    out = Path(out)
    listing = src.listing()
    preprocessing = {"crop": crop, "size": size, "pixel_format": PIXEL_FORMAT,
                     "resize": "PIL bilinear, antialiased"}
    fingerprint = hashlib.sha256(
        (listing.fingerprint + json.dumps(preprocessing, sort_keys=True) + f"/{maxcount}").encode()
    ).hexdigest()

    manifest = read_manifest(out)
    if manifest is None:
        manifest = _empty_manifest(dataset, preprocessing)
    elif manifest["preprocessing"] != preprocessing or manifest["dataset"] != dataset:
        raise BadInput(f"{out / MANIFEST}: holds shards made with {manifest['preprocessing']} for "
                       f"{manifest['dataset']!r}; shard into another folder")
    counts = {s: manifest["splits"][s]["count"] for s in SPLITS}
    if manifest["source"].get("fingerprint") == fingerprint:
        return {"written": 0, "skipped": len(manifest["skipped"]), "seconds": time.time() - started,
                "up_to_date": True, "counts": counts, "manifest": str(out / MANIFEST)}

    done = {k for s in SPLITS for shard_rec in manifest["splits"][s]["shards"] for k in shard_rec["keys"]}
    # Images that failed preprocessing stay failed; listing problems (duplicates, images the partition does
    # not name) are derived afresh from the current listing.
    failed = {r["key"]: r for r in manifest["skipped"] if not r["reason"].startswith(LISTING_REASONS)}
    todo = {s: [e for e in listing.entries[s] if e.key not in done and e.key not in failed] for s in SPLITS}
    total = sum(len(v) for v in todo.values())

    def save_manifest() -> None:
        manifest["skipped"] = sorted([*failed.values(), *listing.skipped], key=lambda r: (r["key"], r["reason"]))
        manifest["partition_missing"] = listing.partition_missing
        atomic_write_json(out / MANIFEST, manifest)

    written = 0
    bar = tqdm(total=total, unit="img", desc="sharding", disable=not progress or total == 0,
               file=sys.stderr, dynamic_ncols=True)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (src, crop, size)) \
        if workers > 1 else None
    if pool is None:
        _init_worker(src, crop, size)
    try:
        for split in SPLITS:
            if not todo[split]:
                continue
            (out / split).mkdir(parents=True, exist_ok=True)
            records = manifest["splits"][split]["shards"]
            pending: list[tuple[str, object, dict]] = []

            def flush() -> None:
                index = len(records)
                records.append(_write_shard(out / split / shard_name(dataset, split, index), pending))
                manifest["splits"][split]["count"] = sum(r["count"] for r in records)
                pending.clear()
                save_manifest()

            results = pool.imap(_process, todo[split], chunksize=16) if pool else map(_process, todo[split])
            for entry, result in results:
                bar.update(1)
                if isinstance(result, str):
                    failed[entry.key] = {"key": entry.key, "reason": result}
                    continue
                meta = {"image_id": entry.key, "split": split, **listing.metadata.get(entry.key, {})}
                pending.append((entry.key, result, meta))
                written += 1
                if len(pending) == maxcount:
                    flush()
            if pending:
                flush()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    manifest["source"] = {"path": src.describe(), "fingerprint": fingerprint}
    save_manifest()
    counts = {s: manifest["splits"][s]["count"] for s in SPLITS}
    return {"written": written, "skipped": len(manifest["skipped"]), "seconds": time.time() - started,
            "up_to_date": False, "counts": counts, "manifest": str(out / MANIFEST)}
