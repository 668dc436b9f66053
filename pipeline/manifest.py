"""The shard manifest, `SHARDS/manifest.json`: its format, reading and validating it, writing it, and what it
says about the shards (their references, a split's fingerprint, the image size). The writer (`shard.py`) and
the readers (`loader.py`, `memory.py`) both go through this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

from vae_runtime import storage
from vae_runtime.errors import BadInput

SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1
PIXEL_FORMAT = "npy:uint8:HWC:RGB"
MANIFEST = "manifest.json"
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*-(train|valid|test)-\d{6}\.tar")
LAST_SHARD = 999_999  # a split's last shard number: names have six digits (SPEC), the readers take no other


@dataclass(frozen=True)
class ShardRef:
    url: str
    count: int
    sha256: str | None = None  # the manifest's; None only for shards read without a manifest


def shard_name(dataset: str, split: str, index: int) -> str:
    """The file name of a split's shard number `index` (0 to LAST_SHARD): never one the readers refuse."""
    if not 0 <= index <= LAST_SHARD:
        raise BadInput(f"shard number {index} of {dataset}-{split}: past {dataset}-{split}-{LAST_SHARD:06d}.tar, "
                       "the last six-digit shard name")
    return f"{dataset}-{split}-{index:06d}.tar"


def read_manifest(shards: str | os.PathLike) -> dict | None:
    """The manifest at a local path or URL, or None when there is none yet; one over the `manifest` size cap
    (`vae_runtime.limits`) is one line of BadInput, read no further."""
    path = storage.join(shards, MANIFEST)
    try:
        manifest = json.loads(storage.read_capped(path, "manifest"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else type(manifest).__name__
        raise BadInput(f"{path}: not a shard manifest (format_version {found!r}, expected {FORMAT_VERSION})")
    problem = manifest_problem(manifest)
    if problem:
        raise BadInput(f"{path}: damaged manifest ({problem}); restore it, or shard into a fresh folder")
    return manifest


def manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest unusable (a part missing or of the wrong type, a record whose keys disagree with
    its count), or None: checked once on reading, so neither the writer nor the readers fail on it later."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), dict) for s in SPLITS):
        return f"'splits' must hold {', '.join(SPLITS)}"
    for name, kind in (("dataset", str), ("preprocessing", dict), ("source", dict), ("skipped", list)):
        if not isinstance(manifest.get(name), kind):
            return f"{name!r} must be a {kind.__name__}"
    data = manifest.get("data")  # what the images are; absent in manifests written before it was recorded
    if data is not None and not (isinstance(data, dict) and isinstance(data.get("kind"), str)
                                 and isinstance(data.get("name"), str)):
        return "'data' must hold a 'kind' and a 'name'"
    if not all(isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("reason"), str)
               for r in manifest["skipped"]):
        return "each 'skipped' entry needs a 'key' and a 'reason'"
    for split in SPLITS:
        records = splits[split].get("shards")
        if not isinstance(records, list) or not all(isinstance(rec, dict) for rec in records):
            return f"split {split}: 'shards' must be a list of shard records"
        names: set[str] = set()
        for rec in records:
            count, keys = rec.get("count"), rec.get("keys")
            name = rec.get("name") if isinstance(rec.get("name"), str) else None
            if name in names:  # its images would be read, and counted, twice
                return f"split {split} lists shard {name!r} twice"
            if name is not None:
                names.add(name)
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                return f"shard {rec.get('name')!r}: count {count!r}"
            if not isinstance(keys, list) or len(keys) != count or not all(isinstance(k, str) for k in keys):
                return f"shard {rec.get('name')!r}: its 'keys' must list its {count} images"
        total = splits[split].get("count")
        if total != sum(rec["count"] for rec in records):
            return f"split {split}: count {total!r}, its shards hold {sum(rec['count'] for rec in records)}"
    return None


def load_manifest(shards: str) -> dict:
    manifest = read_manifest(shards)
    if manifest is None:
        raise BadInput(f"shards {shards}: no {MANIFEST} (run `vae data shard` first)")
    return manifest


def empty_manifest(dataset: str, preprocessing: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "dataset": dataset, "preprocessing": preprocessing,
            "source": {}, "splits": {s: {"count": 0, "shards": []} for s in SPLITS},
            "skipped": [], "partition_missing": [], "not_in_source": [], "changed_in_source": []}


def write_manifest(shards: str, manifest: dict) -> None:
    data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    storage.write_bytes_atomic(storage.join(shards, MANIFEST), data)


def split_shards(shards: str, split: str, manifest: dict | None = None) -> list[ShardRef]:
    manifest = manifest or load_manifest(shards)
    if split not in manifest["splits"]:
        raise BadInput(f"shards {shards}: no split {split!r} in the manifest")
    refs = []
    for rec in manifest["splits"][split]["shards"]:
        name = rec.get("name")
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise BadInput(f"shards {shards}: manifest names shard {name!r} in {split}, not a plain "
                           "'<dataset>-<split>-NNNNNN.tar' file name in that folder")
        count = rec.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise BadInput(f"shards {shards}: manifest gives shard {name} the count {count!r}")
        if not (isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64):
            raise BadInput(f"shards {shards}: manifest gives shard {name} no sha256 (it cannot be verified)")
        if count > 0:
            refs.append(ShardRef(storage.join(shards, split, name), count, rec.get("sha256")))
    return refs


def split_fingerprint(manifest: dict, split: str, max_images: int | None = None) -> str:
    """The identity of a split's images: a sha256 over its shards' sha256 and counts (in order), the
    preprocessing, and the image cap of a partial evaluation. Two evaluations with the same fingerprint
    measured the same images, wherever the shards live."""
    if split not in manifest.get("splits", {}):
        raise BadInput(f"shards: no split {split!r} in the manifest")
    shards = [[rec.get("name"), rec.get("sha256"), rec.get("count")] for rec in manifest["splits"][split]["shards"]]
    blob = json.dumps({"split": split, "shards": shards, "preprocessing": manifest.get("preprocessing"),
                       "max_images": max_images}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def require_image_size(shards: str, size: int, manifest: dict | None = None) -> dict:
    """The manifest, after checking that its images have the side a model takes (one line naming both)."""
    manifest = manifest or load_manifest(shards)
    found = (manifest.get("preprocessing") or {}).get("size")
    if found != size:
        raise BadInput(f"shards {shards}: images of {found}x{found} pixels, the model takes {size}x{size} "
                       f"(re-shard with --size {size}, or use the model's own shards)")
    return manifest
