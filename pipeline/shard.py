"""Sharding: a source of images to WebDataset tar shards and `SHARDS/manifest.json`, on a local path or an
fsspec URL (`s3://bucket/shards`).

Deterministic (shard contents depend on the source and settings only, not on the worker count), atomic
(each shard and the manifest are written whole under a temporary name and renamed, or as one object on object
storage; the manifest after the shards it names), idempotent (a source whose fingerprint matches the manifest
does no work) and incremental (images not yet in the manifest land in new shards, existing shards untouched).
Every input that cannot be used is recorded in `skipped`, and tried again by the next run that has work to do
(a file replaced by a good one is then sharded); a read error (`unreadable`, possibly passing) leaves the
manifest unmatched to the source, so the next run tries again.

Killed at any moment (SIGKILL), a re-run removes the temporary files the killed run left, keeps the shards the
manifest names, rewrites (identically) any shard written after the last manifest update, and ends with the
same bytes as an uninterrupted run. An image deleted from the source stays in its shard (shards are never
rewritten) and is listed in the manifest's `not_in_source`; an image whose file changed size since it was
sharded (edited in place) keeps its first sharded version and is listed in `changed_in_source`. Shard into a
fresh folder to drop or refresh them.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass, field

import webdataset as wds
from tqdm import tqdm

from common import folder_lock
from vae_runtime import storage
from vae_runtime.errors import BadInput
from common.orphans import end_with_parent
from pipeline.manifest import (LAST_SHARD, MANIFEST, PIXEL_FORMAT, SPLITS, empty_manifest, read_manifest,
                              shard_name, write_manifest)
from pipeline.images import read_pixels
from vae_runtime.schemas import DEFAULT_CROP
from pipeline.records import sample_members
from pipeline.sources import LISTING_REASONS, Entry, Listing, Source, open_source

MANIFEST_EVERY_S = 10.0

# Worker processes hold the source and settings once, instead of receiving them with every image.
_WORKER: dict = {}


def _init_worker(source: Source, crop: int, size: int, parent: int | None = None) -> None:
    if parent is not None:  # a pool worker: it ends with the shard process, never an orphan printing tracebacks
        end_with_parent(parent)
    _WORKER.update(source=source, crop=crop, size=size)


def _process(entry: Entry) -> tuple[Entry, object]:
    """The entry and its pixels, or the reason it is skipped (an image over its size cap is read no further)."""
    return entry, read_pixels(_WORKER["source"].read, entry.name, _WORKER["crop"], _WORKER["size"])


def _write_shard(folder: str, name: str, samples: list[tuple[str, object, dict, int]]) -> dict:
    """Write one tar atomically (local or object storage); returns its manifest record.

    `samples`: (key, pixels, metadata, byte size of the source file). The sizes go to the record
    (`source_bytes`, beside `keys`) so that a later run can tell an image edited in place."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, user="vae", group="vae") as writer:
        for key, pixels, meta, _ in samples:
            writer.write(sample_members(key, pixels, meta))
    data = buf.getvalue()
    storage.write_bytes_atomic(storage.join(folder, name), data)
    return {"name": name, "count": len(samples), "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "keys": [s[0] for s in samples], "source_bytes": [s[3] for s in samples]}


def changed_note(out: str, keys: list[str]) -> str:
    """One line for users: which images changed in the source and what to do about it."""
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return (f"shards {out}: {len(keys)} image(s) changed in the source since they were sharded and keep their "
            f"first sharded version ({shown}; manifest changed_in_source); shard into a fresh folder to take "
            f"the new versions")


def _sizes(listing: Listing) -> dict[str, int]:
    return {e.key: e.size for split in SPLITS for e in listing.entries[split]}


def learn_source_bytes(manifest: dict, listing: Listing) -> bool:
    """Give shard records from before sizes were kept (no `source_bytes`) the listing's sizes; True if any.
    Only right when the source is as sharded (its fingerprint matches the manifest's)."""
    now = _sizes(listing)
    old = [r for split in SPLITS for r in manifest["splits"][split]["shards"] if "source_bytes" not in r]
    for record in old:
        record["source_bytes"] = [now.get(key, 0) for key in record["keys"]]
    return bool(old)


def changed_in_source(manifest: dict, listing: Listing) -> list[str]:
    """Keys in the shards whose source file now has another byte size than when it was sharded.

    Not compared: sizes a source does not know (0, e.g. some HTTP listings), keys with several files in the
    source now (which file was sharded is not recorded) and records without sizes."""
    now = _sizes(listing)
    duplicated = {r["key"] for r in listing.skipped if r["reason"].startswith("duplicate key")}
    return sorted(key for split in SPLITS for record in manifest["splits"][split]["shards"]
                  for key, size in zip(record["keys"], record.get("source_bytes", []))
                  if size and now.get(key) and now[key] != size and key not in duplicated)


def refuse_moved_images(out: str, manifest: dict, listing: Listing, present: set) -> None:
    """One line when images already sharded now belong to another split, or to none (the partition file changed,
    or one was added): shards are immutable, so a test image would stay in train."""
    now = {entry.key: split for split in SPLITS for entry in listing.entries[split]}
    moved = [(key, split, now.get(key)) for split in SPLITS for record in manifest["splits"][split]["shards"]
             for key in record["keys"] if key in present and now.get(key) != split]
    if moved:
        shown = ", ".join(f"{key}: {was} -> {is_ or 'no split'}" for key, was, is_ in sorted(moved)[:3])
        raise BadInput(f"shards {out}: {len(moved)} sharded images now belong to another split than they were "
                       f"sharded into ({shown}{', ...' if len(moved) > 3 else ''}); shards are never rewritten, so "
                       "shard into a fresh folder")


def remove_stale_temps(out: str, dataset: str) -> list[str]:
    """Temporary files a killed run left behind (the manifest's, its shards'): removed before any work."""
    ours = re.compile(rf"^({re.escape(MANIFEST)}|{re.escape(dataset)}-({'|'.join(SPLITS)})-\d{{6}}\.tar)$")
    removed = storage.remove_stale_temps(out, ours.match)
    for split in SPLITS:
        removed += storage.remove_stale_temps(storage.join(out, split), ours.match)
    return removed


@dataclass
class Plan:
    """What one `shard` run will do: the source and its listing, the manifest as it stands, and per split the
    images not sharded yet (`todo`, with those that failed before: tried again); `failed` holds the images that
    could not be used, kept while they stay in the source and fail."""
    src: Source
    out: str
    dataset: str
    crop: int
    size: int
    maxcount: int
    listing: Listing
    fingerprint: str
    manifest: dict
    failed: dict = field(default_factory=dict)
    todo: dict = field(default_factory=dict)
    lock: object = None  # the folder's lock (common.folder_lock): checked still ours before each manifest write

    @property
    def up_to_date(self) -> bool:
        return self.manifest["source"].get("fingerprint") == self.fingerprint

    saved_at: float = 0.0

    def save_manifest(self) -> None:
        self.manifest["skipped"] = sorted([*self.failed.values(), *self.listing.skipped],
                                          key=lambda r: (r["key"], r["reason"]))
        self.manifest["partition_missing"] = self.listing.partition_missing
        if self.lock is not None:
            self.lock.check()  # a lease on object storage taken over: another run writes the folder now
        write_manifest(self.out, self.manifest)
        self.saved_at = time.monotonic()

    def save_manifest_if_due(self) -> None:
        """The manifest after a shard, at most every MANIFEST_EVERY_S: rewriting the whole manifest after each of
        CelebA's 200 shards would cost time quadratic in their number; a killed run redoes (identically) only
        the shards written since the last save."""
        if time.monotonic() - self.saved_at >= MANIFEST_EVERY_S:
            self.save_manifest()


def shard(source: str | os.PathLike, out: str | os.PathLike, *, crop: int = DEFAULT_CROP, size: int = 64,
          workers: int = 1, dataset: str = "celeba", maxcount: int = 1000, progress: bool = True,
          wait_s: float = 0.0) -> dict:
    """Shard `source` into `out`; returns a summary {written, skipped, seconds, up_to_date, counts, manifest,
    changed_in_source}. The folder's lock (`common.folder_lock`) is held from before anything in `out` is read
    until the run ends: another run into `out` is refused, naming it, or waited for up to `wait_s` seconds."""
    started = time.time()
    check_settings(crop, size, workers, dataset, maxcount)
    src = open_source(source)
    with folder_lock.hold(str(out), "shard folder", wait_s) as lock:
        plan = make_plan(src, str(out), dataset, crop, size, maxcount)
        plan.lock = lock
        return write_plan(plan, started, workers, progress)


def write_plan(plan: Plan, started: float, workers: int, progress: bool) -> dict:
    """Shard what `plan` leaves to do, the manifest last (the folder's lock held); returns `shard`'s summary."""
    crop, size = plan.crop, plan.size
    if plan.up_to_date:
        if learn_source_bytes(plan.manifest, plan.listing):  # a manifest from before sizes were kept, upgraded once
            plan.manifest.setdefault("changed_in_source", [])
            write_manifest(plan.out, plan.manifest)
        return summarize(plan, started, written=0, up_to_date=True)
    data = plan.src.data()  # what the images are (the model card's training data), checked before any work
    total = sum(len(v) for v in plan.todo.values())
    bar = tqdm(total=total, unit="img", desc="sharding", disable=not progress or total == 0, file=sys.stderr,
               dynamic_ncols=True)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (plan.src, crop, size, os.getpid())) \
        if workers > 1 else None
    if pool is None:
        _init_worker(plan.src, crop, size)
    written = 0
    try:
        for split in SPLITS:
            if plan.todo[split]:
                results = pool.imap(_process, plan.todo[split], chunksize=16) if pool else \
                    map(_process, plan.todo[split])
                written += write_split(plan, split, results, bar)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    passing = any(r["reason"].startswith("unreadable") for r in plan.failed.values())  # a read error: try again
    plan.manifest["source"] = {"path": plan.src.describe(), "fingerprint": None if passing else plan.fingerprint}
    plan.manifest["data"] = data
    plan.save_manifest()
    return summarize(plan, started, written, up_to_date=False)


def check_settings(crop: int, size: int, workers: int, dataset: str, maxcount: int) -> None:
    if size < 1 or crop < 0 or maxcount < 1 or workers < 1:
        raise BadInput(f"shard settings: need size >= 1, crop >= 0, maxcount >= 1, workers >= 1 "
                       f"(got size={size}, crop={crop}, maxcount={maxcount}, workers={workers})")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", dataset):
        raise BadInput(f"--dataset {dataset!r}: letters, digits, '-' and '_' only (it names the shard files)")


def make_plan(src: Source, out: str, dataset: str, crop: int, size: int, maxcount: int) -> Plan:
    """List the source, read (or start) the manifest and decide what is left to shard."""
    remove_stale_temps(out, dataset)
    listing = src.listing()
    preprocessing = {"crop": crop, "size": size, "pixel_format": PIXEL_FORMAT, "resize": "PIL bilinear, antialiased"}
    fingerprint = hashlib.sha256(
        (listing.fingerprint + json.dumps(preprocessing, sort_keys=True) + f"/{maxcount}").encode()).hexdigest()
    manifest = read_manifest(out)
    if manifest is None:
        manifest = empty_manifest(dataset, preprocessing)
    elif manifest["preprocessing"] != preprocessing or manifest["dataset"] != dataset:
        raise BadInput(f"{storage.join(out, MANIFEST)}: holds shards made with {manifest['preprocessing']} for "
                       f"{manifest['dataset']!r}; shard into another folder")
    plan = Plan(src, out, dataset, crop, size, maxcount, listing, fingerprint, manifest)
    if plan.up_to_date:
        return plan
    done = {k for s in SPLITS for record in manifest["splits"][s]["shards"] for k in record["keys"]}
    present = set(listing.metadata)  # every key the source holds now
    refuse_moved_images(out, manifest, listing, present)
    # Images that failed preprocessing stay recorded while they are in the source, and are tried again (fixed in
    # place, they are sharded now); listing problems (duplicates, images the partition does not name) are derived
    # afresh from the current listing.
    plan.failed = {r["key"]: r for r in manifest["skipped"]
                   if not r["reason"].startswith(LISTING_REASONS) and r["key"] in present}
    plan.todo = {s: [e for e in listing.entries[s] if e.key not in done] for s in SPLITS}
    refuse_past_last_shard(plan)
    # Shards are immutable: an image deleted from the source stays in its shard and is listed here.
    manifest["not_in_source"] = sorted(done - present)
    manifest["changed_in_source"] = changed_in_source(manifest, listing)  # kept as first sharded
    # Until this run ends, the manifest must not claim to match any source (a killed run is re-done).
    manifest["source"] = {"path": src.describe(), "fingerprint": None}
    return plan


def write_split(plan: Plan, split: str, results, bar) -> int:
    """Write one split's new images into new shards of `maxcount` images, the manifest after each shard;
    returns how many images were written."""
    folder = storage.join(plan.out, split)
    storage.make_dirs(folder)
    records = plan.manifest["splits"][split]["shards"]
    pending: list[tuple[str, object, dict, int]] = []
    written = 0

    def flush() -> None:
        records.append(_write_shard(folder, shard_name(plan.dataset, split, next_index(records)), pending))
        plan.manifest["splits"][split]["count"] = sum(r["count"] for r in records)
        pending.clear()
        plan.save_manifest_if_due()

    for entry, result in results:
        bar.update(1)
        if isinstance(result, str):
            plan.failed[entry.key] = {"key": entry.key, "reason": result}
            continue
        plan.failed.pop(entry.key, None)  # failed before, usable now
        meta = {"image_id": entry.key, "split": split, **plan.listing.metadata.get(entry.key, {})}
        pending.append((entry.key, result, meta, entry.size))
        written += 1
        if len(pending) == plan.maxcount:
            flush()
    if pending:
        flush()
    plan.save_manifest()
    return written


def next_index(records: list[dict]) -> int:
    """The number of a split's next shard: after the highest the manifest names (never one of its names, even
    when records were removed from it)."""
    numbers = [int(m[1]) for r in records if (m := re.search(r"-(\d{6})\.tar$", str(r.get("name", ""))))]
    return max([len(records) - 1, *numbers]) + 1


def refuse_past_last_shard(plan: Plan) -> None:
    """One line, before any work, when a split's new shards would need numbers past LAST_SHARD (its last
    six-digit name, the only names the readers take)."""
    for split in SPLITS:
        new = -(-len(plan.todo[split]) // plan.maxcount)  # shards, at most
        last = next_index(plan.manifest["splits"][split]["shards"]) + new - 1
        if new and last > LAST_SHARD:
            raise BadInput(f"shards {plan.out}: the {split} split's {len(plan.todo[split])} new images would need "
                           f"shard number {last} (--maxcount {plan.maxcount}), past "
                           f"{shard_name(plan.dataset, split, LAST_SHARD)}, the last six-digit shard name; shard "
                           "with a larger --maxcount, or into a fresh folder")


def summarize(plan: Plan, started: float, written: int, up_to_date: bool) -> dict:
    manifest = plan.manifest
    return {"written": written, "skipped": len(manifest["skipped"]), "seconds": time.time() - started,
            "up_to_date": up_to_date, "counts": {s: manifest["splits"][s]["count"] for s in SPLITS},
            "manifest": storage.join(plan.out, MANIFEST), "changed_in_source": manifest.get("changed_in_source", [])}
