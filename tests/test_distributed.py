"""Several processes through the CLI (accelerate launch, gloo on CPU): DDP training keeps the ranks'
parameters identical, and distributed evaluation visits every image exactly once."""

import json

import pytest

from conftest import TINY
from vae.core.checkpoint import load_checkpoint
from vae.core.run import list_checkpoints
from vae.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_rank_run(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp")
    code = main(["train", *TINY, "train.steps=6", "train.checkpoint_every=3", f"run_dir={run}",
                 f"data.shards={tiny_shards}", "--num-processes", "2"])
    assert code == 0
    return run


def test_two_processes_train_with_identical_parameters(two_rank_run):
    ranks = [json.loads((two_rank_run / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]  # really one process group, not two lone trainers
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    state = load_checkpoint(list_checkpoints(two_rank_run)[-1])
    assert int(state["step"]) == 6 and int(state["images"]) == 6 * 16 * 2


def test_two_processes_consume_disjoint_data(two_rank_run):
    keys = [set((two_rank_run / "ranks" / f"rank-{r}.keys").read_text().split()) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]


def test_distributed_eval_matches_single_process(two_rank_run, capsys):
    assert main(["eval", "--run", str(two_rank_run), "--k", "4"]) == 0
    one = json.loads((two_rank_run / "eval" / "metrics.json").read_text())
    assert main(["eval", "--run", str(two_rank_run), "--k", "4", "--num-processes", "2"]) == 0
    two = json.loads((two_rank_run / "eval" / "metrics.json").read_text())
    assert one["n_images"] == two["n_images"] > 0
    # each image's noise is seeded by its key: the same numbers on one process or two, up to summation order
    for name in ("iwae_nats", "elbo_nats", "kl_nats", "iwae_stderr_nats"):
        assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-4), name
    assert one["active_units"] == two["active_units"]
    assert two["world_size"] == 2 and one["world_size"] == 1


def test_a_direct_accelerate_launch_takes_the_run_config_as_vae_train_does(tiny_shards, tmp_path):
    """`accelerate launch [its flags] -m vae.training.train --config RUN.yaml key=value ...`, as Accelerate's docs
    teach, trains one process group from the same YAML and overrides `vae train` takes; a bad override is one
    line from each rank that reaches its check (torchrun stops the other rank once the first exits with 2), before
    any process group."""
    import subprocess

    from conftest import REPO
    from vae.core.distributed import launch_command

    run = tmp_path / "direct"
    overrides = [*TINY, "train.steps=2", "train.checkpoint_every=2", f"run_dir={run}", f"data.shards={tiny_shards}"]
    cmd = launch_command("vae.training.train", ["--config", str(REPO / "configs" / "demo.yaml"), *overrides], 2)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ranks = [json.loads((run / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    saved = load_checkpoint(list_checkpoints(run)[-1])
    assert saved["step"] == 2 and json.loads(saved["config"])["train"]["steps"] == 2

    bad = launch_command("vae.training.train", ["--config", str(REPO / "configs" / "demo.yaml"), "train.lr=-1"], 2)
    done = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("vae: error:")]
    assert done.returncode != 0 and 1 <= len(errors) <= 2 and all("train.lr" in line for line in errors), done.stderr


def test_launch_commands_for_gpus_and_nodes():
    from vae.core.distributed import launch_command

    cmd = launch_command("vae.training.train", ["c.json"], 8, num_machines=2, machine_rank=1,
                         main_process_ip="10.0.0.1", main_process_port=29500)
    joined = " ".join(cmd)
    assert "--multi_gpu" in cmd and "--num_processes 16" in joined and "--num_machines 2" in joined
    assert "--machine_rank 1" in joined and "--main_process_ip 10.0.0.1" in joined
    assert cmd[-3:] == ["-m", "vae.training.train", "c.json"]
    from_file = launch_command("vae.training.train", ["c.json"], 1, accelerate_config="deploy/accelerate/8gpu.yaml")
    assert from_file[3:5] == ["--config_file", "deploy/accelerate/8gpu.yaml"] and "--num_processes" not in from_file
    # the file sets two machines: the rank given on the command line must reach the launcher
    ranked = launch_command("vae.training.train", ["c.json"], 8, machine_rank=1,
                            accelerate_config="deploy/accelerate/2node.yaml")
    assert "--machine_rank 1" in " ".join(ranked)


def test_the_accelerate_configs_name_the_module_that_trains():
    import importlib.util
    import re
    from pathlib import Path

    for config in Path("deploy/accelerate").glob("*.yaml"):
        for module in re.findall(r"-m ([\w.]+)", config.read_text()):
            assert importlib.util.find_spec(module) is not None, f"{config}: -m {module} does not exist"


def test_missing_accelerate_config_is_bad_input(capsys):
    assert main(["train", "--accelerate-config", "nope.yaml"]) == 2
    assert "nope.yaml: file not found" in capsys.readouterr().err


def test_bad_input_to_a_launched_evaluation_is_one_line_before_any_launch(tmp_path, capsys, monkeypatch):
    from vae.core import distributed

    monkeypatch.setattr(distributed, "run_launched", lambda *a, **k: pytest.fail("launched despite bad input"))
    assert main(["eval", "--run", str(tmp_path / "no-run"), "--num-processes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-run" in err
