"""The registry: immutable versions, the champion rule (comparable evidence only, never a non-finite number),
and compare-and-swap promotion that stays right with concurrent promoters in separate processes."""

from __future__ import annotations

import json
import math
import multiprocessing
import random
from pathlib import Path

import pytest

from vae_runtime import registry as reg
from vae_runtime import storage
from vae_runtime.digest import sha256_file
from vae.serving import promotion, versions
from vae.serving.champion_store import champion_store

FINGERPRINT = "f" * 64


def evidence(nll, k=100, fingerprint=FINGERPRINT, split="test", weights="w"):
    return {"nll_bpd": nll, "elbo_bpd": 1.0, "k": k, "split": split, "split_fingerprint": fingerprint,
            "image_size": 64, "n_images": 10, "shards": "shards", "config_hash": "h", "weights_sha256": weights,
            "model_step": 1}


def publish(registry, version: str, tmp_path: Path) -> str:
    src = tmp_path / f"{version}.bin"
    src.write_bytes(version.encode())
    return versions.register(registry, version, {"decoder.onnx": src, "model.json": src})


def test_a_version_is_published_whole_with_a_record_of_every_file(tmp_path):
    target = Path(publish(tmp_path, "v1", tmp_path))
    record = json.loads((target / "version.json").read_text())
    assert record["version"] == "v1" and sorted(record["files"]) == ["decoder.onnx", "model.json"]
    assert record["files"]["decoder.onnx"] == sha256_file(target / "decoder.onnx")
    assert reg.list_versions(tmp_path) == ["v1"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_version_is_immutable(tmp_path):
    publish(tmp_path, "v1", tmp_path)
    assert publish(tmp_path, "v1", tmp_path)  # a retried registration of the same files is a no-op
    other = tmp_path / "other.bin"
    other.write_bytes(b"other weights")
    with pytest.raises(reg.RegistryError, match="versions are immutable"):
        versions.register(tmp_path, "v1", {"decoder.onnx": other, "model.json": other})
    assert (tmp_path / "train-vae/versions/v1/decoder.onnx").read_bytes() == b"v1"


def half_registered_then_other_files(registry: str, tmp_path: Path, monkeypatch) -> None:
    """On object storage: a registration dies mid-upload; one of other files under the same version is refused
    (it would have mixed its files with the first's), and the first's retry publishes its own files whole."""
    first, other = tmp_path / "first.bin", tmp_path / "other.bin"
    first.write_bytes(b"first weights")
    other.write_bytes(b"other weights")
    uploaded = []
    real_put = storage.put_file

    def dies_after_one(src, dst):
        if uploaded:
            raise OSError("connection reset")
        uploaded.append(dst)
        real_put(src, dst)

    monkeypatch.setattr(storage, "put_file", dies_after_one)
    with pytest.raises(OSError, match="connection reset"):
        versions.register(registry, "v1", {"decoder.onnx": first, "model.json": first})
    monkeypatch.setattr(storage, "put_file", real_put)
    with pytest.raises(reg.RegistryError, match="claimed for other files"):
        versions.register(registry, "v1", {"decoder.onnx": other, "model.json": other})
    assert reg.read_version_record(registry, "v1") is None and reg.list_versions(registry) == []
    target = versions.register(registry, "v1", {"decoder.onnx": first, "model.json": first})  # the retry
    assert reg.read_version_record(registry, "v1")["files"] == {"decoder.onnx": sha256_file(first),
                                                                 "model.json": sha256_file(first)}
    for name in ("decoder.onnx", "model.json"):
        assert storage.read_bytes(storage.join(target, name)) == b"first weights"


def test_a_half_registered_version_on_object_storage_takes_no_other_files(tmp_path, monkeypatch):
    half_registered_then_other_files("memory://claims", tmp_path, monkeypatch)


def test_champion_is_replaced_only_by_a_better_comparable_version(tmp_path):
    for version in ("v1", "v2", "v3", "v4"):
        publish(tmp_path, version, tmp_path)
    assert promotion.promote(tmp_path, "v1", evidence(5.0))["promoted"]
    outcome = promotion.promote(tmp_path, "v2", evidence(5.2))
    assert not outcome["promoted"] and "does not beat" in outcome["reason"]
    outcome = promotion.promote(tmp_path, "v3", evidence(4.0, k=10))  # another K and no way to re-evaluate
    assert not outcome["promoted"] and "not comparable" in outcome["reason"] and "k 100 vs 10" in outcome["reason"]
    outcome = promotion.promote(tmp_path, "v3", evidence(4.0, fingerprint="0" * 64))  # other test images
    assert not outcome["promoted"] and "split_fingerprint" in outcome["reason"]
    assert promotion.promote(tmp_path, "v4", evidence(4.9))["promoted"]
    champion = reg.read_champion(tmp_path)
    assert champion["version"] == "v4" and champion["path"] == "train-vae/versions/v4"  # relative to the registry
    assert (tmp_path / champion["path"] / "decoder.onnx").read_bytes() == b"v4"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "5.0", True, 10**400])  # 10**400: no float
def test_a_non_finite_score_is_never_promoted_even_without_a_champion(tmp_path, bad):
    publish(tmp_path, "v1", tmp_path)
    outcome = promotion.promote(tmp_path, "v1", evidence(bad))
    assert not outcome["promoted"] and "not a finite number" in outcome["reason"]
    assert reg.read_champion(tmp_path) is None


def test_a_champion_with_a_non_finite_score_is_replaced(tmp_path):
    publish(tmp_path, "v2", tmp_path)
    (tmp_path / "train-vae").mkdir(exist_ok=True)
    (tmp_path / "train-vae/champion.json").write_text(json.dumps({"version": "v1", "evidence": evidence(math.nan)}))
    assert promotion.promote(tmp_path, "v2", evidence(6.0))["promoted"]


def test_an_incomparable_champion_is_re_evaluated_before_deciding(tmp_path):
    publish(tmp_path, "v1", tmp_path)
    publish(tmp_path, "v2", tmp_path)
    promotion.promote(tmp_path, "v1", evidence(5.0, fingerprint="old" * 20))
    seen = []

    def reevaluate(champion, challenger):
        seen.append((champion["version"], challenger["split_fingerprint"], challenger["k"]))
        return evidence(4.5)  # the champion on the new test set

    outcome = promotion.promote(tmp_path, "v2", evidence(4.8), reevaluate=reevaluate)
    assert seen == [("v1", FINGERPRINT, 100)]
    assert not outcome["promoted"] and "4.8000 does not beat the champion's 4.5000" in outcome["reason"]
    assert outcome["reevaluated"]["nll_bpd"] == 4.5 and "re-evaluated" in outcome["reason"]

    def unavailable(champion, challenger):
        raise reg.RegistryError("its run folder runs/v1 is gone")

    outcome = promotion.promote(tmp_path, "v2", evidence(1.0), reevaluate=unavailable)
    assert not outcome["promoted"] and "could not be re-evaluated: its run folder runs/v1 is gone" in outcome["reason"]
    assert reg.read_champion(tmp_path)["version"] == "v1"


# ------------------------------------------------------------------------------------------------------------
# Promotion never trades pictures for bits: the primary sample figure (KID) beside nll_bpd


MEASURE = "0123456789abcdef"


def with_kid(nll, kid, stderr=0.001, measure=MEASURE, **kw):
    """Evidence with a primary sample figure (as `evidence_of` makes from metrics with `samples`)."""
    return {**evidence(nll, **kw), "sample_primary": {
        "metric": "kid", "of": "prior", "temperature": 0.8, "value": kid, "stderr": stderr, "measure": measure,
        "temperatures": [0.8, 1.0], "n_images": 500}}


def metrics_with_samples(nll, kid, stderr=0.001, measure=MEASURE):
    """A `metrics.json` as evaluation writes it now: `samples` with its primary figure and measure."""
    figure = {"value": kid, "stderr": stderr}
    return {**evidence(nll), "run": "runs/x", "samples": {
        "format": 1, "primary": {"metric": "kid", "of": "prior", "temperature": 0.8, **figure}, "measure": measure,
        "temperatures": [0.8, 1.0], "n_heldout": 500, "n_train": 500, "n_generated": 500,
        "floor": {"kid": {"value": 0.0001, "stderr": 0.0001}}, "prior": {"0.8": {"kid": figure}}}}


def test_evidence_carries_the_primary_sample_figure_and_its_measure():
    ev = promotion.evidence_of(metrics_with_samples(4.9, 0.0123, 0.0011))
    assert ev["sample_primary"] == {"metric": "kid", "of": "prior", "temperature": 0.8, "value": 0.0123,
                                    "stderr": 0.0011, "measure": MEASURE, "temperatures": [0.8, 1.0],
                                    "n_images": 500}
    assert promotion.evidence_of(ev) == ev  # evidence passed where metrics are expected (the CLI, apps' tests)
    assert promotion.evidence_of(evidence(4.9))["sample_primary"] is None  # metrics from before sample figures
    assert promotion.comparable(ev, promotion.evidence_of(metrics_with_samples(5.0, 0.1)))
    other = promotion.evidence_of(metrics_with_samples(5.0, 0.1, measure="fedcba9876543210"))
    assert not promotion.comparable(ev, other) and "sample measure 0123456789abcdef vs fedcba9876543210" in \
        promotion.difference(ev, other)
    assert not promotion.comparable(promotion.evidence_of(evidence(5.0)), ev)
    assert promotion.difference(evidence(5.0), ev) == "sample measure none vs 0123456789abcdef"


def test_decide_needs_lower_bits_and_a_kid_not_worse_beyond_the_tolerance():
    champion = with_kid(4.95, 0.0120, 0.0010)
    # lower nll, KID worse by 0.0030 > 2 x sqrt(0.0011^2 + 0.0010^2) = 0.0030 (0.00297): not promoted
    promoted, reason = promotion.decide(champion, with_kid(4.91, 0.0150, 0.0011))
    assert not promoted
    assert "test nll_bpd 4.9100 beats the champion's 4.9500 but KID 0.015 ± 0.0011 vs champion's 0.012 ± 0.001" \
        in reason and "beyond 2 SE" in reason
    # lower nll, KID worse but within 2 SE: promoted, and the reason names both figures
    promoted, reason = promotion.decide(champion, with_kid(4.91, 0.0123, 0.0011))
    assert promoted
    assert reason == "test nll_bpd 4.9100 beats the champion's 4.9500; KID 0.0123 ± 0.0011 vs champion's " \
                     "0.012 ± 0.001, within 2 SE"
    # higher nll: not promoted, however good the pictures
    promoted, reason = promotion.decide(champion, with_kid(4.99, 0.0001))
    assert not promoted and reason.startswith("test nll_bpd 4.9900 does not beat the champion's 4.9500 (KID")
    # the tolerance is respected: 0 refuses any worse KID; a wide one lets more through
    assert not promotion.decide(champion, with_kid(4.91, 0.01201, 0.0011), sample_tolerance=0.0)[0]
    assert promotion.decide(champion, with_kid(4.91, 0.0120, 0.0011), sample_tolerance=0.0)[0]  # equal is not worse
    assert promotion.decide(champion, with_kid(4.91, 0.0150, 0.0011), sample_tolerance=3.0)[0]
    # missing standard errors count as 0: any worse KID is beyond the tolerance
    assert not promotion.decide(with_kid(4.95, 0.0120, None), with_kid(4.91, 0.01201, None))[0]
    assert promotion.decide(with_kid(4.95, 0.0120, None), with_kid(4.91, 0.0110, None))[0]
    with pytest.raises(reg.RegistryError, match="sample_tolerance"):
        promotion.decide(champion, with_kid(4.91, 0.0123), sample_tolerance=-1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None, "0.01", 10**400])
def test_a_non_finite_kid_never_wins(bad):
    promoted, reason = promotion.decide(with_kid(4.95, 0.0120), with_kid(4.0, bad))
    assert not promoted and "KID" in reason and "not a finite number" in reason
    assert not promotion.decide(None, with_kid(4.0, bad))[0]  # not even without a champion
    # a non-finite stderr counts as 0, never as an infinite (or undefined) tolerance
    for se in (math.nan, math.inf):
        assert not promotion.decide(with_kid(4.95, 0.0120, se), with_kid(4.0, 0.0121, se), sample_tolerance=1e9)[0]
    # a champion whose KID is not finite is beaten by a finite one (with a lower nll)
    assert promotion.decide(with_kid(4.95, bad), with_kid(4.9, 0.5))[0]


def test_promote_keeps_a_champion_whose_pictures_are_better(tmp_path):
    for version in ("v1", "v2", "v3"):
        publish(tmp_path, version, tmp_path)
    assert promotion.promote(tmp_path, "v1", metrics_with_samples(5.0, 0.0120))["promoted"]
    outcome = promotion.promote(tmp_path, "v2", metrics_with_samples(4.5, 0.0500))  # fewer bits, worse faces
    assert not outcome["promoted"] and "KID 0.05 ± 0.001 vs champion's 0.012 ± 0.001" in outcome["reason"]
    outcome = promotion.promote(tmp_path, "v3", metrics_with_samples(4.8, 0.0125), sample_tolerance=5.0)
    assert outcome["promoted"] and "within 5 SE" in outcome["reason"]
    champion = reg.read_champion(tmp_path)
    assert champion["version"] == "v3" and champion["evidence"]["sample_primary"]["value"] == 0.0125
    with pytest.raises(reg.RegistryError, match="sample_tolerance"):
        promotion.promote(tmp_path, "v2", metrics_with_samples(4.0, 0.01), sample_tolerance=math.nan)


def test_a_champion_without_sample_figures_or_measured_another_way_is_re_measured(tmp_path):
    for version in ("v1", "v2", "v3"):
        publish(tmp_path, version, tmp_path)
    (tmp_path / "train-vae").mkdir(exist_ok=True)
    old_record = {"version": "v1", "path": "train-vae/versions/v1", "evidence": evidence(5.0), "nll_bpd": 5.0}
    (tmp_path / "train-vae/champion.json").write_text(json.dumps(old_record))  # a record from before samples
    seen = []

    def reevaluate(champion, challenger):
        seen.append((champion["version"], promotion.sample_measure(promotion.champion_evidence(champion)),
                     challenger["sample_primary"]["measure"], challenger["sample_primary"]["temperatures"],
                     challenger["sample_primary"]["n_images"]))
        return metrics_with_samples(5.0, 0.0100)  # the champion measured as the challenger was

    outcome = promotion.promote(tmp_path, "v2", metrics_with_samples(4.9, 0.0200), reevaluate=reevaluate)
    assert seen == [("v1", None, MEASURE, [0.8, 1.0], 500)]
    assert outcome["reevaluated"]["sample_primary"]["value"] == 0.0100  # the re-measured figure decided
    assert not outcome["promoted"] and "vs champion's 0.01 ± 0.001" in outcome["reason"]
    assert "re-evaluated on this test set, K and sample measure" in outcome["reason"]
    assert reg.read_champion(tmp_path)["version"] == "v1"

    # a champion measured another way (other weights file, temperatures, image count): re-measured too
    (tmp_path / "train-vae/champion.json").write_text(json.dumps(
        {**old_record, "evidence": with_kid(5.0, 0.0001, measure="ffffffffffffffff")}))
    seen.clear()
    outcome = promotion.promote(tmp_path, "v2", metrics_with_samples(4.9, 0.0200), reevaluate=reevaluate)
    assert seen[0][1] == "ffffffffffffffff" and not outcome["promoted"]  # 0.0001 was not measured like 0.0200
    assert outcome["reevaluated"]["sample_primary"]["value"] == 0.0100

    # without a way to re-measure it, nothing is promoted, and the reason says the sample measure differs
    outcome = promotion.promote(tmp_path, "v2", metrics_with_samples(4.0, 0.0001))
    assert not outcome["promoted"] and "sample measure ffffffffffffffff vs 0123456789abcdef" in outcome["reason"]

    # a re-measurement that still measures another way decides nothing
    outcome = promotion.promote(tmp_path, "v2", metrics_with_samples(4.0, 0.0001),
                          reevaluate=lambda c, e: metrics_with_samples(5.0, 0.01, measure="eeeeeeeeeeeeeeee"))
    assert not outcome["promoted"] and "still not comparable" in outcome["reason"]

    # re-measured and beaten on both: promoted
    outcome = promotion.promote(tmp_path, "v3", metrics_with_samples(4.9, 0.0090), reevaluate=reevaluate)
    assert outcome["promoted"] and reg.read_champion(tmp_path)["version"] == "v3"


def test_a_challenger_without_sample_figures_never_replaces_a_champion_with_them(tmp_path):
    """Older code (or a metrics.json from before sample figures) cannot show its pictures are not worse: refused,
    without re-measuring the champion. With no sample figures on either side nll_bpd decides, as before."""
    for version in ("v1", "v2"):
        publish(tmp_path, version, tmp_path)
    promotion.promote(tmp_path, "v1", metrics_with_samples(5.0, 0.0120))

    def reevaluate(champion, challenger):
        raise AssertionError("no re-evaluation for a challenger that cannot be compared on pictures")

    outcome = promotion.promote(tmp_path, "v2", evidence(3.0), reevaluate=reevaluate)
    assert not outcome["promoted"] and "champion v1: the challenger has no sample figure" in outcome["reason"]
    assert reg.read_champion(tmp_path)["version"] == "v1"


class RacingStore:
    """A champion store in which another promoter writes between this promoter's read and its swap, `times`
    times: the deterministic form of a race."""

    def __init__(self, registry, competitors):
        self.inner, self.competitors, self.swaps = champion_store(registry), list(competitors), 0

    def read(self):
        return self.inner.read()

    def swap(self, token, data):
        self.swaps += 1
        if self.competitors:
            version, nll = self.competitors.pop(0)
            _, now = self.inner.read()
            record = {"version": version, "path": reg.version_path(version), "evidence": evidence(nll)}
            assert self.inner.swap(now, json.dumps(record).encode())
        return self.inner.swap(token, data)


def test_a_lost_swap_reads_the_new_champion_and_decides_again(tmp_path):
    for version in ("v1", "v2", "v3"):
        publish(tmp_path, version, tmp_path)
    promotion.promote(tmp_path, "v1", evidence(6.0))
    # v3 (4.0) lands while v2 (5.0) decides: v2 must not overwrite the better champion
    store = RacingStore(tmp_path, [("v3", 4.0)])
    outcome = promotion.promote(tmp_path, "v2", evidence(5.0), store=store)
    assert store.swaps == 1 and not outcome["promoted"] and outcome["previous"]["version"] == "v3"
    assert reg.read_champion(tmp_path)["version"] == "v3"
    # a worse competitor lands first: the promoter re-decides against it and still wins, with a second swap
    store = RacingStore(tmp_path, [("v1", 4.5)])
    outcome = promotion.promote(tmp_path, "v2", evidence(3.0), store=store)
    assert store.swaps == 2 and outcome["promoted"] and outcome["previous"]["version"] == "v1"
    assert reg.read_champion(tmp_path)["version"] == "v2"


def test_promotion_gives_up_with_one_line_when_the_champion_never_settles(tmp_path):
    publish(tmp_path, "v2", tmp_path)
    store = RacingStore(tmp_path, [("v1", 9.0 + i) for i in range(promotion.MAX_ROUNDS)])
    with pytest.raises(reg.RegistryError, match="changed 20 times"):
        promotion.promote(tmp_path, "v2", evidence(5.0), store=store)


def test_an_unpublished_version_cannot_be_promoted(tmp_path):
    with pytest.raises(reg.RegistryError, match="not published"):
        promotion.promote(tmp_path, "ghost", evidence(1.0))


def test_memory_registry_promotes_and_other_schemes_are_refused_with_one_line(tmp_path):
    registry = f"memory://registry-{tmp_path.name}"
    publish(registry, "v1", tmp_path)
    publish(registry, "v2", tmp_path)
    assert promotion.promote(registry, "v1", evidence(5.0))["promoted"]
    assert not promotion.promote(registry, "v2", evidence(5.5))["promoted"]
    assert reg.read_champion(registry)["version"] == "v1" and reg.list_versions(registry) == ["v1", "v2"]
    with pytest.raises(reg.RegistryError, match=r"gs:// can be read but not promoted into"):
        champion_store("gs://bucket/registry")


# ------------------------------------------------------------------------------------------------------------
# Real processes racing on one local registry


def _promoter(registry: str, version: str, nll: float, barrier) -> None:
    barrier.wait()
    promotion.promote(registry, version, evidence(nll))


def _reader(registry: str, stop, bad) -> None:
    path = Path(registry) / "train-vae" / "champion.json"
    while not stop.is_set():
        try:
            record = json.loads(path.read_bytes())
            if "version" not in record:
                bad.value += 1
        except FileNotFoundError:
            pass
        except ValueError:  # a torn or partial record
            bad.value += 1


@pytest.mark.slow
def test_concurrent_promoters_always_leave_the_best_comparable_version(tmp_path):
    """120 trials: 4 processes promote random scores at once over a champion at 6.0, while a reader process
    parses champion.json as fast as it can. Every trial must end with the best score as champion (no lost
    update, never the worse one) and the reader must never see a torn record."""
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(13)
    stop, bad = ctx.Event(), ctx.Value("i", 0)
    wrong = []
    for trial in range(120):
        registry = str(tmp_path / f"r{trial}")
        scores = [round(rng.uniform(3.0, 7.0), 4) for _ in range(4)]
        for i in range(4):
            publish(registry, f"v{i}", tmp_path)
        publish(registry, "base", tmp_path)
        promotion.promote(registry, "base", evidence(6.0))
        barrier = ctx.Barrier(4)
        reader = ctx.Process(target=_reader, args=(registry, stop, bad))
        reader.start()
        procs = [ctx.Process(target=_promoter, args=(registry, f"v{i}", s, barrier)) for i, s in enumerate(scores)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        stop.set()
        reader.join(10)
        stop.clear()
        assert all(p.exitcode == 0 for p in procs)
        best = min([6.0, *scores])
        champion = reg.read_champion(registry)
        if champion["nll_bpd"] != best:
            wrong.append((trial, scores, champion["version"]))
    assert wrong == [] and bad.value == 0


def test_a_killed_registration_leaves_no_staging_folder_behind_the_retry(tmp_path):
    folder = tmp_path / "train-vae" / "versions"
    (folder / ".v1.abc123" / "v1").mkdir(parents=True)  # what a SIGKILLed copy leaves
    publish(tmp_path, "v1", tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["v1"]


def publish_with_metrics(registry, version: str, nll: float, tmp_path: Path) -> dict:
    metrics = {**evidence(nll, weights=version), "run": str(tmp_path / "runs" / version)}
    (tmp_path / f"{version}.metrics.json").write_text(json.dumps(metrics))
    (tmp_path / f"{version}.onnx").write_bytes(version.encode())
    versions.register(registry, version, {"decoder.onnx": tmp_path / f"{version}.onnx",
                                     "metrics.json": tmp_path / f"{version}.metrics.json"})
    return metrics


def test_an_operator_rolls_the_champion_back_and_the_bad_version_never_returns(tmp_path):
    registry = tmp_path / "registry"
    good = publish_with_metrics(registry, "v1", 5.0, tmp_path)
    bad = publish_with_metrics(registry, "v2", 4.0, tmp_path)  # a better score, yet it renders badly
    promotion.promote(registry, "v1", good)
    assert promotion.promote(registry, "v2", bad)["promoted"]
    outcome = promotion.rollback(registry, "v1", "v2 draws grey faces")
    champion = reg.read_champion(registry)
    assert champion == outcome["champion"] and outcome["previous"]["version"] == "v2"
    assert champion["version"] == "v1" and champion["rolled_back"] == ["v2"]
    assert champion["rollback"] == {"reason": "v2 draws grey faces", "from": "v2"}
    assert champion["evidence"] == promotion.evidence_of(good) and champion["run"] == good["run"]  # its own evidence
    again = promotion.promote(registry, "v2", bad)  # e.g. a retried flow run
    assert not again["promoted"] and "rolled back by an operator (v2 draws grey faces)" in again["reason"]
    relative = {**publish_with_metrics(registry, "v4", 6.0, tmp_path), "run": "runs/v4"}  # as evaluated in a cwd
    (tmp_path / "v4.metrics.json").write_text(json.dumps(relative))
    versions.register(registry, "v4b", {"decoder.onnx": tmp_path / "v4.onnx",
                                        "metrics.json": tmp_path / "v4.metrics.json"})
    assert promotion.rollback(registry, "v4b", "test")["champion"]["run"] is None  # the flow then looks in its runs
    promotion.rollback(registry, "v1", "back")
    later = publish_with_metrics(registry, "v3", 4.5, tmp_path)  # a new version is judged as usual
    assert promotion.promote(registry, "v3", later)["promoted"]
    assert reg.read_champion(registry)["version"] == "v3"
    assert reg.read_champion(registry)["rolled_back"] == ["v2", "v4b"]  # carried by every later record
    assert not promotion.promote(registry, "v2", bad)["promoted"]  # retired for good, whoever is champion


def test_a_rollback_needs_a_published_version_and_a_reason(tmp_path, capsys):
    from vae.cli import main

    registry = tmp_path / "registry"
    publish_with_metrics(registry, "v1", 5.0, tmp_path)
    with pytest.raises(reg.RegistryError, match="say why"):
        promotion.rollback(registry, "v1", "  ")
    assert main(["registry", "rollback", str(registry), "--to", "v9", "--reason", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "v9: not published" in err and "published versions: v1" in err
    metrics = registry / "train-vae" / "versions" / "v1" / "metrics.json"
    metrics.write_text("{}")
    assert main(["registry", "rollback", str(registry), "--to", "v1", "--reason", "x"]) == 2
    assert "metrics.json: sha256 differs from the version record" in capsys.readouterr().err
    assert reg.read_champion(registry) is None  # nothing changed


def test_only_a_failed_precondition_counts_as_a_lost_race():
    """s3fs gives a failed precondition and an invalid argument (a store without conditional writes) one errno;
    the S3 error code in the cause tells them apart, so an unsupported store is not read as a lost race."""
    import errno

    class ClientError(Exception):
        def __init__(self, code):
            self.response = {"Error": {"Code": code}}

    def translated(code):
        err = OSError(errno.EINVAL, "some message from the server")
        err.__cause__ = ClientError(code)
        return err

    assert storage.lost_condition(translated("PreconditionFailed"))
    assert storage.lost_condition(translated("ConditionalRequestConflict"))
    assert not storage.lost_condition(translated("InvalidArgument"))
    assert not storage.lost_condition(OSError(errno.EINVAL, "Invalid argument"))
    assert storage.lost_condition(OSError(errno.EINVAL,
                                          "At least one of the pre-conditions you specified did not hold"))


@pytest.mark.parametrize("champion, says", [
    ('{"version": "v1", "evidence": [1, 2]}', "'evidence' is a JSON array, expected a JSON object"),
    ('{"version": "v1", "rolled_back": "v2-old"}', "'rolled_back' is a string, expected a JSON array"),
    ('{"version": "v1", "evidence": {"sample_primary": {"value": "0.1"}}}',
     "'evidence.sample_primary.value' is a string, expected a number"),
    ('{"version": ["v1"]}', "'version' is a JSON array, expected a string"),
    ("[" * 20_000 + "]" * 20_000, "JSON nested too deeply"),
])
def test_a_damaged_champion_record_stops_promotion_in_one_line(tmp_path, champion, says):
    """Each field of champion.json is type-checked on read: a hand-edited `rolled_back` string would otherwise
    retire every version whose name it contains ("v2" in "v2-old")."""
    metrics = publish_with_metrics(tmp_path, "v2", 4.0, tmp_path)
    (tmp_path / "train-vae" / "champion.json").write_text(champion)
    with pytest.raises(reg.RegistryError) as err:
        promotion.promote(tmp_path, "v2", metrics)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'train-vae' / 'champion.json'}: not a champion record (")
    assert says in message and "\n" not in message


def test_a_rolled_back_version_retires_itself_alone(tmp_path):
    old, new = (publish_with_metrics(tmp_path, v, nll, tmp_path) for v, nll in (("v2-old", 5.0), ("v2", 4.0)))
    promotion.promote(tmp_path, "v2-old", old)
    champion = tmp_path / "train-vae" / "champion.json"
    champion.write_text(json.dumps({**json.loads(champion.read_text()), "rolled_back": ["v2-old"]}))
    assert promotion.promote(tmp_path, "v2", new)["promoted"]


@pytest.mark.parametrize("record, says", [
    ('{"version": "v1", "files": {"decoder.onnx": 5}}', "'files.decoder.onnx' is an integer, expected a string"),
    ('{"version": "v1", "files": ["decoder.onnx"]}', "'files' is a JSON array, expected a JSON object"),
    ('{"version": "v1"}', "no 'files'"),
])
def test_a_damaged_version_record_is_one_line(tmp_path, record, says):
    metrics = publish_with_metrics(tmp_path, "v1", 4.0, tmp_path)
    (tmp_path / "train-vae" / "versions" / "v1" / "version.json").write_text(record)
    for attempt in (lambda: promotion.promote(tmp_path, "v1", metrics),
                    lambda: promotion.rollback(tmp_path, "v1", "why")):
        with pytest.raises(reg.RegistryError, match="version.json: not a version record") as err:
            attempt()
        assert says in str(err.value) and "\n" not in str(err.value)
