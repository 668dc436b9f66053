"""Evaluation: the metrics contract, bounds ordered as the math says, bits/dim consistent with nats."""

import json
import math

from vae.evaluate import evaluate

CONTRACT = ("split", "n_images", "elbo_nats", "recon_nats", "kl_nats", "iwae_nats", "iwae_stderr_nats", "k",
            "elbo_bpd", "nll_bpd", "active_units", "config_hash", "model_version")


def test_metrics_contract_and_consistency(trained_run, tiny_shards):
    metrics = evaluate(trained_run, split="test", k=16)
    on_disk = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert on_disk == metrics
    for key in CONTRACT:
        assert key in metrics, key
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert metrics["n_images"] == manifest["splits"]["test"]["count"] and metrics["k"] == 16
    assert math.isclose(metrics["elbo_nats"], metrics["recon_nats"] - metrics["kl_nats"], rel_tol=1e-9)
    dims = 3 * 16 * 16
    assert math.isclose(metrics["nll_bpd"], -metrics["iwae_nats"] / (dims * math.log(2)), rel_tol=1e-9)
    assert metrics["iwae_nats"] >= metrics["elbo_nats"] - 3 * metrics["iwae_stderr_nats"]
    assert metrics["iwae_stderr_nats"] > 0 and 0 <= metrics["active_units"] <= 4
    assert 0 < metrics["nll_bpd"] < 8.5  # better than (or near) uniform over 256 levels after training
    for name in metrics["images"].values():
        assert (trained_run / "eval" / name).read_bytes()[:4] == b"\x89PNG"
