"""Configuration: defaults, YAML differences, overrides, and errors that name the key."""

import pytest

from vae_runtime.errors import ConfigError
from vae.core.config import config_hash, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  latent_dim: 16\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.channels=[8,16]", "model.image_size=16"])
    assert cfg.model.latent_dim == 16
    assert cfg.train.lr == pytest.approx(3e-4)  # the override wins over the file
    assert cfg.model.channels == [8, 16]
    assert cfg.train.steps == 20000  # untouched default


def test_int_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("override, key", [
    (["train.lrr=0.1"], "train.lrr"),
    (["bogus=1"], "bogus"),
    (["model.latent_dimm=3"], "model.latent_dimm"),
])
def test_unknown_key_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'.*unknown key"):
        load_config(None, override)


@pytest.mark.parametrize("override, key", [
    (["train.steps=ten"], "train.steps"),
    (["train.steps=1.5"], "train.steps"),
    (["model.channels=8"], "model.channels"),
    (["train.mixed_precision=3"], "train.mixed_precision"),
    (["data=5"], "data"),
])
def test_wrong_type_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, override)


@pytest.mark.parametrize("override, key", [
    (["train.lr=-1"], "train.lr"),
    (["model.likelihood=poisson"], "model.likelihood"),
    (["model.image_size=60"], "model.image_size"),
    (["eval.k=0"], "eval.k"),
    (["train.ema_decay=1.5"], "train.ema_decay"),
    (["data.batch_size=0"], "data.batch_size"),
    (["train.seed=-1"], "train.seed"),  # these two were tracebacks from numpy and torch, after config.json
    (["train.seed=99999999999999999999"], "train.seed"),
])
def test_impossible_value_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, override)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="'train.nope'"):
        load_config(nested)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    for name in ("configs/demo.yaml", "configs/celeba64.yaml", "configs/celeba64-hier.yaml",
                 "configs/celeba64-cpu.yaml", "configs/celeba64-conv-cpu.yaml",
                 "configs/celeba64-gpu.yaml"):
        load_config(name)


def test_config_hash_ignores_locations_not_training():
    a = load_config(None, ["run_dir=a", "data.shards=x"])
    b = load_config(None, ["run_dir=b", "data.shards=y"])
    c = load_config(None, ["train.lr=0.5"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_bare_no_is_the_string_no():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_yaml_aliases_within_the_budget_load_and_an_endless_one_is_refused(tmp_path):
    shared = tmp_path / "shared.yaml"
    shared.write_text("data:\n  batch_size: &batch 32\neval:\n  batch_size: *batch\n")
    assert load_config(shared).eval.batch_size == 32
    endless = tmp_path / "endless.yaml"
    endless.write_text("model: &m\n  channels: *m\n")
    with pytest.raises(ConfigError, match=r"endless.yaml: alias \*m repeats a node that holds it"):
        load_config(endless)


@pytest.mark.parametrize("override, message", [
    ("train.steps=100000000", "config key 'train.steps': must be <= 99999999"),
    ("train.lr=11", "config key 'train.lr': must be in (0, 10]"),
    ("train.max_seconds=1e9", "config key 'train.max_seconds': must be <= 3.1536e+07 (a year)"),
    ("eval.temperatures=[" + ",".join(str(i + 1) for i in range(33)) + "]",
     "config key 'eval.temperatures': must be a list of 1 to 32 temperatures, got [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, ...]"),
    ("run_dir=" + "r" * 5000, "config key 'run_dir': expected at most 4096 characters, got 5000"),
    ("train." + "x" * 5000 + "=1", "config key 'train." + "x" * 54 + "...': unknown key"),
])
def test_values_past_a_sane_range_are_one_short_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message) and len(str(err.value)) < 400


@pytest.mark.parametrize("bad", [10**400, float("nan"), True, "1.0"])  # 10**400: an integer no float can hold
def test_a_temperature_that_is_not_a_finite_number_is_refused_by_name(bad):
    from vae.core.config import check_temperatures

    with pytest.raises(ConfigError, match=r"'--temperatures': temperature 1 must be a finite number"):
        check_temperatures([1.0, bad], "--temperatures")
