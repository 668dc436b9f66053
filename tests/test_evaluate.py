"""Evaluation: the metrics contract, bounds ordered as the math says, bits/dim consistent with nats."""

import json
import math

import pytest

from vae.evaluation.evaluate import evaluate

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


def test_attribute_directions_are_mean_differences():
    import torch

    from vae.evaluation.evaluate import ATTRIBUTE_DIRECTIONS, attribute_directions

    n_attr = len(ATTRIBUTE_DIRECTIONS)
    sums = {"attr_mu": torch.zeros(n_attr, 2, 2, dtype=torch.float64), "attr_n": torch.zeros(n_attr, 2)}
    sums["attr_mu"][0, 0] = torch.tensor([4.0, 2.0])  # Smiling: 2 images, mean (2, 1)
    sums["attr_n"][0] = torch.tensor([2, 4])
    sums["attr_mu"][0, 1] = torch.tensor([4.0, -4.0])  # not smiling: 4 images, mean (1, -1)
    sums["attr_n"][1] = torch.tensor([0, 6])  # Eyeglasses never seen: no direction
    found = attribute_directions(sums)
    assert set(found) == {"Smiling"}
    assert found["Smiling"].tolist() == [1.0, 2.0]


def test_eval_writes_attribute_direction_grids(trained_run):
    metrics = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert "Smiling" in metrics["attribute_directions"]
    assert (trained_run / "eval" / metrics["images"]["attribute-Smiling"]).exists()


def test_anomaly_scores_rank_foreign_images_above_faces(tiny_shards, synth_source, tmp_path):
    import numpy as np
    from PIL import Image

    from vae.cli import main

    folder = tmp_path / "mixed"
    folder.mkdir()
    names = sorted((synth_source / "img_align_celeba").iterdir())[:6]
    rng = np.random.default_rng(0)
    for path in names:
        face = np.asarray(Image.open(path))
        Image.fromarray(face).save(folder / f"face-{path.stem}.png")
        Image.fromarray(255 - face).save(folder / f"inverted-{path.stem}.png")
        # blocky noise: it stays noise after the 148-crop and the resize to 16x16
        noise = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).resize((178, 218), Image.NEAREST)
        noise.save(folder / f"noise-{path.stem}.png")
    from conftest import tiny_config
    from vae.training.train import train

    trained_run = tmp_path / "run"  # long enough to have learned what faces look like
    train(tiny_config(trained_run, tiny_shards, "train.steps=150", "train.checkpoint_every=150",
                      "train.lr=5e-3"), progress=False)
    out = tmp_path / "scores.csv"
    assert main(["score", "--run", str(trained_run), "--source", str(folder), "--k", "4", "--out", str(out)]) == 0
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    scores = {key: float(value) for key, value in rows}
    assert len(scores) == 18 and [float(v) for _, v in rows] == sorted(scores.values(), reverse=True)
    faces = [v for k, v in scores.items() if k.startswith("face-")]
    noise = [v for k, v in scores.items() if k.startswith("noise-")]
    inverted = [v for k, v in scores.items() if k.startswith("inverted-")]
    assert min(noise) > max(faces) and np.mean(inverted) > np.mean(faces)
    # a list of skipped images from an earlier run into the same OUT does not outlive a run that skipped none
    stale = tmp_path / "scores.csv.skipped.json"
    stale.write_text('[{"file": "gone.png", "reason": "an earlier run"}]')
    assert main(["score", "--run", str(trained_run), "--source", str(folder), "--k", "2", "--out", str(out)]) == 0
    assert not stale.exists()
    # an image's score is its own: scored alone it gets the number it got among the other 17
    import shutil

    from vae.evaluation.score import score

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / f"face-{names[2].stem}.png", alone)
    among = dict(score(trained_run, str(folder), k=4))
    [(key, value)] = score(trained_run, str(alone), k=4)
    assert value == pytest.approx(among[key], rel=1e-5)


def test_metrics_are_reused_only_for_the_same_weights_images_and_k(trained_run, tmp_path):
    """A retried flow run reuses its evaluation (IWAE at K=1000 over the test split takes long) only when it
    measured exactly these weights on these images at this K."""
    import shutil

    from vae.evaluation.evaluate import reusable_metrics

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval"))
    assert reusable_metrics(run, "test", 4) is None  # nothing measured yet
    metrics = evaluate(run, split="test", k=4)
    assert reusable_metrics(run, "test", 4) == metrics
    assert reusable_metrics(run, "test", 8) is None and reusable_metrics(run, "valid", 4) is None
    on_disk = run / "eval" / "metrics.json"
    on_disk.write_text(json.dumps({**metrics, "weights_sha256": "0" * 64}))
    assert reusable_metrics(run, "test", 4) is None
    on_disk.write_text(json.dumps({**metrics, "split_fingerprint": "0" * 64}))
    assert reusable_metrics(run, "test", 4) is None
    evaluate(run, split="test", k=4, max_images=3)
    assert reusable_metrics(run, "test", 4) is None  # a partial evaluation measures other images


def test_a_diverged_run_fails_in_one_line_rather_than_measuring_nan(trained_run, tmp_path, capsys):
    """Weights that are not finite (a diverged run) exit 1 with one line naming the run; no metrics written."""
    import shutil

    import torch

    from vae.core.checkpoint import load_checkpoint, save_checkpoint
    from vae.core.run import latest_checkpoint
    from vae.cli import main

    run = tmp_path / "diverged"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval"))
    state = load_checkpoint(latest_checkpoint(run))
    next(t for t in state["ema"].values() if torch.is_floating_point(t)).fill_(float("nan"))
    save_checkpoint(run, state["step"], state, keep=3)
    code = main(["eval", "--run", str(run), "--split", "test", "--k", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"vae: failed: run {run}: its weights at step {state['step']} are not finite"), err
    assert not (run / "eval").exists()


def test_launched_ranks_read_the_checkpoint_checked_before_the_launch(trained_run, tmp_path, monkeypatch, capsys):
    """`vae eval --num-processes N` checks one checkpoint, then every rank reads that one (its step is passed to
    them) even when training writes a newer one meanwhile; metrics.json names it."""
    import shutil

    import torch

    from vae.cli import eval as eval_command
    from vae.cli import main
    from vae.core.checkpoint import load_checkpoint, save_checkpoint, weights_digest
    from vae.core.run import latest_checkpoint
    from vae.core.run import Run
    from vae.evaluation import evaluate as evaluate_module

    run = tmp_path / "training"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "export"))
    launched = []

    def newer_checkpoint_then_ranks(module, forwarded, processes):
        state = load_checkpoint(latest_checkpoint(run))
        for tensor in state["ema"].values():
            if torch.is_floating_point(tensor):
                tensor.mul_(0.5)
        save_checkpoint(run, 31, {**state, "step": 31}, keep=3)
        launched.append(forwarded)
        evaluate_module.main(forwarded)  # the ranks' entry point, here as one rank
        return 0

    monkeypatch.setattr(eval_command, "run_launched", newer_checkpoint_then_ranks)
    assert main(["eval", "--run", str(run), "--split", "test", "--k", "2", "--num-processes", "2"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert launched and launched[0][launched[0].index("--step") + 1] == "30"
    assert metrics["model_step"] == 30 and metrics["model_version"] == "training@30"
    assert metrics["weights_sha256"] == weights_digest(Run(run, step=30).model())
    assert metrics["weights_sha256"] != weights_digest(Run(run).model())  # the newer one holds other weights
