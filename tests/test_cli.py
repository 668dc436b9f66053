"""The `vae` command: --help everywhere, exit code 2 with one clear line for bad input, the data commands."""

import json
import subprocess
import sys

import pytest

from vae.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vae.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args", [[], ["data"], ["data", "synth"], ["data", "shard"], ["train"], ["eval"],
                                  ["export"], ["sample"], ["encode"], ["score"]])
def test_help_on_every_subcommand(args):
    result = run_cli(*args, "--help")
    assert result.returncode == 0 and "usage: vae" in result.stdout


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_config_key_exits_2_naming_the_key(capsys, tmp_path):
    _one_line_error(capsys, main(["train", "train.stepz=3", f"run_dir={tmp_path}/r"]), "train.stepz")
    assert not (tmp_path / "r").exists()  # failed before any work


def test_bad_config_value_exits_2(capsys, tmp_path):
    _one_line_error(capsys, main(["train", "model.likelihood=poisson"]), "model.likelihood")


def test_missing_source_exits_2(capsys, tmp_path):
    _one_line_error(capsys, main(["data", "shard", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]),
                    "does not exist")


def test_eval_of_a_run_without_checkpoint_exits_2(capsys, tmp_path):
    _one_line_error(capsys, main(["eval", "--run", str(tmp_path)]), "no checkpoint")


def test_sample_from_missing_model_exits_2(capsys, tmp_path):
    _one_line_error(capsys, main(["sample", "--model", str(tmp_path), "--out", str(tmp_path / "g.png")]),
                    "not found")


def test_usage_error_exits_2():
    result = run_cli("data", "synth", "--out", "x", "--n", "0")
    assert result.returncode == 2 and "expected an integer >= 1" in result.stderr


def test_synth_shard_train_eval_from_the_command_line(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "src"), "--n", "40"]) == 0
    assert main(["data", "shard", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "sh"),
                 "--size", "16", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["splits"].values()) == 40
    from conftest import TINY

    assert main(["train", *TINY, "train.steps=4", f"run_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'sh'}"]) == 0
    assert main(["eval", "--run", str(tmp_path / "run"), "--k", "3"]) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["k"] == 3 and metrics["n_images"] == manifest["splits"]["test"]["count"]
