"""Image sources: a CelebA folder, the official `img_align_celeba.zip`, or any folder of images, on local disk
or at an fsspec URL (s3://, gs://, http(s)://, memory://): a zip at a URL is read in place by byte ranges.

A source lists its images (key = file stem, relative name, byte size), reads one image's bytes, and
carries CelebA's metadata when present: the split from `list_eval_partition.txt` (else a deterministic
split by a hash of the key), `identity_CelebA.txt` and `list_attr_celeba.txt`. Problems with the listing
itself (duplicate keys, images the partition does not name, names the partition lists that are absent)
are returned as records for the manifest, never raised.

Every read is under a size cap of `vae_runtime.limits`: an image over the `image` cap is skipped (`SkipImage`,
recorded like any unusable image), a list over the `list` cap is one line of `BadInput`; a zip member is read
through the cap whatever size it declares.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from vae_runtime import limits, storage
from vae_runtime.errors import BadInput, one_line
from pipeline.manifest import SPLITS
from vae_runtime.preprocess import IMAGE_SUFFIXES, SkipImage

SPLIT_CODES = {"0": "train", "1": "valid", "2": "test"}
PARTITION_FILE = "list_eval_partition.txt"
IDENTITY_FILE = "identity_CelebA.txt"
ATTR_FILE = "list_attr_celeba.txt"
LISTING_REASONS = ("duplicate key", "not named in")  # skip reasons that come from the listing itself
# What reading one zip member raises when that member is damaged: a bad CRC or header, a truncated stream, an
# encrypted member, a compression method zipfile lacks.
ZIP_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


@dataclass(frozen=True)
class Entry:
    key: str
    name: str  # path inside the source (relative to the image folder, or the zip member name)
    size: int


@dataclass
class Listing:
    """What a source holds, split, with the records the manifest needs."""

    entries: dict[str, list[Entry]]  # split -> entries sorted by key
    skipped: list[dict] = field(default_factory=list)  # [{"key", "reason"}]
    partition_missing: list[str] = field(default_factory=list)  # partition names with no image
    metadata: dict[str, dict] = field(default_factory=dict)  # key -> {"identity", "attrs"}
    fingerprint: str = ""


def hash_split(key: str) -> str:
    """Deterministic 80/10/10 split for sources without a partition file."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 80 else ("valid" if bucket < 90 else "test")


def _parse_partition(text: str, where: str) -> dict[str, str]:
    table, lines = {}, {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in SPLIT_CODES:
            raise BadInput(f"{where} line {number}: expected '<image> <0|1|2>', got {line.strip()!r}")
        key, split = Path(parts[0]).stem, SPLIT_CODES[parts[1]]
        if table.get(key, split) != split:
            raise BadInput(f"{where} line {number}: puts {parts[0]} in {split}, line {lines[key]} in {table[key]}")
        table[key], lines[key] = split, lines.get(key, number)
    return table


def _parse_identity(text: str) -> dict[str, int]:
    table = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            table[Path(parts[0]).stem] = int(parts[1])
    return table


def _parse_attrs(text: str, where: str) -> dict[str, dict[str, int]]:
    lines = text.splitlines()
    if len(lines) < 2:
        return {}
    names = lines[1].split()
    table = {}
    for number, line in enumerate(lines[2:], 3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1 or not all(re.fullmatch(r"-?[0-9]+", v) for v in parts[1:]):
            raise BadInput(f"{where} line {number}: expected an image name and {len(names)} integer attribute "
                           f"values, got {line.strip()[:120]!r}")
        table[Path(parts[0]).stem] = {n: int(v) for n, v in zip(names, parts[1:])}
    return table


DATASET_FILE = "dataset.json"  # beside the lists: what the data are (`vae data synth` writes it)
DATA_KINDS = ("celeba", "synthetic", "images")


class Source:
    """Base for the two storage kinds: subclasses list files and read bytes; this class does the rest."""

    root: str  # a local path or an fsspec URL

    def _files(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def _metadata_text(self, filename: str) -> str | None:
        raise NotImplementedError

    def describe(self) -> str:
        return str(self.root)

    def in_celeba_layout(self) -> bool:
        raise NotImplementedError

    def data(self) -> dict:
        """What the images are, for the manifest and the model card: `kind` "synthetic" where the source's
        `dataset.json` says so, "celeba" for CelebA's layout (`img_align_celeba/` and its partition file), else
        "images" (a folder of images, terms unknown); with a `name`."""
        text = self._metadata_text(DATASET_FILE)
        if text is not None:
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if not isinstance(record, dict) or record.get("kind") not in DATA_KINDS or \
                    not isinstance(record.get("name", ""), str):
                raise BadInput(f"source {self.describe()}: {DATASET_FILE} must be a JSON object whose 'kind' is one "
                               f"of {', '.join(DATA_KINDS)}")
            return {"kind": record["kind"], "name": record.get("name") or record["kind"]}
        if self.in_celeba_layout() and self._metadata_text(PARTITION_FILE) is not None:
            return {"kind": "celeba", "name": "CelebA"}
        return {"kind": "images", "name": Path(str(self.root).rstrip("/")).name or "images"}

    def listing(self) -> Listing:
        files = sorted(self._files())
        partition_text = self._metadata_text(PARTITION_FILE)
        partition = _parse_partition(partition_text, PARTITION_FILE) if partition_text is not None else None
        identity_text = self._metadata_text(IDENTITY_FILE)
        identity = _parse_identity(identity_text) if identity_text is not None else {}
        attr_text = self._metadata_text(ATTR_FILE)
        attrs = _parse_attrs(attr_text, ATTR_FILE) if attr_text is not None else {}
        if not files:  # e.g. a shard folder given as the source
            raise BadInput(f"source {self.describe()}: holds no image files ({', '.join(IMAGE_SUFFIXES)})")

        entries: dict[str, list[Entry]] = {s: [] for s in SPLITS}
        skipped: list[dict] = []
        seen: dict[str, str] = {}
        digest = hashlib.sha256()
        for text in (partition_text, identity_text, attr_text):
            digest.update(hashlib.sha256((text or "").encode()).digest())
        for name, size in files:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # a POSIX name that is not UTF-8: keys and tar names must be text
                shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                digest.update(f"{shown}\0{size}\n".encode())
                skipped.append({"key": Path(shown).stem, "reason": f"file name {shown!r} is not UTF-8"})
                continue
            key = Path(name).stem
            digest.update(f"{name}\0{size}\n".encode())
            if size < 0:
                skipped.append({"key": key, "reason": f"{name} cannot be read (a dangling link or a link loop)"})
                continue
            if key in seen:
                skipped.append({"key": key, "reason": f"duplicate key: {name} (kept {seen[key]})"})
                continue
            seen[key] = name
            if partition is not None:
                split = partition.get(key)
                if split is None:
                    skipped.append({"key": key, "reason": f"not named in {PARTITION_FILE}"})
                    continue
            else:
                split = hash_split(key)
            entries[split].append(Entry(key, name, size))
        missing = sorted(set(partition) - set(seen)) if partition is not None else []
        metadata = {}
        for key in seen:
            meta = {}
            if key in identity:
                meta["identity"] = identity[key]
            if key in attrs:
                meta["attrs"] = attrs[key]
            metadata[key] = meta
        for split in SPLITS:
            entries[split].sort(key=lambda e: e.key)
        return Listing(entries, skipped, missing, metadata, digest.hexdigest())


class FolderSource(Source):
    """A folder of images: CelebA's root (with `img_align_celeba/`) or any tree of image files."""

    def __init__(self, root: str):
        self.root = root
        celeba_images = storage.join(root, "img_align_celeba")
        self.image_dir = celeba_images if storage.is_dir(celeba_images) else root

    def in_celeba_layout(self) -> bool:
        return self.image_dir != self.root

    def _files(self) -> list[tuple[str, int]]:
        return [(name, size) for name, size in storage.list_files(self.image_dir)
                if name.lower().endswith(IMAGE_SUFFIXES) and not name.rsplit("/", 1)[-1].startswith(".")]

    def read(self, name: str) -> bytes:
        return read_image(storage.join(self.image_dir, *name.split("/")))

    def _metadata_text(self, filename: str) -> str | None:
        return _text_if_present(storage.join(self.root, filename))


def read_image(location: str) -> bytes:
    """An image file's bytes (local or at a URL); one over the `image` cap is `SkipImage`, read no further."""
    try:
        return storage.read_capped(location, "image")
    except limits.OverCap as err:
        raise SkipImage(f"too large: {err}") from None


def _text_if_present(location: str) -> str | None:
    try:
        return metadata_text(storage.read_capped(location, "list"), location)
    except (FileNotFoundError, IsADirectoryError):
        return None


def metadata_text(data: bytes, where: str) -> str:
    """A metadata file's text: UTF-8, with or without a byte-order mark; anything else is one line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadInput(f"{where}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 4]!r}); save it "
                       "as UTF-8") from None


class ZipSource(Source):
    """The official `img_align_celeba.zip`, read in place; metadata files beside it or inside it."""

    def __init__(self, path: str):
        self.root = path
        file = storage.open_binary(path)
        try:
            self.zip = zipfile.ZipFile(file)
        except zipfile.BadZipFile:
            file.close()
            raise BadInput(f"source {path}: not a valid zip file") from None
        except UnicodeDecodeError as e:  # a member name flagged UTF-8 that is not
            file.close()
            raise BadInput(f"source {path}: a member name is flagged UTF-8 but is not ({e.reason} at byte "
                           f"{e.start}); re-create the zip") from None
        except ValueError as e:  # fsspec's HTTP file, when the server ignores Range headers
            file.close()
            if "range" not in str(e).lower():
                raise
            raise BadInput(f"source {path}: cannot be read in place: the server does not answer byte-range "
                           f"requests; download the zip and shard the local copy") from None
        self.infos = {i.filename: i for i in self.zip.infolist() if not i.is_dir()}

    def _files(self) -> list[tuple[str, int]]:
        return [(name, info.file_size) for name, info in self.infos.items()
                if name.lower().endswith(IMAGE_SUFFIXES) and not Path(name).name.startswith(".")
                and "__MACOSX" not in name]

    def member(self, name: str, cap: str) -> bytes:
        """The member `name`'s bytes under the cap `cap`: its declared size checked first, then the inflated
        bytes counted as they come (a header that lies about the size cannot pass)."""
        what = f"{self.root}:{name}"
        limits.check_size(what, self.infos[name].file_size, cap)
        with self.zip.open(self.infos[name]) as f:
            return limits.read_stream(f, what, cap)

    def read(self, name: str) -> bytes:
        try:
            return self.member(name, "image")
        except limits.OverCap as err:
            raise SkipImage(f"too large: {err}") from None
        except ZIP_MEMBER_ERRORS as err:
            raise SkipImage(f"damaged zip member: {one_line(err)}") from None

    def in_celeba_layout(self) -> bool:
        return any(name.startswith("img_align_celeba/") for name in self.infos)

    def _metadata_text(self, filename: str) -> str | None:
        beside = _text_if_present(storage.join(storage.parent(self.root), filename))
        if beside is not None:
            return beside
        for name in self.infos:
            if Path(name).name == filename:
                try:
                    data = self.member(name, "list")
                except ZIP_MEMBER_ERRORS as err:
                    raise BadInput(f"source {self.root}: member {name} is damaged ({type(err).__name__})") from None
                return metadata_text(data, f"{self.root}:{name}")
        return None

    def __getstate__(self):  # worker processes reopen the zip
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(state["root"])


def open_source(path: str | os.PathLike) -> Source:
    """The source at a local path or an fsspec URL: a folder, or a .zip file."""
    path = str(path)
    is_zip = path.lower().endswith(".zip")
    try:
        # a .zip URL is never asked whether it is a folder: over HTTP that can download the whole file
        if not (is_zip and storage.is_url(path)) and storage.is_dir(path):
            return FolderSource(path)
        found = storage.exists(path)
    except (ImportError, ValueError, OSError) as e:  # an unknown scheme, a missing fsspec backend, no access
        raise BadInput(f"source {path}: cannot be reached ({type(e).__name__}: {e})") from None
    if not found:
        raise BadInput(f"source {path}: does not exist")
    if is_zip:
        return ZipSource(path)
    raise BadInput(f"source {path}: expected a folder of images or a .zip file")
