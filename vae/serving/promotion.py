"""Promotion: which published version is the champion, decided on evidence (torch-free).

Promotion compares evidence (`evidence_of(metrics)`): the test `nll_bpd`, the primary sample figure
(`sample_primary`: KID of prior samples at the best temperature, with its standard error and its `measure`), and what
makes two numbers comparable (split, the split's fingerprint, K, image size, and the sample measure). A version
replaces the champion only when its `nll_bpd` is lower AND its primary sample figure is not worse than the
champion's beyond `sample_tolerance` standard errors of the difference: promotion never trades pictures for bits.
A champion measured another way (no sample figure: a record from before them; another measure) is re-measured
first; a challenger without a sample figure against a champion with one is refused (it cannot show its pictures
are not worse). When neither has one, `nll_bpd` alone decides, as before. Non-finite numbers never win.

The champion is replaced by compare-and-swap (`vae.serving.champion_store`): read the record and a token, decide,
then write only if the token is unchanged; otherwise read and decide again. An operator's `rollback` makes a
published version the champion whatever the evidence, and archives the versions it replaces (`vae.serving.notes`):
an archived version is never promoted (champion.json's `rolled_back` list, which older registries alone have, is
still read and still written).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
from typing import Callable

from vae_runtime import schemas, storage
from vae_runtime.registry import (VERSION_RECORD, RegistryError, archived_why, list_versions,
                                  read_version_record_bytes, version_dir, version_path)
from vae_runtime.schemas import finite
from vae.serving import notes
from vae.serving.champion_store import champion_store
from vae.serving.versions import record_bytes

COMPARABLE_KEYS = ("split", "split_fingerprint", "k", "image_size")
EVIDENCE_KEYS = (*COMPARABLE_KEYS, "nll_bpd", "elbo_bpd", "n_images", "shards", "config_hash",
                 "weights_sha256", "model_step")
SAMPLE_KEYS = ("metric", "of", "temperature", "value", "stderr", "measure", "temperatures", "n_images")
SAMPLE_TOLERANCE = 2.0  # standard errors of the difference a challenger's primary sample figure may be worse by
MAX_ROUNDS = 20


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
    if not finite(sample_tolerance) or sample_tolerance < 0:
        raise RegistryError(f"sample_tolerance: must be a finite number >= 0 (standard errors), got "
                            f"{sample_tolerance!r}")
    return float(sample_tolerance)


def _stderr(figure: dict) -> float:
    """A figure's standard error; a missing, negative or non-finite one counts as 0 (never widens the tolerance)."""
    se = figure.get("stderr")
    return float(se) if finite(se) and se >= 0 else 0.0


def _figure_text(figure: dict) -> str:
    value = figure.get("value")
    text = f"{value:.4g}" if finite(value) else repr(value)
    return text + (f" ± {figure['stderr']:.2g}" if finite(figure.get("stderr")) else "")


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
    if not finite(challenger.get("value")):
        return False, f"{name} {challenger.get('value')!r} is not a finite number: never promoted"
    mine = f"{name} {_figure_text(challenger)}"
    if champion is None:
        return True, f"{mine} (the champion has no sample figure)"
    if not finite(champion.get("value")):
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
    if not finite(challenger.get("nll_bpd")):
        return False, f"test nll_bpd {challenger.get('nll_bpd')!r} is not a finite number: never promoted"
    if mine is not None and not finite(mine.get("value")):
        return False, f"{_metric_name(mine)} {mine.get('value')!r} is not a finite number: never promoted"
    if champion is None:
        return True, "no champion yet"
    if not finite(champion.get("nll_bpd")):
        return True, f"the champion's nll_bpd {champion.get('nll_bpd')!r} is not finite"
    samples_ok, samples_why = compare_samples(theirs, mine, sample_tolerance)
    if challenger["nll_bpd"] >= champion["nll_bpd"]:
        return False, (f"test nll_bpd {challenger['nll_bpd']:.4f} does not beat the champion's "
                       f"{champion['nll_bpd']:.4f}" + (f" ({samples_why})" if samples_why else ""))
    beats = f"test nll_bpd {challenger['nll_bpd']:.4f} beats the champion's {champion['nll_bpd']:.4f}"
    if not samples_ok:
        return False, f"{beats} but {samples_why}"
    return True, beats + (f"; {samples_why}" if samples_why else "")


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
        why = archived_why(registry, version, current)
        if why:
            return {"promoted": False, "previous": current, "reevaluated": None,
                    "reason": f"{version} is archived: {why}; it is never promoted again"}
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
        if store.swap(token, record_bytes(new)):
            return {"promoted": True, "reason": reason, "previous": current, "reevaluated": reevaluated}
        # the champion changed while this promoter decided: decide again against the new one
    raise RegistryError(f"registry {registry}: the champion changed {MAX_ROUNDS} times while promoting {version}")


def _champion_record(version: str, raw: bytes, evidence: dict, run: str | None) -> dict:
    """`champion.json` naming `version`: it pins the version record's bytes as stored (what the runtime hashes)."""
    return {"version": version, "path": version_path(version),
            "record_sha256": hashlib.sha256(raw).hexdigest(), "evidence": evidence, "run": run,
            **{key: evidence[key] for key in ("nll_bpd", "split", "k")},
            "promoted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def rollback(registry: str | os.PathLike, version: str, reason: str, store=None) -> dict:
    """Make the published `version` the champion whatever the evidence: an operator's decision (the champion
    fails in a way its score does not show). The record keeps the reason, and every version rolled back from
    (`rolled_back`), each archived too, which promotion never makes champion again; later versions are compared against this one's
    evidence as usual. Returns {"champion": the new record, "previous": the record it replaced}."""
    if not isinstance(reason, str) or not reason.strip():
        raise RegistryError("rollback: say why (--reason): the champion record keeps it")
    record, raw = read_version_record_bytes(registry, version)
    if record is None:
        raise RegistryError(f"registry version {version_dir(registry, version)}: not published (no "
                            f"{VERSION_RECORD}); published versions: {', '.join(list_versions(registry)) or 'none'}")
    metrics = version_metrics(registry, version, record)
    evidence = evidence_of(metrics)
    store = store or champion_store(registry)
    for _ in range(MAX_ROUNDS):
        current, token = store.read()
        gone = [] if current is None else [*(current.get("rolled_back") or []), current["version"]]
        new = {**_champion_record(version, raw, evidence, _absolute_or_none(metrics.get("run"))),
               "rollback": {"reason": reason.strip(), "from": current and current["version"]},
               "rolled_back": sorted(set(gone) - {version})}
        if store.swap(token, record_bytes(new)):
            notes.unarchive(registry, version)  # the operator brought it back
            if current is not None and current["version"] != version:
                notes.archive(registry, current["version"], f"rolled back by an operator ({reason.strip()})",
                              replaced=True)
            return {"champion": new, "previous": current}
    raise RegistryError(f"registry {registry}: the champion changed {MAX_ROUNDS} times during the rollback")


def _absolute_or_none(run) -> str | None:
    """A run folder as the champion record keeps it: absolute, or none (a relative one depended on the directory
    the evaluation ran in; without one the flow looks in its `runs` folder by version)."""
    return run if isinstance(run, str) and os.path.isabs(run) else None


def version_metrics(registry, version: str, record: dict) -> dict:
    """The version's `metrics.json`, checked against its record (what its evidence and run are read from)."""
    where = storage.join(version_dir(registry, version), "metrics.json")
    want = record["files"].get("metrics.json")
    if want is None:
        return {}
    data = storage.read_capped(where, "json")
    if hashlib.sha256(data).hexdigest() != want:
        raise RegistryError(f"{where}: sha256 differs from the version record (damaged or replaced)")
    return schemas.load(data, schemas.METRICS, where, "a metrics record", RegistryError)
