"""The train-vae flow end to end on a tiny synthetic set with Prefect's test harness, and the registry's
champion/challenger rule."""

import json
from pathlib import Path

import pytest

from flows import registry as reg

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    import os

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_train_vae_flow_promotes_a_version(prefect_harness, synth_source, tmp_path):
    from conftest import TINY
    from flows.train_vae import train_vae
    from vae.runtime import Decoder

    registry = tmp_path / "registry"
    result = train_vae(source=str(synth_source), shards=str(tmp_path / "shards"), config="configs/demo.yaml",
                       registry=str(registry), runs=str(tmp_path / "runs"),
                       overrides=[*TINY, "train.steps=10", "train.checkpoint_every=10"])
    champion = reg.read_champion(registry)
    assert result["promoted"] and champion["version"] == result["version"]
    folder = registry / "train-vae" / "versions" / result["version"]
    assert sorted(p.name for p in folder.iterdir()) == ["decoder.onnx", "encoder.onnx", "metrics.json",
                                                         "model.json", "samples.png"]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert champion["nll_bpd"] == metrics["nll_bpd"] and metrics["split"] == "test"
    assert Decoder(folder / "decoder.onnx").sample(2, seed=0).shape == (2, 3, 16, 16)
    assert json.loads((folder / "model.json").read_text())["version"] == result["version"]


def test_flow_rejects_bad_configuration_before_any_work(prefect_harness, synth_source, tmp_path):
    from flows.train_vae import train_vae
    from vae.errors import ConfigError

    with pytest.raises(ConfigError, match="train.nope"):
        train_vae(source=str(synth_source), shards=str(tmp_path / "shards"), config="configs/demo.yaml",
                  registry=str(tmp_path / "registry"), overrides=["train.nope=1"])
    assert not (tmp_path / "shards").exists()


def _metrics(nll, k=100, split="test"):
    return {"nll_bpd": nll, "elbo_bpd": nll + 0.1, "k": k, "split": split, "config_hash": "h"}


def test_champion_replaced_only_by_a_better_comparable_version(tmp_path):
    src = tmp_path / "f.txt"
    src.write_text("x")
    for version in ("v1", "v2", "v3", "v4"):
        reg.register(tmp_path, version, {"model.json": src})
    assert reg.promote(tmp_path, "v1", _metrics(5.0))[0]
    promoted, reason, previous = reg.promote(tmp_path, "v2", _metrics(5.2))
    assert not promoted and "does not beat" in reason and previous["version"] == "v1"
    assert reg.read_champion(tmp_path)["version"] == "v1"
    assert not reg.promote(tmp_path, "v3", _metrics(4.0, k=10))[0]  # not comparable: other K
    assert reg.promote(tmp_path, "v4", _metrics(4.9))[0]
    assert reg.read_champion(tmp_path)["version"] == "v4"
    assert not list((tmp_path / "train-vae").glob(".*"))  # no temporary files left
    assert Path(reg.read_champion(tmp_path)["path"]).name == "v4"
