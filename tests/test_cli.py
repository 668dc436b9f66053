"""The `vae` command: --help everywhere, exit code 2 with one clear line for bad input, the data commands."""

import json
import subprocess
import sys

import pytest
import yaml
import torch

from conftest import REPO
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
                    f"model folder {tmp_path}: no decoder.onnx (it holds no graphs)")


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


def test_version_config_show_and_info(trained_run, tmp_path, capsys):
    import json as _json

    import yaml

    from vae.cli import main
    from vae.core.config import config_hash, load_config

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("vae-pipeline ")
    assert main(["config", "show", "--config", "configs/demo.yaml", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load(out)
    assert shown["train"]["steps"] == 7 and shown["model"]["image_size"] == 32 and shown["eval"]["k"] == 20
    assert f"hash {config_hash(load_config('configs/demo.yaml', ['train.steps=7']))}" in out.splitlines()[0]
    assert main(["config", "show", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err

    assert main(["info", str(trained_run)]) == 0
    run = _json.loads(capsys.readouterr().out)
    assert run["kind"] == "run" and run["step"] == 30 and run["checkpoints"][-1] == "step-00000030.pt"
    assert run["last_log"]["step"] == 30
    assert main(["info", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_info_on_a_model_folder_and_a_registry(trained_run, tmp_path_factory, tmp_path, capsys):
    import json as _json

    from exported_model import exported_once
    from vae.cli import main
    from vae.serving import promotion, versions

    out, card = exported_once(trained_run, tmp_path_factory)
    assert main(["info", str(out)]) == 0
    model = _json.loads(capsys.readouterr().out)
    assert model["kind"] == "model" and model["version"] == "test-1" and model["sha256"] == card["sha256"]
    assert "README.md" in model["folder"] and model["metrics"]["split"] == "test"
    versions.register(tmp_path, "v1", {p.name: p for p in out.iterdir()})
    promotion.promote(tmp_path, "v1", {**promotion.evidence_of(card["metrics"]), "nll_bpd": 5.0})
    assert main(["info", str(tmp_path)]) == 0
    registry = _json.loads(capsys.readouterr().out)
    assert registry["versions"] == ["v1"] and registry["champion"]["version"] == "v1"


def test_model_card_readme_says_what_users_need(trained_run, tmp_path_factory):
    from exported_model import exported_once

    out, card = exported_once(trained_run, tmp_path_factory)
    text = (out / "README.md").read_text()
    assert f"# VAE {card['version']}" in text and "![prior samples, seed 0](samples.png)" in text
    assert f"{card['metrics']['nll_bpd']:.4f}" in text and card["sha256"]["decoder.onnx"] in text
    assert "Intended use" in text and "## Training data" in text and "synthetic faces" in text
    assert "non-commercial research purposes only" not in text  # synthetic data: CelebA's terms do not apply
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "onnx" and "datasets" not in meta
    [result] = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in result["metrics"]}["nll_bpd"] == card["metrics"]["nll_bpd"]
    assert card["data"] == {"kind": "synthetic", "name": "vae-synthetic-faces"}
    assert card["training"]["steps"] == card["step"] and card["training"]["images_seen"] > 0
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_and_score_show_progress_on_a_terminal(trained_run, synth_source, tmp_path):
    """The bars appear on a terminal (a pseudo-terminal here) and never on a pipe (the other tests)."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    def stderr_on_a_tty(*args: str) -> str:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
        proc = subprocess.Popen([sys.executable, "-m", "vae.cli", *args], stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the pty closes when the process exits
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait() == 0
        os.close(master)
        return b"".join(chunks).decode(errors="replace")

    assert "IWAE K=8" in stderr_on_a_tty("eval", "--run", str(trained_run), "--k", "8")
    assert "scoring K=4" in stderr_on_a_tty("score", "--run", str(trained_run), "--source",
                                            str(synth_source / "img_align_celeba"), "--k", "4", "--out",
                                            str(tmp_path / "s.csv"))


def one_line(capsys, code, want_code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == want_code and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("extra, needle", [
    (["--num-machines", "2", "--machine-rank", "7", "--main-process-ip", "127.0.0.1"], "--machine-rank 7: expected"),
    (["--machine-rank", "-1"], "--machine-rank -1: expected an integer in [0, 0]"),
    (["--num-machines", "2", "--machine-rank", "1"], "--main-process-ip: needed with --num-machines 2")])
def test_a_launch_that_would_wait_forever_is_refused_first(tmp_path, capsys, extra, needle):
    """These once hung silently: a rank no machine has, or no address for the main machine."""
    code = main(["train", "--config", str(REPO / "configs" / "demo.yaml"), f"run_dir={tmp_path / 'run'}", *extra])
    one_line(capsys, code, 2, needle)
    assert not (tmp_path / "run").exists()


def test_precision_names(capsys):
    from vae_runtime.errors import BadInput
    from vae.cli.export import _precisions
    from vae.serving.export import export

    assert _precisions("INT8, fp32,int8") == ("int8",) and _precisions("int8,fp16") == ("fp16", "int8")
    assert _precisions(None) == () and _precisions(None, fp16=True) == _precisions("float16") == ("fp16",)
    for text in ("", ",", "int8,,fp16"):
        code = main(["export", "--run", "r", "--out", "o", "--precision", text])
        one_line(capsys, code, 2, "--precision", "expected names separated by commas")
    code = main(["export", "--run", "no-run", "--out", "o", "--precision", "fp16,int4"])
    one_line(capsys, code, 2, "--precision 'int4': not offered (the precisions: fp32, fp16, int8;")  # before the run
    with pytest.raises(BadInput, match=r"^precision 'int4': not offered \(the precisions: fp32, fp16, int8; "):
        export("no-run", "o", precisions=("int4",))


def test_score_checks_its_output_before_scoring_and_refuses_nan_scores(trained_run, synth_source, tmp_path, capsys,
                                                                         monkeypatch):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code = main(["score", "--run", str(tmp_path / "no-run"), "--source", str(synth_source), "--out", str(folder)])
    one_line(capsys, code, 2, f"--out {folder}: is a folder")  # before the run is even loaded
    from vae.evaluation import score as score_module

    monkeypatch.setattr(score_module, "iwae_bound", lambda model, x, *args: torch.full((len(x),), float("nan")))
    out = tmp_path / "scores.csv"
    code = main(["score", "--run", str(trained_run), "--source", str(synth_source), "--k", "2", "--out", str(out)])
    one_line(capsys, code, 1, "scores are not finite", "no ranking written")
    assert not out.exists()
