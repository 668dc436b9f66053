"""The model registry: immutable versions and the champion, on a local path or an fsspec URL (torch-free).

    REGISTRY/train-vae/versions/<version>/  the model folder (graphs and any files they keep weights in,
                                            model.json, metrics.json, samples.png) and version.json
                                            {"version", "files": {name: sha256}}, written last
    REGISTRY/train-vae/champion.json        {"version", "path": "train-vae/versions/<version>", "record_sha256",
                                             "evidence": {...}, "run", "promoted_at"}

A version is immutable and published whole: locally it is staged under a temporary name and renamed into
place; on object storage the version is first claimed for its files (`.claim.json`, a conditional create), its
files are uploaded and `version.json` last, and a version exists only once its record does. `champion.json`
names the version relative to the registry, so any host that can read the registry can follow it.

Promotion compares evidence (`evidence_of(metrics)`): the test `nll_bpd`, the primary sample figure
(`sample_primary`: KID of prior samples at the best temperature, with its standard error and its `measure`), and what
makes two numbers comparable (split, the split's fingerprint, K, image size, and the sample measure). A version
replaces the champion only when its `nll_bpd` is lower AND its primary sample figure is not worse than the
champion's beyond `sample_tolerance` standard errors of the difference: promotion never trades pictures for bits.
A champion measured another way (no sample figure: a record from before them; another measure) is re-measured
first; a challenger without a sample figure against a champion with one is refused (it cannot show its pictures
are not worse). When neither has one, `nll_bpd` alone decides, as before. Non-finite numbers never win. The
champion is replaced by
compare-and-swap: read the record and a token, decide (slow work such as re-evaluating the champion happens
here, outside any lock), then write only if the token is unchanged; otherwise read and decide again. The swap
is a file lock (`fcntl.flock`) around read-compare-rename on local disks, a conditional PUT (`If-Match` on the
ETag, `If-None-Match: *` for the first champion) on S3, and a process lock for `memory://` (tests). Other URL
schemes can be read but not promoted into.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from vae_runtime import schemas, storage
from vae_runtime.atomic import atomic_write_bytes, fsync_tree
from vae_runtime.digest import sha256_file
from vae_runtime.errors import BadInput, VaeError
from vae_runtime.graph_files import referenced_files

PROJECT = "train-vae"
CHAMPION = "champion.json"
VERSION_RECORD = "version.json"
CLAIM = ".claim.json"  # on object storage: which files a registration of the version is uploading
COMPARABLE_KEYS = ("split", "split_fingerprint", "k", "image_size")
EVIDENCE_KEYS = (*COMPARABLE_KEYS, "nll_bpd", "elbo_bpd", "n_images", "shards", "config_hash",
                 "weights_sha256", "model_step")
SAMPLE_KEYS = ("metric", "of", "temperature", "value", "stderr", "measure", "temperatures", "n_images")
SAMPLE_TOLERANCE = 2.0  # standard errors of the difference a challenger's primary sample figure may be worse by
MAX_ROUNDS = 20
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]*")  # a version or a file in it: never a path


class RegistryError(VaeError):
    """The registry cannot be read or written as asked; the message names it."""


def plain_name(kind: str, name, where: str) -> str:
    """`name` when it names one entry (letters, digits, and `._@+-` after the first, no `..`): a version or a file
    name read from a record can never point outside its folder or the app's cache."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise RegistryError(f"{where}: {kind} {name!r} is not a plain name (letters, digits and . _ @ + -, no path)")
    return name


def project_dir(registry: str | os.PathLike) -> str:
    return storage.join(registry, PROJECT)


def version_path(version: str) -> str:
    """A version's folder relative to the registry (what `champion.json` holds)."""
    return f"{PROJECT}/versions/{version}"


def version_dir(registry: str | os.PathLike, version: str) -> str:
    plain_name("version", version, f"registry {registry}")
    return storage.join(registry, *version_path(version).split("/"))


def new_version(config_hash: str, started: datetime.datetime | None = None, run_id: str | None = None) -> str:
    """`<UTC start>-<config hash>[-<flow run id>]`: the same for every retry of one flow run, so a retried
    run finds its run folder (and resumes from its checkpoint) instead of starting a new version."""
    started = started or datetime.datetime.now(datetime.timezone.utc)
    stamp = started.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{config_hash[:8]}" + (f"-{run_id[:8]}" if run_id else "")


def _record_bytes(record: dict) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


# ----------------------------------------------------------------------------------------------------------
# Versions


def read_version_record(registry: str | os.PathLike, version: str) -> dict | None:
    return read_version_record_bytes(registry, version)[0]


def read_version_record_bytes(registry: str | os.PathLike, version: str) -> tuple[dict | None, bytes | None]:
    """A version's record and its bytes as stored (what a champion record pins), or (None, None)."""
    where = storage.join(version_dir(registry, version), VERSION_RECORD)
    try:
        raw = storage.read_capped(where, "json")
    except FileNotFoundError:
        return None, None
    record = schemas.load(raw, schemas.VERSION, where, "a version record", RegistryError)
    for name in record["files"]:
        plain_name("file", name, where)
    return record, raw


def register(registry: str | os.PathLike, version: str, files: dict[str, str | os.PathLike]) -> str:
    """Publish `files` ({name in the version: local source path}) as an immutable version; returns its location.

    A retried registration of the same files returns the existing version; other files are refused. On a local
    disk registrations take turns (a lock file), so two of one version at once end with one published whole."""
    for name in files:
        plain_name("file", name, f"registry version {version}")
    for name, src in files.items():  # a graph's external weights are published and hashed with it
        missing = [data for data in _graph_reads(src) if data not in files] if name.endswith(".onnx") else []
        if missing:
            raise RegistryError(f"registry version {version}: {name} keeps weights in {', '.join(missing)}, which "
                                "is not among the files published")
    hashes = {name: sha256_file(src) for name, src in sorted(files.items())}
    record = {"version": version, "files": hashes}
    target = version_dir(registry, version)
    if storage.is_url(registry):
        if not _already_published(registry, version, hashes, target):
            _claim(target, hashes)
            for name, src in files.items():
                storage.put_file(src, storage.join(target, name))
            storage.write_bytes_atomic(storage.join(target, VERSION_RECORD), _record_bytes(record))
        return target
    with _version_lock(registry):
        if not _already_published(registry, version, hashes, target):
            _stage_and_rename(Path(target), version, files, record)
    return target


def _graph_reads(src) -> list[str]:
    """The files the graph `src` keeps weights in; none where it is not a graph the runtime would load (the
    registry stores files as given: the runtime refuses such a graph, in one line, when it is loaded)."""
    try:
        return referenced_files(src)
    except BadInput:
        return []


def _already_published(registry, version: str, hashes: dict, target: str) -> bool:
    held = read_version_record(registry, version)
    if held is not None and held.get("files") != hashes:
        raise RegistryError(f"registry version {target} already holds {sorted(held.get('files', {}))} "
                            f"with other contents than {sorted(hashes)}: versions are immutable")
    return held is not None


def _claim(target: str, hashes: dict) -> None:
    """On object storage, the version's name taken for these files before any is uploaded: `CLAIM` created only
    where absent (`If-None-Match: *` on S3, a process lock on `memory://`). A claim for other files refuses this
    registration (two registrations of one version at once, or one left half-done); the same files go on (a
    retry). Schemes without conditional writes (gs://, http://) upload unclaimed."""
    url = storage.join(target, CLAIM)
    data = _record_bytes({"files": hashes})
    if not _create_if_absent(url, data):
        try:
            held = json.loads(storage.read_capped(url, "json")).get("files")
        except (ValueError, UnicodeDecodeError, AttributeError, FileNotFoundError):
            held = None
        if held != hashes:
            raise RegistryError(f"registry version {target} is claimed for other files ({url}): versions are "
                                f"immutable; register under another version, or remove the claim of an abandoned "
                                f"registration")


def _create_if_absent(url: str, data: bytes) -> bool:
    """Write `url` only where nothing is (`storage.create_if_absent`): True if this call created it."""
    try:
        return storage.create_if_absent(url, data)
    except OSError as err:
        raise RegistryError(f"{url}: conditional write failed ({type(err).__name__}: {err}); registration and "
                            "promotion on object storage need conditional writes (If-None-Match, If-Match)") from None


_lost_condition = storage.lost_condition  # S3 refused a conditional write: another writer got there first


@contextlib.contextmanager
def _version_lock(registry: str | os.PathLike):
    import fcntl

    folder = Path(project_dir(registry))  # beside .champion.lock: the versions folder holds versions only
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".register.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        yield


def _stage_and_rename(target_path: Path, version: str, files: dict, record: dict) -> None:
    """The version folder staged under a temporary name and renamed into place (under the registration lock)."""
    if target_path.exists():  # a folder without a record is not something this module writes
        raise RegistryError(f"registry version {target_path} exists without {VERSION_RECORD}; remove it")
    target_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in target_path.parent.glob(f".{version}.*"):  # a registration of this version that was killed
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f".{version}.", dir=target_path.parent) as tmp:
        staging = Path(tmp) / version
        staging.mkdir()
        for name, src in files.items():
            shutil.copyfile(src, staging / name)
        (staging / VERSION_RECORD).write_bytes(_record_bytes(record))
        fsync_tree(staging)
        staging.rename(target_path)


def list_versions(registry: str | os.PathLike) -> list[str]:
    """Published versions (those with a record), oldest name first."""
    folder = storage.join(project_dir(registry), "versions")
    if storage.is_url(folder):
        names = {rel.split("/")[0] for rel, _ in storage.list_files(folder) if rel.endswith("/" + VERSION_RECORD)}
    else:
        names = {p.parent.name for p in Path(folder).glob(f"*/{VERSION_RECORD}")} if Path(folder).is_dir() else set()
    return sorted(n for n in names if not n.startswith("."))


# ----------------------------------------------------------------------------------------------------------
# Evidence and the decision


def evidence_of(metrics: dict) -> dict:
    """What promotion compares, from a `metrics.json` (or from evidence: `evidence_of(evidence_of(m))` is
    `evidence_of(m)`). `sample_primary` is None when the metrics have no sample figures (older evaluations)."""
    evidence = {key: metrics.get(key) for key in EVIDENCE_KEYS}
    evidence["sample_primary"] = sample_primary(metrics.get("samples")) if "samples" in metrics \
        else _plain_sample_primary(metrics.get("sample_primary"))
    return evidence


def sample_primary(samples) -> dict | None:
    """The primary sample figure of a `metrics.json`'s `samples` and how it was measured: {"metric" (kid), "of"
    (prior), "temperature" (the best), "value", "stderr", "measure", "temperatures" and "n_images" (what a
    re-measurement of the champion needs to measure it the same way)}; None without one."""
    if not isinstance(samples, dict) or not isinstance(samples.get("primary"), dict) or not samples.get("measure"):
        return None
    primary = samples["primary"]
    return {"metric": primary.get("metric"), "of": primary.get("of"), "temperature": primary.get("temperature"),
            "value": primary.get("value"), "stderr": primary.get("stderr"), "measure": samples["measure"],
            "temperatures": samples.get("temperatures"), "n_images": samples.get("n_heldout")}


def _plain_sample_primary(value) -> dict | None:
    return {key: value.get(key) for key in SAMPLE_KEYS} if isinstance(value, dict) and value.get("measure") else None


def sample_measure(evidence: dict | None) -> str | None:
    """The identity of how the evidence's primary sample figure was measured, or None without one."""
    return ((evidence or {}).get("sample_primary") or {}).get("measure")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def comparable(a: dict | None, b: dict | None) -> bool:
    """Whether two evidences measured the same thing: same split, same images (fingerprint), same K and size, and
    their sample figures measured the same way (the same `measure`, or neither has one)."""
    if not a or not b or a.get("split_fingerprint") is None:
        return False
    return all(a.get(key) == b.get(key) for key in COMPARABLE_KEYS) and sample_measure(a) == sample_measure(b)


def difference(a: dict | None, b: dict) -> str:
    """Which comparability keys differ, in words."""
    a = a or {}
    differ = [f"{key} {a.get(key)!r} vs {b.get(key)!r}" for key in COMPARABLE_KEYS if a.get(key) != b.get(key)]
    if sample_measure(a) != sample_measure(b):
        differ.append(f"sample measure {sample_measure(a) or 'none'} vs {sample_measure(b) or 'none'}")
    return ", ".join(differ) or "no measurement"


def check_tolerance(sample_tolerance) -> float:
    """`sample_tolerance` as a float: finite and >= 0, else RegistryError naming it."""
    if not _finite(sample_tolerance) or sample_tolerance < 0:
        raise RegistryError(f"sample_tolerance: must be a finite number >= 0 (standard errors), got "
                            f"{sample_tolerance!r}")
    return float(sample_tolerance)


def _stderr(figure: dict) -> float:
    """A figure's standard error; a missing, negative or non-finite one counts as 0 (never widens the tolerance)."""
    se = figure.get("stderr")
    return float(se) if _finite(se) and se >= 0 else 0.0


def _figure_text(figure: dict) -> str:
    value = figure.get("value")
    text = f"{value:.4g}" if _finite(value) else repr(value)
    return text + (f" ± {figure['stderr']:.2g}" if _finite(figure.get("stderr")) else "")


def _metric_name(figure: dict) -> str:
    return str(figure.get("metric") or "sample metric").upper()


def compare_samples(champion: dict | None, challenger: dict | None,
                    sample_tolerance: float = SAMPLE_TOLERANCE) -> tuple[bool, str]:
    """Whether the challenger's primary sample figure is not worse than the champion's beyond `sample_tolerance`
    standard errors of the difference (sqrt(se_a^2 + se_b^2); a missing stderr counts as 0), and the words for it
    (both figures; lower is better). Either may be None (evidence without sample figures)."""
    tolerance = check_tolerance(sample_tolerance)
    if challenger is None:
        if champion is None:
            return True, ""
        return False, (f"the challenger has no sample figure while the champion has {_metric_name(champion)} "
                       f"{_figure_text(champion)}: its pictures cannot be shown not worse (evaluate it with samples)")
    name = _metric_name(challenger)
    if not _finite(challenger.get("value")):
        return False, f"{name} {challenger.get('value')!r} is not a finite number: never promoted"
    mine = f"{name} {_figure_text(challenger)}"
    if champion is None:
        return True, f"{mine} (the champion has no sample figure)"
    if not _finite(champion.get("value")):
        return True, f"{mine} vs the champion's {champion.get('value')!r}, which is not finite"
    se = math.hypot(_stderr(challenger), _stderr(champion))
    worse_by = challenger["value"] - champion["value"]
    versus = f"{mine} vs champion's {_figure_text(champion)}"
    if worse_by <= tolerance * se:
        return True, f"{versus}, within {tolerance:g} SE"
    return False, (f"{versus}: worse by {worse_by:.2g}, beyond {tolerance:g} SE ({tolerance * se:.2g}); "
                   "promotion never trades pictures for bits")


def decide(champion: dict | None, challenger: dict, sample_tolerance: float = SAMPLE_TOLERANCE) -> tuple[bool, str]:
    """Whether `challenger` evidence should replace the `champion` evidence (comparable, or None), and why: a lower
    test `nll_bpd` AND a primary sample figure not worse beyond `sample_tolerance` SE (`compare_samples`)."""
    check_tolerance(sample_tolerance)
    mine, theirs = challenger.get("sample_primary"), (champion or {}).get("sample_primary")
    if not _finite(challenger.get("nll_bpd")):
        return False, f"test nll_bpd {challenger.get('nll_bpd')!r} is not a finite number: never promoted"
    if mine is not None and not _finite(mine.get("value")):
        return False, f"{_metric_name(mine)} {mine.get('value')!r} is not a finite number: never promoted"
    if champion is None:
        return True, "no champion yet"
    if not _finite(champion.get("nll_bpd")):
        return True, f"the champion's nll_bpd {champion.get('nll_bpd')!r} is not finite"
    samples_ok, samples_why = compare_samples(theirs, mine, sample_tolerance)
    if challenger["nll_bpd"] >= champion["nll_bpd"]:
        return False, (f"test nll_bpd {challenger['nll_bpd']:.4f} does not beat the champion's "
                       f"{champion['nll_bpd']:.4f}" + (f" ({samples_why})" if samples_why else ""))
    beats = f"test nll_bpd {challenger['nll_bpd']:.4f} beats the champion's {champion['nll_bpd']:.4f}"
    if not samples_ok:
        return False, f"{beats} but {samples_why}"
    return True, beats + (f"; {samples_why}" if samples_why else "")


# ----------------------------------------------------------------------------------------------------------
# The champion record and its compare-and-swap


class _LocalChampion:
    """champion.json on a local disk: the swap holds an exclusive `flock` on a lock file beside it."""

    def __init__(self, registry: str | os.PathLike):
        self.folder = Path(project_dir(registry))
        self.path = self.folder / CHAMPION

    def read(self) -> tuple[dict | None, bytes | None]:
        try:
            data = storage.read_capped(self.path, "json")
        except FileNotFoundError:
            return None, None
        return _parse(data, self.path), data

    def swap(self, token: bytes | None, data: bytes) -> bool:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".champion.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
            current = storage.read_capped(self.path, "json") if self.path.exists() else None
            if current != token:
                return False
            atomic_write_bytes(self.path, data)
            return True


class _S3Champion:
    """champion.json on S3: conditional PUTs on its ETag (S3 has had them since 2024)."""

    def __init__(self, registry: str):
        self.url = storage.join(project_dir(registry), CHAMPION)

    def read(self) -> tuple[dict | None, str | None]:
        data, etag = storage.read_versioned(self.url)  # the body and the ETag of that same object
        return (None, None) if data is None else (_parse(data, self.url), etag)

    def swap(self, token: str | None, data: bytes) -> bool:
        if token is None:
            return _create_if_absent(self.url, data)
        return storage.replace_if_unchanged(self.url, token, data)  # a PUT with If-Match on the ETag


class _MemoryChampion:
    """champion.json on fsspec's in-process `memory://` file system: a process lock is the whole story."""

    def __init__(self, registry: str):
        self.url = storage.join(project_dir(registry), CHAMPION)

    def read(self) -> tuple[dict | None, bytes | None]:
        try:
            data = storage.read_capped(self.url, "json")
        except FileNotFoundError:
            return None, None
        return _parse(data, self.url), data

    def swap(self, token: bytes | None, data: bytes) -> bool:
        return storage.replace_if_unchanged(self.url, token, data)  # compared and written under the process lock


def _parse(data: bytes, where) -> dict:
    """champion.json's record, each field's type checked (`vae_runtime.schemas.CHAMPION`) and its versions plain names."""
    record = schemas.load(data, schemas.CHAMPION, str(where), "a champion record", RegistryError)
    for version in [record["version"], *(record.get("rolled_back") or [])]:
        plain_name("version", version, str(where))
    return record


def champion_store(registry: str | os.PathLike):
    """The champion record's read/compare-and-swap for this registry location."""
    location = str(registry)
    if not storage.is_url(location):
        return _LocalChampion(location)
    scheme = location.split("://", 1)[0]
    if scheme in ("s3", "s3a"):
        return _S3Champion(location)
    if scheme == "memory":
        return _MemoryChampion(location)
    raise RegistryError(f"registry {location}: promotion needs conditional writes (a local path, s3:// or "
                        f"memory://); {scheme}:// can be read but not promoted into")


def read_champion(registry: str | os.PathLike) -> dict | None:
    """The champion record, or None. Works on any registry location (read-only)."""
    location = str(registry)
    try:
        data = storage.read_capped(storage.join(project_dir(location), CHAMPION), "json")
    except FileNotFoundError:
        return None
    return _parse(data, storage.join(project_dir(location), CHAMPION))


def champion_evidence(record: dict | None) -> dict | None:
    """The evidence a champion record carries (records from before evidence carry their few keys at the top;
    records from before sample figures have `sample_primary` None, so the champion is re-measured)."""
    if record is None:
        return None
    return evidence_of(record.get("evidence") or {key: record.get(key) for key in EVIDENCE_KEYS})


Reevaluate = Callable[[dict, dict], dict]


def promote(registry: str | os.PathLike, version: str, metrics: dict, run: str | None = None,
            reevaluate: Reevaluate | None = None, store=None, sample_tolerance: float = SAMPLE_TOLERANCE) -> dict:
    """Make `version` the champion when its evidence beats the champion's (`decide`: a lower test nll_bpd and a
    primary sample figure not worse beyond `sample_tolerance` standard errors); safe with concurrent promoters.

    `reevaluate(champion_record, challenger_evidence)` measures the champion like the challenger (same test set,
    K and sample measure: the challenger's `sample_primary` names its temperatures and image count) and returns
    that evidence, or raises `RegistryError` when it cannot; it is called when the champion's evidence is not
    comparable (another test set or K, or its sample figure missing or measured another way). A challenger
    without a sample figure against a champion with one is not promoted. Returns {"promoted", "reason",
    "previous", "reevaluated"}.
    """
    sample_tolerance = check_tolerance(sample_tolerance)
    evidence = evidence_of(metrics)
    store = store or champion_store(registry)
    record, raw = read_version_record_bytes(registry, version)
    if record is None:
        raise RegistryError(f"registry version {version_dir(registry, version)}: not published (no "
                            f"{VERSION_RECORD}); register it first")
    for _ in range(MAX_ROUNDS):
        current, token = store.read()
        if current is not None and current.get("version") == version:
            return {"promoted": True, "reason": "already the champion", "previous": current, "reevaluated": None}
        if current is not None and version in (current.get("rolled_back") or []):
            why = (current.get("rollback") or {}).get("reason")
            return {"promoted": False, "previous": current, "reevaluated": None,
                    "reason": f"{version} was rolled back by an operator ({why}); it is never promoted again"}
        against, reevaluated = champion_evidence(current), None
        if current is not None and evidence["sample_primary"] is None and sample_measure(against) is not None:
            return {"promoted": False, "previous": current, "reevaluated": None,
                    "reason": f"champion {current['version']}: "
                              f"{compare_samples(against['sample_primary'], None, sample_tolerance)[1]}"}
        if current is not None and not comparable(against, evidence):
            if reevaluate is None:
                return {"promoted": False, "previous": current, "reevaluated": None,
                        "reason": f"not comparable with champion {current['version']} "
                                  f"({difference(against, evidence)}) and no way to re-evaluate it"}
            try:
                against = reevaluated = evidence_of(reevaluate(current, evidence))
            except RegistryError as err:
                return {"promoted": False, "previous": current, "reevaluated": None,
                        "reason": f"champion {current['version']} could not be re-evaluated: {err}"}
            if not comparable(against, evidence):
                return {"promoted": False, "previous": current, "reevaluated": reevaluated,
                        "reason": f"champion {current['version']} re-evaluated but still not comparable "
                                  f"({difference(against, evidence)})"}
        promoted, reason = decide(against, evidence, sample_tolerance)
        if reevaluated is not None:
            measured = "test set, K and sample measure" if evidence["sample_primary"] else "test set and K"
            reason += f" (champion {current['version']} re-evaluated on this {measured})"
        if not promoted:
            return {"promoted": False, "reason": reason, "previous": current, "reevaluated": reevaluated}
        new = _champion_record(version, raw, evidence, run)
        if current is not None and current.get("rolled_back"):  # retired by an operator: stays retired
            new["rolled_back"] = current["rolled_back"]
        if store.swap(token, _record_bytes(new)):
            return {"promoted": True, "reason": reason, "previous": current, "reevaluated": reevaluated}
        # the champion changed while this promoter decided: decide again against the new one
    raise RegistryError(f"registry {registry}: the champion changed {MAX_ROUNDS} times while promoting {version}")


def _champion_record(version: str, record_bytes: bytes, evidence: dict, run: str | None) -> dict:
    """`champion.json` naming `version`: it pins the version record's bytes as stored (what the runtime hashes)."""
    return {"version": version, "path": version_path(version),
            "record_sha256": hashlib.sha256(record_bytes).hexdigest(), "evidence": evidence, "run": run,
            **{key: evidence[key] for key in ("nll_bpd", "split", "k")},
            "promoted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def rollback(registry: str | os.PathLike, version: str, reason: str, store=None) -> dict:
    """Make the published `version` the champion whatever the evidence: an operator's decision (the champion
    fails in a way its score does not show). The record keeps the reason, and every version rolled back from
    (`rolled_back`), which promotion never makes champion again; later versions are compared against this one's
    evidence as usual. Returns {"champion": the new record, "previous": the record it replaced}."""
    if not isinstance(reason, str) or not reason.strip():
        raise RegistryError("rollback: say why (--reason): the champion record keeps it")
    record, raw = read_version_record_bytes(registry, version)
    if record is None:
        raise RegistryError(f"registry version {version_dir(registry, version)}: not published (no "
                            f"{VERSION_RECORD}); published versions: {', '.join(list_versions(registry)) or 'none'}")
    metrics = _version_metrics(registry, version, record)
    evidence = evidence_of(metrics)
    store = store or champion_store(registry)
    for _ in range(MAX_ROUNDS):
        current, token = store.read()
        gone = [] if current is None else [*(current.get("rolled_back") or []), current["version"]]
        new = {**_champion_record(version, raw, evidence, _absolute_or_none(metrics.get("run"))),
               "rollback": {"reason": reason.strip(), "from": current and current["version"]},
               "rolled_back": sorted(set(gone) - {version})}
        if store.swap(token, _record_bytes(new)):
            return {"champion": new, "previous": current}
    raise RegistryError(f"registry {registry}: the champion changed {MAX_ROUNDS} times during the rollback")


def _absolute_or_none(run) -> str | None:
    """A run folder as the champion record keeps it: absolute, or none (a relative one depended on the directory
    the evaluation ran in; without one the flow looks in its `runs` folder by version)."""
    return run if isinstance(run, str) and os.path.isabs(run) else None


def _version_metrics(registry, version: str, record: dict) -> dict:
    """The version's `metrics.json`, checked against its record (what its evidence and run are read from)."""
    where = storage.join(version_dir(registry, version), "metrics.json")
    want = record["files"].get("metrics.json")
    if want is None:
        return {}
    data = storage.read_capped(where, "json")
    if hashlib.sha256(data).hexdigest() != want:
        raise RegistryError(f"{where}: sha256 differs from the version record (damaged or replaced)")
    return schemas.load(data, schemas.METRICS, where, "a metrics record", RegistryError)
