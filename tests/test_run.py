"""A run folder read through one object, `vae.core.run.Run`, and the config keys by what they mean to a run
(`vae.core.keys`): outside the model's identity, free to change on resume."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from vae_runtime.errors import BadInput
from vae_runtime.schemas import DEFAULT_CROP
from vae.core import checkpoint as ckpt
from vae.core import keys
from vae.core.config import Config, config_from_dict, config_hash, config_to_dict
from vae.core.run import FORMAT_VERSION, Run, latest_checkpoint


def copied(trained_run, tmp_path, name: str = "run"):
    run = tmp_path / name
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval", "export"))
    return run


def rewritten(run, change, digest: bool = True) -> None:
    """The run's newest checkpoint changed by `change(state)`; `digest=False` writes it as older code did (no
    .sha256 beside it)."""
    path = latest_checkpoint(run)
    state = ckpt.load_checkpoint(path)
    change(state)
    if digest:
        ckpt.save_checkpoint(run, state["step"], state, keep=10)
    else:
        torch.save(state, path)
        ckpt.digest_path(path).unlink()


def moved_shards(state: dict, where: str) -> None:
    values = json.loads(state["config"])
    values["data"]["shards"] = where
    state["config"] = json.dumps(values)


def test_a_run_reads_its_config_its_newest_checkpoint_and_its_format(trained_run):
    run = Run(trained_run)
    assert run.format_version == FORMAT_VERSION
    assert run.config_record["config_hash"] == config_hash(run.config)
    assert run.config_record["config"] == config_to_dict(run.config)  # the launch that trained these weights
    assert [p.name for p in run.checkpoints()] == ["step-00000015.pt", "step-00000030.pt"]
    assert run.checkpoint.name == "step-00000030.pt" and run.step == 30 and run.state["step"] == 30
    assert run.metrics is None or run.metrics["model_step"] <= 30


def test_the_model_carries_the_checkpoints_ema_weights_and_the_raw_ones_on_request(trained_run):
    run = Run(trained_run)
    state = ckpt.load_checkpoint(latest_checkpoint(trained_run))
    ema, raw = run.model().state_dict(), run.model(ema=False).state_dict()
    assert all(torch.equal(ema[name], state["ema"][name]) for name in state["ema"])
    assert all(torch.equal(raw[name], state["model"][name]) for name in state["model"])
    assert any(not torch.equal(ema[name], raw[name]) for name in ema)  # two sets of weights, told apart
    assert not run.model().training and run.model() is run.model()


def test_the_checkpoint_is_picked_once_and_a_later_one_is_not_mixed_in(trained_run, tmp_path):
    folder = copied(trained_run, tmp_path)
    run = Run(folder)
    assert run.step == 30
    rewritten(folder, lambda state: state.update(step=31))  # training wrote a newer checkpoint meanwhile
    assert (run.step, run.checkpoint.name) == (30, "step-00000030.pt")
    assert Run(folder).step == 31


def test_a_checkpoint_rotated_away_before_it_is_read_is_picked_again(trained_run, tmp_path, monkeypatch):
    folder = copied(trained_run, tmp_path)
    real = ckpt.load_checkpoint

    def rotated_first(path):
        if path.name == "step-00000030.pt":  # the trainer removes the newest between listing and reading
            path.unlink()
        return real(path)

    monkeypatch.setattr(ckpt, "load_checkpoint", rotated_first)
    assert Run(folder).step == 15


def test_a_step_asked_for_is_read_even_when_a_newer_one_exists_and_is_one_line_when_gone(trained_run):
    run = Run(trained_run, step=15)
    assert run.step == 15 and run.checkpoint.name == "step-00000015.pt"
    state = ckpt.load_checkpoint(run.checkpoint)
    assert all(torch.equal(run.model().state_dict()[n], t) for n, t in state["ema"].items())
    with pytest.raises(BadInput, match=r"^run .*: no checkpoint at step 7 \(rotated away") as err:
        Run(trained_run, step=7).state
    assert "\n" not in str(err.value)


def test_no_checkpoint_is_one_line(tmp_path):
    with pytest.raises(BadInput, match=r"no checkpoint found \(train it first\)"):
        Run(tmp_path).model()


def test_preprocessing_and_crop_come_from_the_checkpoints_record_even_where_the_shards_cannot_be_read(
        trained_run, tmp_path):
    folder = copied(trained_run, tmp_path)
    rewritten(folder, lambda state: (moved_shards(state, str(tmp_path / "gone")),
                                     state.update(preprocessing={**state["preprocessing"], "crop": 0})))
    run = Run(folder)
    assert run.preprocessing["crop"] == 0 and run.crop == 0  # the record's, not the default


def test_an_older_checkpoint_without_the_record_takes_its_shards_else_the_default_crop(trained_run, tiny_shards,
                                                                                        tmp_path):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    readable = copied(trained_run, tmp_path, "readable")
    rewritten(readable, lambda state: state.pop("preprocessing"))
    assert Run(readable).preprocessing == manifest["preprocessing"]
    assert Run(readable).crop == manifest["preprocessing"]["crop"]
    unreadable = copied(trained_run, tmp_path, "unreadable")
    rewritten(unreadable, lambda state: (state.pop("preprocessing"), moved_shards(state, str(tmp_path / "gone"))))
    assert Run(unreadable).preprocessing is None and Run(unreadable).crop == DEFAULT_CROP


def test_an_older_format_run_folder_still_loads(trained_run, tiny_shards, tmp_path):
    """Format 1: config.json without a format version, checkpoints without a digest beside them, without the
    preprocessing record and without the progress fields added later."""
    folder = copied(trained_run, tmp_path)
    record = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"config": record["config"], "config_hash": record["config_hash"]}))

    def older(state):
        for name in ("preprocessing", "skipped_outliers", "stream_start", "train_s", "images"):
            state.pop(name, None)

    rewritten(folder, older, digest=False)
    run = Run(folder)
    assert run.format_version == 1 and run.step == 30
    assert run.preprocessing == json.loads((tiny_shards / "manifest.json").read_text())["preprocessing"]
    assert config_hash(run.config) == record["config_hash"]
    assert torch.equal(next(iter(run.model().state_dict().values())),
                       next(iter(Run(trained_run).model().state_dict().values())))


def test_config_json_is_written_in_this_codes_format(tmp_path):
    cfg = config_from_dict({"run_dir": str(tmp_path)})
    Run(tmp_path).write_config(cfg)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "format_version": FORMAT_VERSION, "config": config_to_dict(cfg), "config_hash": config_hash(cfg)}


# -- the keys ------------------------------------------------------------------------------------------------

LEAVES = sorted(keys.flat(config_to_dict(Config())))


def changed(value):
    """Another value of the same type (not validated: the checks below compare dicts)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    return [*value, *(value[-1:] or [1])]


def with_key(cfg: Config, key: str) -> Config:
    """A copy of `cfg` with `key` set to another value (set after validation: any value will do here)."""
    cfg = copy.deepcopy(cfg)
    *sections, name = key.split(".")
    section = getattr(cfg, sections[0]) if sections else cfg
    setattr(section, name, changed(getattr(section, name)))
    return cfg


def test_every_key_the_lists_name_is_a_config_key():
    for entry in (*keys.OUTSIDE_IDENTITY, *keys.CHANGE_ON_RESUME, *keys.ADDED_LATER):
        assert any(keys.names(leaf, (entry,)) for leaf in LEAVES), entry


def test_the_lists_are_disjoint_where_they_must_be():
    # a key is either always outside the identity or outside it only at its default, never both
    assert not set(keys.OUTSIDE_IDENTITY) & set(keys.ADDED_LATER)
    # what does not define the model may always change on resume
    assert all(keys.names(key, keys.CHANGE_ON_RESUME) for key in keys.OUTSIDE_IDENTITY)
    # the schedule and evaluation change on resume yet name other models: they stay inside the identity
    assert not any(keys.names(key, keys.OUTSIDE_IDENTITY) for key in keys.SCHEDULE)


@pytest.mark.parametrize("key", LEAVES)
def test_config_hash_ignores_exactly_the_keys_outside_the_identity(key):
    base = Config()
    assert (config_hash(with_key(base, key)) == config_hash(base)) == keys.names(key, keys.OUTSIDE_IDENTITY)


def test_the_resume_check_lets_exactly_the_resumable_keys_change(trained_run):
    run = Run(trained_run)
    assert ckpt.resume_differences(run.state, run.config) == []
    for key in LEAVES:
        differ = ckpt.resume_differences(run.state, with_key(run.config, key))
        assert (differ == []) == keys.names(key, keys.CHANGE_ON_RESUME), (key, differ)
