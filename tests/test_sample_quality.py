"""Sample quality in evaluation: `metrics.json`'s `samples` object (figures with standard errors, the
real-versus-real floor, counts, the feature spaces' identity, memorisation, FID or why not), labelled grids at
each temperature, FID end to end on an Inception network of the real architecture, bad input in one line
before any work, `vae info`, and config hashes that new keys leave alone."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import REPO
from vae.evaluation.evaluate import evaluate

FIGURES = ("kid", "precision", "recall", "density", "coverage", "swd")


def _finite_figure(f) -> bool:
    return isinstance(f, dict) and math.isfinite(f["value"]) and (f["stderr"] is None or math.isfinite(f["stderr"]))


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-samples")
    return out, evaluate(trained_run, split="test", k=4, out=out, temperatures=[0.7, 1.0])


def test_the_samples_object_holds_finite_figures_errors_floor_and_counts(evaluated, tiny_shards):
    _, metrics = evaluated
    samples = metrics["samples"]
    n_test = json.loads((tiny_shards / "manifest.json").read_text())["splits"]["test"]["count"]
    assert samples["n_heldout"] == samples["n_train"] == samples["n_generated"] == n_test
    assert samples["temperatures"] == [0.7, 1.0] and set(samples["prior"]) == {"0.7", "1"}
    for group in (samples["floor"], samples["reconstructions"], *samples["prior"].values()):
        for name in FIGURES:
            assert _finite_figure(group[name]), (name, group[name])
        assert group["kid"]["stderr"] > 0 and group["swd"]["stderr"] > 0
        assert group["fid"] is None
    primary = samples["primary"]
    assert primary["metric"] == "kid" and primary["temperature"] in (0.7, 1.0)
    # the temperature is chosen on the valid split's images, and the test figure reported at it
    selection = samples["selection"]
    assert selection["split"] == "valid" and set(selection["kid"]) == {"0.7", "1"}
    assert primary["temperature"] == min((0.7, 1.0), key=lambda t: selection["kid"][f"{t:g}"]["value"])
    assert primary["value"] == samples["prior"][f"{primary['temperature']:g}"]["kid"]["value"]
    memo = samples["prior"]["1"]["memorisation"]
    assert _finite_figure(memo["nearest_train_rms"]) and memo["ratio_to_heldout"] > 0
    assert 0.5 < memo["train_to_heldout"] < 2  # a tiny model copies nothing: as near held-out as training images
    assert samples["features"]["random"]["name"] == "randconv-v1" and samples["features"]["inception"] is None
    assert "--inception-weights" in samples["fid_reason"] and len(samples["measure"]) == 16
    # a briefly trained tiny model is far from real images; the floor is not
    assert primary["value"] > samples["floor"]["kid"]["value"] + 2 * primary["stderr"]


def test_the_temperature_is_chosen_on_the_valid_images_not_on_the_measured_ones():
    """Draws at 0.5 match the valid images, draws at 1.0 the test images: the choice follows the valid split
    (choosing on the test split would pick 1.0 and report the best of two tries on the test images). Measured on
    the valid split itself, or with one temperature, nothing else is embedded."""
    from vae.evaluation.sample_quality import select_temperature
    from vae.evaluation.sample_metrics import kid

    g = torch.Generator().manual_seed(0)
    valid, test = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 3.0
    drawn = {0.5: torch.randn(200, 8, generator=g), 1.0: torch.randn(200, 8, generator=g) + 3.0}
    prior = {f"{t:g}": {"kid": kid(test, f)} for t, f in drawn.items()}
    chosen = select_temperature(drawn, prior, "test", lambda: {"random": valid})
    assert chosen["temperature"] == 0.5 and chosen["split"] == "valid"
    assert chosen["kid"]["0.5"]["value"] < chosen["kid"]["1"]["value"]

    def never():
        raise AssertionError("embedded the valid split without a choice to make")

    assert select_temperature(drawn, prior, "valid", never) == {"temperature": 1.0, "split": "valid"}
    assert select_temperature({0.8: drawn[0.5]}, prior, "test", never) == {"temperature": 0.8, "split": None}
    few = select_temperature(drawn, prior, "test", lambda: {"random": valid[:10]})
    assert few == {"temperature": 1.0, "split": "test"}  # too few valid images: the measured split's figures


def test_grids_are_written_at_each_temperature_with_a_label_strip(evaluated):
    import numpy as np
    from PIL import Image

    out, metrics = evaluated
    for t in ("0.7", "1"):
        name = metrics["images"][f"samples-t{t}"]
        picture = np.asarray(Image.open(out / name))
        plain = np.asarray(Image.open(out / metrics["images"]["samples"]))
        assert picture.shape[0] > plain.shape[0] and picture.shape[1] == plain.shape[1]
        strip = picture[:14]
        assert (strip < 128).any() and (strip == 255).mean() > 0.5  # dark text on white


def test_same_weights_same_settings_give_the_same_figures(trained_run, evaluated, tmp_path):
    _, first = evaluated
    again = evaluate(trained_run, split="test", k=4, out=tmp_path, temperatures=[0.7, 1.0], grids=False)
    assert again["samples"] == first["samples"]
    other = evaluate(trained_run, split="test", k=4, out=tmp_path, temperatures=[1.0], grids=False)
    assert other["samples"]["measure"] != first["samples"]["measure"]  # measured another way: never compared


def test_fid_runs_end_to_end_on_an_inception_network_of_the_real_architecture(trained_run, tmp_path,
                                                                              monkeypatch):
    from vae.evaluation.inception import TEST_ANY_HASH_ENV, build_fid_inception

    torch.manual_seed(0)
    weights = tmp_path / "random-inception.pth"
    torch.save(build_fid_inception().state_dict(), weights)
    monkeypatch.setenv(TEST_ANY_HASH_ENV, "1")  # the test-only switch: a random network's hash cannot match
    metrics = evaluate(trained_run, split="test", k=2, out=tmp_path / "eval", temperatures=[1.0], grids=False,
                       sample_images=8, inception_weights=str(weights))
    samples = metrics["samples"]
    assert samples["features"]["inception"]["verified"] is False and samples["fid_reason"] is None
    for group in (samples["floor"], samples["prior"]["1"], samples["reconstructions"]):
        assert _finite_figure(group["fid"]) and group["fid"]["value"] >= 0
    assert samples["prior"]["1"]["fid"]["value"] > samples["floor"]["fid"]["value"]


def test_a_bad_inception_file_is_one_line_and_exit_2_before_any_evaluation(trained_run, tmp_path, capsys):
    from vae.cli import main

    eval_dir = trained_run / "eval"
    before = (eval_dir / "metrics.json").read_bytes() if (eval_dir / "metrics.json").exists() else None
    bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    bad.write_bytes(b"not the weights" * 100)
    code = main(["eval", "--run", str(trained_run), "--k", "2", "--inception-weights", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(bad) in err and "6726825d" in err, err
    after = (eval_dir / "metrics.json").read_bytes() if (eval_dir / "metrics.json").exists() else None
    assert after == before  # nothing already written is lost or replaced


@pytest.mark.parametrize("value, needle", [("0,1", "temperature 0"), ("-1", "temperature 0"),
                                           ("nan", "temperature 0"), ("", "expected numbers"),
                                           ("0.8,x", "expected numbers")])
def test_bad_temperatures_are_one_line_and_exit_2(trained_run, capsys, value, needle):
    from vae.cli import main

    code = main(["eval", "--run", str(trained_run), "--temperatures", value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--temperatures" in err and needle in err, err


@pytest.mark.parametrize("override, needle", [("eval.temperatures=[]", "a list of 1 to"),
                                              ("eval.temperatures=[1.0,0]", "temperature 1"),
                                              ("eval.temperatures=[-0.5]", "temperature 0"),
                                              ("eval.temperatures=[.inf]", "finite"),
                                              ("eval.sample_images=1", "at least two")])
def test_bad_sample_settings_in_the_config_name_the_key(override, needle):
    from vae_runtime.errors import ConfigError
    from vae.core.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert override.split("=")[0] in str(err.value) and needle in str(err.value)


def test_a_split_with_too_few_images_for_a_figure_is_one_line(trained_run, tmp_path):
    from vae_runtime.errors import BadInput

    with pytest.raises(BadInput) as err:
        evaluate(trained_run, split="test", k=2, out=tmp_path, sample_images=1)
    assert "\n" not in str(err.value)


def test_new_keys_stay_out_of_the_hash_at_their_default_and_paths_never_enter_it():
    from vae.core.config import config_hash, load_config

    base = config_hash(load_config(REPO / "configs" / "demo.yaml"))
    assert config_hash(load_config(REPO / "configs" / "demo.yaml", ["eval.temperatures=[1.0]",
                                                                     "eval.sample_images=1000"])) == base
    assert config_hash(load_config(REPO / "configs" / "demo.yaml", ["eval.inception_weights=/x/w.pth"])) == base
    assert config_hash(load_config(REPO / "configs" / "demo.yaml", ["eval.temperatures=[0.8,1.0]"])) != base
    assert config_hash(load_config(REPO / "configs" / "demo.yaml", ["eval.sample_images=500"])) != base


def test_vae_info_shows_the_sample_figures(trained_run, evaluated, capsys):
    from vae.cli import main

    evaluate(trained_run, split="test", k=4, temperatures=[0.7, 1.0], grids=True)
    assert main(["info", str(trained_run)]) == 0
    shown = json.loads(capsys.readouterr().out)["metrics"]["samples"]
    assert shown["primary"]["metric"] == "kid" and set(shown["by_temperature"]) == {"0.7", "1"}
    assert "--inception-weights" in shown["fid"] and shown["floor"]["value"] is not None


def test_training_grids_show_each_temperature_in_a_labelled_block(tiny_shards, tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import tiny_config
    from vae.training.train import train

    run = tmp_path / "run"
    train(tiny_config(run, tiny_shards, "train.steps=2", "train.checkpoint_every=2", "train.tensorboard=false",
                      "eval.temperatures=[0.5,1.0]"), progress=False)
    picture = np.asarray(Image.open(run / "grids" / "step-00000002-samples.png"))
    one_block = 4 * (16 + 2) + 2  # 32 samples of 16x16, 8 a row, 2-pixel borders
    assert picture.shape[0] == 2 * (one_block + 16)  # two blocks, each under a 16-pixel label strip
    strips = [picture[:16], picture[one_block + 16:one_block + 32]]
    assert all((s < 128).any() for s in strips)
    cold, warm = picture[16:16 + one_block], picture[one_block + 32:]
    assert np.abs(cold.astype(int) - warm.astype(int)).mean() > 0  # the same draws, scaled: another picture


def test_the_export_records_the_best_temperature_and_sampling_uses_it(trained_run, tmp_path_factory, tmp_path):
    import shutil

    import numpy as np

    from exported_model import exported_once
    from vae.serving.graphs import set_metadata
    from vae_runtime import Decoder

    out, card = exported_once(trained_run, tmp_path_factory)
    primary = (card["metrics"].get("samples") or {}).get("primary")
    assert card["temperature"] == (primary["temperature"] if primary else 1.0)
    assert Decoder(out / "decoder.onnx").temperature == card["temperature"]
    for recorded, expected in ((0.5, 0.5), ("garbled", 1.0), (-2, 1.0), (float("nan"), 1.0)):
        graph = tmp_path / f"decoder-{recorded}.onnx"
        shutil.copyfile(out / "decoder.onnx", graph)
        metadata = {**Decoder(out / "decoder.onnx").metadata, "temperature": recorded}
        set_metadata(graph, metadata)
        decoder = Decoder(graph)
        assert decoder.temperature == expected
        assert np.array_equal(decoder.sample(4, seed=1), decoder.sample(4, seed=1, temperature=expected))
    assert not np.array_equal(Decoder(graph).sample(4, seed=1, temperature=0.5), Decoder(graph).sample(4, seed=1))


def test_best_temperature_reads_the_primary_figure():
    from vae.serving.export import best_temperature

    assert best_temperature({"samples": {"primary": {"temperature": 0.8}}}) == 0.8
    assert best_temperature({}) == best_temperature({"samples": {"primary": {"temperature": True}}}) == 1.0
