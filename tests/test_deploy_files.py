"""The deployment files, checked without a Docker engine or a cluster: prefect.yaml, the Dockerfile and its entry
point, docker-compose, the Kubernetes work-pool template, the Accelerate configs; and `make serve`'s stop logic."""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


# prefect.yaml

@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(raw)  # Prefect's own schema for the file
    return raw


def flow_of(deployment: dict):
    """The flow a deployment's entrypoint names, loaded from the repository root as a worker loads it; every
    parameter the deployment gives must be one the flow takes."""
    from prefect.flows import load_flow_from_entrypoint

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        flow = load_flow_from_entrypoint(deployment["entrypoint"])
    finally:
        os.chdir(cwd)
    inspect.signature(flow.fn).bind(**deployment["parameters"])
    return flow


def test_prefect_yaml_deployments_reference_an_entrypoint_that_imports(prefect_yaml):
    from vae.core.config import load_config

    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert set(deployments) == {"celeba-64", "demo", "watch-celeba"}
    watch = deployments.pop("watch-celeba")
    for deployment in deployments.values():
        assert flow_of(deployment).name == "train-vae"
        load_config(REPO / deployment["parameters"]["config"])  # the recipe exists and is valid
        assert deployment["work_pool"]["name"] == "local"
    assert deployments["demo"]["parameters"]["synthesize_n"] > 0  # runs on a fresh machine
    assert deployments["demo"]["parameters"]["config"] == "configs/demo.yaml"
    assert deployments["celeba-64"]["parameters"]["config"] == "configs/celeba64.yaml"
    # the trigger watches what celeba-64 shards, and starts celeba-64
    assert flow_of(watch).name == "watch-source"
    assert watch["parameters"]["deployment"] == "train-vae/celeba-64"
    assert {k: watch["parameters"][k] for k in ("source", "shards")} == \
        {k: deployments["celeba-64"]["parameters"][k] for k in ("source", "shards")}
    assert watch["schedules"][0]["interval"] <= 86400 and watch["concurrency_limit"] == 1


def test_prefect_yaml_schedule_concurrency_and_pull_step(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    celeba = next(d for d in prefect_yaml["deployments"] if d["name"] == "celeba-64")
    [schedule] = celeba["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # validates both
    assert cron.cron.split()[2:] == ["*", "*", "1"]  # weekly, on Mondays
    assert celeba["concurrency_limit"]["limit"] == 1
    # the worker decides where the code is: no path of the deploying machine and no template resolved at deploy time
    assert prefect_yaml["pull"] == [{"flows.project_dir.set_project_directory": {}}]
    assert prefect_yaml["build"] is None and prefect_yaml["push"] is None  # no image build, no git


# Dockerfile and its entry point

def test_dockerfile_base_matches_torch_cuda_and_installs_the_gpu_extra():
    import torch

    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)
    base = args["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base)
    if torch.version.cuda:
        assert base.split(":")[1].startswith(torch.version.cuda + "."), (base, torch.version.cuda)
        assert args["TORCH_INDEX"].endswith("/cu" + torch.version.cuda.replace(".", ""))
    makefile_torch = re.search(r"^TORCH_SPEC \?= (.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert args["TORCH_SPEC"].strip('"') == makefile_torch.strip()
    runs = " ".join(a for kind, a in steps if kind == "RUN")
    # the runtime from its folder first (the project depends on it), then the project with the s3:// registries
    # and shards the deploy docs use
    assert 'pip install -c constraints.txt ./runtime ".[gpu,s3,http,tensorboard]"' in runs
    extras = re.search(r"^gpu = \[(.+)\]$", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert "onnxruntime-gpu" in extras


def test_dockerfile_runs_as_a_non_root_user():
    users = [a for kind, a in dockerfile_instructions() if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = next(a for kind, a in dockerfile_instructions() if kind == "ENTRYPOINT")
    assert dockerfile_instructions().index(("USER", users[-1])) < dockerfile_instructions().index(
        ("ENTRYPOINT", entry))


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for kind, args in dockerfile_instructions():
        if kind == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), source
                assert source.split("/")[0] not in ignored, f"{source} is excluded by .dockerignore"
    for heavy in (".venv", ".git", "demo-output", "data", "runs"):
        assert heavy in ignored


def test_docker_entrypoint_starts_a_prefect_worker_or_runs_its_arguments(tmp_path):
    entry = json.loads(next(a for kind, a in dockerfile_instructions() if kind == "ENTRYPOINT"))
    assert entry[:2] == ["tini", "--"] and entry[2] == "docker-entrypoint.sh"
    script = REPO / "deploy" / "docker-entrypoint.sh"
    assert os.access(script, os.X_OK)
    assert Path(sys.executable).with_name("prefect").exists()  # the console script comes with the dependencies
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "prefect").write_text('#!/bin/sh\necho "prefect $*"\n')
    (fake / "prefect").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "PREFECT_WORK_POOL": "gpu"}
    worker = subprocess.run([str(script)], env=env, capture_output=True, text=True, check=True)
    assert worker.stdout.strip() == "prefect worker start --pool gpu --type process"
    passed = subprocess.run([str(script), "echo", "flow-run"], env=env, capture_output=True, text=True, check=True)
    assert passed.stdout.strip() == "flow-run"  # a Docker/Kubernetes pool's command runs as given


# docker-compose

def test_compose_has_server_on_postgres_and_a_gpu_worker():
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "server", "worker"} <= set(services)
    server = services["server"]
    assert server["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in server["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert all(str(p).startswith("127.0.0.1:") for p in server["ports"])
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    import prefect

    assert server["image"].split(":")[1].split("-")[0].split(".")[0] == prefect.__version__.split(".")[0]

    worker = services["worker"]
    assert (REPO / "deploy" / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == \
        (REPO / "Dockerfile").resolve()
    assert worker["environment"]["PREFECT_API_URL"] == "http://server:4200/api"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    mounts = {v.split(":")[1] for v in worker["volumes"]}
    assert {"/app/data", "/app/runs", "/app/registry"} <= mounts
    assert "gpu" in " ".join(services["deploy"]["command"])


# Kubernetes work pool

def test_kubernetes_work_pool_template_requests_gpus():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((REPO / "deploy" / "k8s" / "gpu-work-pool.json").read_text())
    variables = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= set(variables), used - set(variables)  # every placeholder is a declared variable
    values = {k: v["default"] for k, v in variables.items() if "default" in v}
    values.update(command="prefect flow-run execute", name="train-vae", gpus=8)
    job = apply_values(template["job_configuration"], values)
    pod = job["job_manifest"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["image"] == "vae-pipeline:latest" and container["args"] == "prefect flow-run execute"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
    assert variables["gpus"]["default"] == 1


# Accelerate configs

@pytest.mark.parametrize("name, processes, machines, kind", [
    ("1gpu", 1, 1, "NO"), ("8gpu", 8, 1, "MULTI_GPU"), ("2node", 16, 2, "MULTI_GPU")])
def test_accelerate_configs(name, processes, machines, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "deploy" / "accelerate" / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines, str(config.distributed_type).split(".")[-1]) == (
        processes, machines, kind)
    assert not config.use_cpu


# make serve / serve-stop

def test_makefile_has_serve_targets():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^serve: .*\n\t.*-m flows\.serve start", makefile, re.M)
    assert re.search(r"^serve-stop:.*\n\t.*-m flows\.serve stop", makefile, re.M)


def test_serve_deploys_the_deployments_asked_for(capsys):
    """`make serve DEPLOYMENTS=demo` keeps the weekly celeba-64 retraining off a machine (a schedule paused by
    hand comes back with every redeploy)."""
    from flows.serve import DEPLOYMENTS, deployment_names, main

    assert deployment_names("demo") == ("demo",) and deployment_names("demo, celeba-64") == DEPLOYMENTS
    with pytest.raises(SystemExit) as stopped:
        main(["start", "--deployments", "nightly"])
    assert stopped.value.code == 2 and \
        "expected some of demo, celeba-64, watch-celeba, got 'nightly'" in capsys.readouterr().err
    assert deployment_names("celeba-64,watch-celeba") == ("celeba-64", "watch-celeba")  # the trigger, on request
    assert re.search(r"^DEPLOYMENTS \?= demo,celeba-64$", (REPO / "Makefile").read_text(), re.M)
    assert "--deployments $(DEPLOYMENTS)" in (REPO / "Makefile").read_text()


def test_serve_stop_ends_recorded_process_groups_and_their_children(tmp_path):
    """`make serve-stop` in a later shell: only the PID file is known; the group and a child in its own session
    (as the worker starts flow runs) are both stopped; a PID that is no longer ours is left alone."""
    from flows import serve

    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', 'prefect-child'], "
            "start_new_session=True); time.sleep(120)")
    leader = subprocess.Popen([sys.executable, "-c", code, "prefect-worker"], start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        deadline = time.time() + 20
        while not serve._descendants(leader.pid) and time.time() < deadline:
            time.sleep(0.05)
        [child] = serve._descendants(leader.pid)
        stack = serve.Stack(tmp_path)
        stack.record("worker", leader.pid)
        stack.record("other", stranger.pid)  # e.g. a PID recycled since it was recorded
        assert set(serve.Stack(tmp_path).recorded()) == {"worker", "other"}
        serve.stop(serve.Stack(tmp_path))
        leader.wait(timeout=10)
        deadline = time.time() + 10
        while serve._alive(child, None) and time.time() < deadline:
            time.sleep(0.05)
        assert not serve._alive(child, None)
        assert stranger.poll() is None  # its command line is not Prefect's: not signalled
        assert not stack.pid_file.exists()
    finally:
        for proc in (leader, stranger):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_image_gets_every_package_the_project_installs_and_the_license():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = {source for kind, args in dockerfile_instructions() if kind == "COPY"
              for source in shlex.split(args)[:-1]}
    assert set(packages) | {"runtime"} <= copied, set(packages) | {"runtime"} - copied
    runtime = tomllib.loads((REPO / "runtime" / "pyproject.toml").read_text())
    assert runtime["project"]["name"] in " ".join(project["project"]["dependencies"])
    assert "LICENSE" in copied and project["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()


def test_constraints_pin_every_dependency_at_or_above_its_floor():
    """The image installs with constraints.txt: every package pyproject.toml (base and the extras the image or the
    tests use) and runtime/pyproject.toml name is pinned there, at a version its floor admits; nothing pinned is
    unused. torch and torchvision are pinned by the Dockerfile's TORCH_SPEC instead."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version.strip())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = tomllib.loads((REPO / "runtime" / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    named = [*project["dependencies"], *runtime["dependencies"],
             *(r for extra in ("cpu", "gpu", "s3", "http", "tensorboard") for r in extras[extra])]
    wanted = {}
    for text in named:
        req = Requirement(text)
        if req.name in ("vae-runtime", "torch", "torchvision"):
            continue
        wanted.setdefault(req.name.lower(), []).append(req.specifier)
    assert set(pins) == set(wanted), set(pins) ^ set(wanted)
    for name, specifiers in wanted.items():
        assert all(pins[name] in spec for spec in specifiers), (name, pins[name], specifiers)
    torch_spec = re.search(r"^TORCH_SPEC \?= (.+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    floors = {Requirement(r).name: Requirement(r).specifier for r in [*project["dependencies"], *extras["fid"]]
              if Requirement(r).name in ("torch", "torchvision")}
    for pinned in torch_spec.split():
        req = Requirement(pinned)
        assert next(iter(req.specifier)).version in floors[req.name], (pinned, floors[req.name])


def _pins(path):
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name.strip())] = Version(version.strip())
    return pins


def test_the_test_lock_pins_what_make_installs_and_agrees_with_the_image():
    """`make install` installs with -c constraints-dev.txt (a full pin list: without it pip's resolver backtracks
    through boto3 releases until it gives up). Every package the base, cpu and dev requirements name is pinned there
    at a version its floors admit, and every pin it shares with the image's constraints.txt is the same version."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    make = (REPO / "Makefile").read_text()
    assert re.search(r"^LOCK := constraints-dev\.txt$", make, re.M)
    assert '-m pip install --quiet -c $(LOCK) -e ./runtime -e ".[$(EXTRAS)]"' in make
    assert re.search(r"^\$\(STAMP\):.*\$\(LOCK\)", make, re.M), "a changed lock reinstalls"
    lock = _pins(REPO / "constraints-dev.txt")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = tomllib.loads((REPO / "runtime" / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for text in [*project["dependencies"], *runtime["dependencies"], *extras["cpu"], *extras["dev"]]:
        req = Requirement(text)
        if req.name == "vae-runtime":
            continue
        name = canonicalize_name(req.name)
        assert name in lock, f"{name} is not pinned in constraints-dev.txt"
        assert lock[name] in req.specifier, (name, lock[name], str(req.specifier))
    image = _pins(REPO / "constraints.txt")
    shared = set(image) & set(lock)
    assert {"onnxruntime", "prefect", "accelerate", "numpy"} <= shared
    assert {name: image[name] for name in shared} == {name: lock[name] for name in shared}
    torch_spec = re.search(r"^TORCH_SPEC \?= (.+)$", make, re.M).group(1)
    for pinned in torch_spec.split():
        req = Requirement(pinned)
        assert lock[canonicalize_name(req.name)] in req.specifier, pinned


def test_the_pull_step_finds_the_workers_project_folder(tmp_path, monkeypatch):
    """The deployments' pull step decides on the worker: $VAE_PROJECT_DIR when set (the image's /app), else the
    checkout the installed flows package comes from; a folder without prefect.yaml is one line naming the
    variable."""
    from flows import project_dir

    monkeypatch.delenv(project_dir.ENV, raising=False)
    assert project_dir.set_project_directory() == {"directory": str(REPO.resolve())}
    image = tmp_path / "app"
    image.mkdir()
    (image / "prefect.yaml").write_text("name: vae-pipeline\n")
    monkeypatch.setenv(project_dir.ENV, str(image))
    assert project_dir.set_project_directory() == {"directory": str(image.resolve())}
    monkeypatch.setenv(project_dir.ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(project_dir.ProjectDirError) as err:
        project_dir.set_project_directory()
    assert len(str(err.value).splitlines()) == 1
    assert f"$VAE_PROJECT_DIR={tmp_path / 'elsewhere'}: holds no prefect.yaml" in str(err.value)


def test_the_pull_step_is_importable_by_its_name_in_prefect_yaml(tmp_path, monkeypatch):
    """Prefect imports a step by the dotted name prefect.yaml gives (import_object) and calls it with the step's
    inputs; the flow run then changes into the "directory" it returns. The real worker runs it end to end in
    tests/test_e2e_prefect.py."""
    from prefect.utilities.importtools import import_object

    from flows import project_dir

    [step] = yaml.safe_load((REPO / "prefect.yaml").read_text())["pull"]
    [(name, inputs)] = step.items()
    image = tmp_path / "app"
    image.mkdir()
    (image / "prefect.yaml").write_text("name: vae-pipeline\n")
    monkeypatch.setenv(project_dir.ENV, str(image))
    assert import_object(name)(**inputs) == {"directory": str(image.resolve())}
