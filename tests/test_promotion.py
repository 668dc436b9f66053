"""Comparable evidence end to end: metrics that say which images, K and weights they measured; exports that
carry the metrics of the weights they ship; and a champion measured on another test set re-evaluated on the
challenger's before anything is decided."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vae_runtime import registry as reg
from vae.serving import promotion, versions

pytestmark = pytest.mark.slow


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("eval*", "export*", ".export*"))
    return to


def test_metrics_name_the_images_k_and_weights_they_measured(trained_run, tiny_shards, synth_source, tmp_path):
    from pipeline.shard import shard
    from vae.core.checkpoint import load_trained, weights_digest
    from vae.evaluation.evaluate import evaluate

    run = copy_run(trained_run, tmp_path / "run")
    a = evaluate(run, k=4, out=tmp_path / "a", grids=False)
    assert a["weights_sha256"] == weights_digest(load_trained(run)[0]) and a["image_size"] == 16
    assert a["shards"] == str(tiny_shards) and len(a["split_fingerprint"]) == 64
    same_images_elsewhere = tmp_path / "copy-of-shards"
    shutil.copytree(tiny_shards, same_images_elsewhere)
    b = evaluate(run, k=4, shards=str(same_images_elsewhere), out=tmp_path / "b", grids=False)
    assert b["split_fingerprint"] == a["split_fingerprint"]  # where the shards live does not matter
    other = tmp_path / "other-shards"
    shard(synth_source, other, size=16, maxcount=7, progress=False)  # the same source cut into other shards
    c = evaluate(run, k=4, shards=str(other), out=tmp_path / "c", grids=False)
    assert c["split_fingerprint"] != a["split_fingerprint"]
    d = evaluate(run, k=4, max_images=5, out=tmp_path / "d", grids=False)
    assert d["split_fingerprint"] != a["split_fingerprint"]  # a subset is another test set


def test_export_never_embeds_metrics_of_other_weights(trained_run, tmp_path, capsys):
    from vae.core.checkpoint import load_trained, weights_digest
    from vae.serving.export import export

    run = copy_run(trained_run, tmp_path / "run")
    digest = weights_digest(load_trained(run)[0])
    card = export(run, tmp_path / "m1")  # no metrics yet: evaluated first
    assert card["metrics"]["weights_sha256"] == digest and "is missing: evaluating" in capsys.readouterr().err
    stale = json.loads((run / "eval" / "metrics.json").read_text())
    (run / "eval" / "metrics.json").write_text(json.dumps({**stale, "weights_sha256": "0" * 64, "nll_bpd": 0.1}))
    card = export(run, tmp_path / "m2")
    assert "from other weights" in capsys.readouterr().err
    assert card["metrics"]["weights_sha256"] == digest and card["metrics"]["nll_bpd"] == stale["nll_bpd"]
    assert json.loads((tmp_path / "m2" / "metrics.json").read_text()) == card["metrics"]


def _version(run: Path, name: str, tmp_path: Path, shards: str | None = None) -> tuple[str, dict]:
    """Evaluate (on `shards`) and export a run as the flow does: (export folder, metrics)."""
    from vae.evaluation.evaluate import evaluate
    from vae.serving.export import export

    metrics = evaluate(run, shards=shards, grids=False)
    out = tmp_path / f"export-{name}"
    export(run, out, version=name)
    return str(out.resolve()), metrics


def test_a_champion_from_another_test_set_is_re_evaluated_before_the_decision(trained_run, synth_source, tmp_path):
    from prefect.logging import disable_run_logger

    from flows.train_vae import promote_model
    from pipeline.shard import shard

    registry, runs = str(tmp_path / "registry"), str(tmp_path / "runs")
    champion_run = copy_run(trained_run, tmp_path / "runs" / "champ")
    export_dir, metrics = _version(champion_run, "champ", tmp_path)
    with disable_run_logger():
        assert promote_model.fn(registry, "champ", str(champion_run), export_dir, metrics, runs)["promoted"]

    grown = tmp_path / "grown-shards"  # the weekly case: the test split changed since the champion's evaluation
    shard(synth_source, grown, size=16, maxcount=7, progress=False)
    challenger_run = copy_run(trained_run, tmp_path / "runs" / "chal")  # the same weights: an exact tie
    export_dir, new = _version(challenger_run, "chal", tmp_path, shards=str(grown))
    assert new["split_fingerprint"] != metrics["split_fingerprint"]
    with disable_run_logger():
        outcome = promote_model.fn(registry, "chal", str(challenger_run), export_dir, new, runs)
    again = outcome["reevaluated"]
    assert again["split_fingerprint"] == new["split_fingerprint"] and again["k"] == new["k"]
    assert again["nll_bpd"] == pytest.approx(new["nll_bpd"], abs=1e-9)  # same weights, same images, same noise
    assert not outcome["promoted"] and "does not beat" in outcome["reason"] and "re-evaluated" in outcome["reason"]
    measure = promotion.evidence_of(new)["sample_primary"]["measure"]
    assert again["sample_primary"]["measure"] == measure  # its pictures measured as the challenger's were
    assert "KID" in outcome["reason"] and "within 2 SE" in outcome["reason"]  # same weights: the same figure
    cache = next(champion_run.glob("eval-*-k*/metrics.json"))
    assert cache.parent.name.endswith(f"-s{measure}")  # a cache measured another way is never taken for it

    better = {**new, "nll_bpd": new["nll_bpd"] - 0.5}
    versions.register(registry, "chal-b", {p.name: p for p in Path(export_dir).iterdir()})
    with disable_run_logger():
        outcome = promote_model.fn(registry, "chal-b", str(challenger_run), export_dir, better, runs)
    assert outcome["promoted"] and outcome["reevaluated"]["nll_bpd"] == again["nll_bpd"]
    assert len(list(champion_run.glob("eval-*-k*/metrics.json"))) == 1 and cache.exists()  # measured once
    champion = reg.read_champion(registry)
    assert champion["version"] == "chal-b" and champion["evidence"]["split_fingerprint"] == new["split_fingerprint"]


def test_a_champion_recorded_before_sample_metrics_is_re_measured_like_the_challenger(trained_run, tmp_path):
    """champion.json from before sample figures (its evidence has no `sample_primary`) still loads; the champion
    is re-measured at the challenger's temperatures and image count before the decision, and KID counts."""
    from prefect.logging import disable_run_logger

    from flows.train_vae import promote_model
    from vae.evaluation.evaluate import evaluate
    from vae.serving.export import export

    registry, runs = tmp_path / "registry", tmp_path / "runs"
    champion_run = copy_run(trained_run, runs / "old")
    challenger_run = copy_run(trained_run, runs / "new")  # the same weights: the same pictures
    metrics = evaluate(challenger_run, grids=False, temperatures=[0.7, 1.0], sample_images=12)
    export(challenger_run, tmp_path / "export-new", version="new")
    primary = promotion.evidence_of(metrics)["sample_primary"]
    assert primary["temperatures"] == [0.7, 1.0] and primary["n_images"] == metrics["samples"]["n_heldout"]
    old = {key: value for key, value in promotion.evidence_of(metrics).items() if key != "sample_primary"}
    (registry / "train-vae").mkdir(parents=True)
    (registry / "train-vae" / "champion.json").write_text(json.dumps(
        {"version": "old", "path": "train-vae/versions/old", "evidence": {**old, "nll_bpd": metrics["nll_bpd"] + 0.5},
         "nll_bpd": metrics["nll_bpd"] + 0.5, "split": "test", "k": metrics["k"], "run": str(champion_run)}))
    better = {**metrics, "nll_bpd": metrics["nll_bpd"] - 0.5}  # same pictures, fewer bits (the champion ties)
    with disable_run_logger():
        outcome = promote_model.fn(str(registry), "new", str(challenger_run), str(tmp_path / "export-new"), better,
                                   str(runs))
    again = outcome["reevaluated"]
    assert again is not None and again["sample_primary"]["measure"] == primary["measure"]
    assert again["sample_primary"]["value"] == pytest.approx(primary["value"], abs=1e-12)
    cached = json.loads(next(champion_run.glob("eval-*-k*-s*/metrics.json")).read_text())
    assert cached["samples"]["temperatures"] == [0.7, 1.0] and cached["samples"]["n_heldout"] == primary["n_images"]
    assert outcome["promoted"] and "within 2 SE" in outcome["reason"] and "sample measure" in outcome["reason"]
    assert reg.read_champion(registry)["evidence"]["sample_primary"]["measure"] == primary["measure"]


def test_no_promotion_when_the_champion_cannot_be_re_evaluated(trained_run, tmp_path):
    from prefect.logging import disable_run_logger

    from flows.train_vae import promote_model

    registry = tmp_path / "registry"
    run = copy_run(trained_run, tmp_path / "run")
    export_dir, metrics = _version(run, "new", tmp_path)
    (registry / "train-vae").mkdir(parents=True)
    old = {**promotion.evidence_of(metrics), "split_fingerprint": "0" * 64, "nll_bpd": 99.0}
    (registry / "train-vae" / "champion.json").write_text(json.dumps(
        {"version": "old", "path": "train-vae/versions/old", "evidence": old, "run": str(tmp_path / "gone")}))
    with disable_run_logger():
        outcome = promote_model.fn(str(registry), "new", str(run), export_dir, metrics, str(tmp_path))
    assert not outcome["promoted"]
    assert outcome["reason"] == f"champion old could not be re-evaluated: its run folder {tmp_path / 'gone'} is gone " \
                                "(champion runs must be kept)"
    assert reg.read_champion(registry)["version"] == "old"
