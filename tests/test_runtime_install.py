"""The runtime as an app developer meets it: a fresh virtual environment, the README's install line, and the
README's app snippet following a champion served over s3:// (moto), with torch, accelerate, prefect and
tensorboard absent from that environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from exported_model import exported_once

pytestmark = pytest.mark.slow
OFFLINE = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
           "Failed to establish a new connection")


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Registry and consuming the champion"):]
    return section[:re.search(r"\n#{1,3} ", section[1:]).start() + 1]


def test_readme_app_runs_from_a_runtime_only_install_against_s3(s3_endpoint, trained_run, tmp_path_factory,
                                                                  tmp_path):
    section = readme_section()
    install = re.search(r'^pip install "\./runtime\[([a-z0-9,]+)\]"', section, flags=re.M)
    app = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    assert install and "s3" in install[1].split(",") and "cpu" in install[1].split(",")
    assert len([line for line in app.splitlines() if line.strip()]) <= 10 and "torch" not in app

    # the runtime folder as a checkout holds it (copied so the build writes nothing into the repository)
    source = tmp_path / "runtime"
    shutil.copytree(REPO / "runtime", source)
    venv = tmp_path / "app-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{source}[{install[1]}]"],
                          capture_output=True, text=True)
    if done.returncode != 0 and any(marker in done.stderr for marker in OFFLINE):
        pytest.skip(f"no package index reachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    for heavy in ("torch", "accelerate", "prefect", "tensorboard", "webdataset"):
        found = subprocess.run([str(python), "-c", f"import {heavy}"], capture_output=True, cwd=tmp_path)
        assert found.returncode != 0, f"{heavy} is importable in the runtime-only environment"

    from vae.serving import promotion, versions

    out, card = exported_once(trained_run, tmp_path_factory)
    registry = "s3://models/registry"
    versions.register(registry, "v1", {p.name: p for p in out.iterdir()})
    assert promotion.promote(registry, "v1", {**promotion.evidence_of(card["metrics"]), "nll_bpd": 5.0})["promoted"]
    work = tmp_path / "app"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["VAE_RUNTIME_CACHE"] = str(tmp_path / "cache")
    ran = subprocess.run([str(python), "-c", app + "\nimport sys\nassert 'torch' not in sys.modules\n"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["v1", "CPUExecutionProvider"]
    assert (work / "faces.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(venv) in subprocess.run([str(python), "-c", "import vae_runtime; print(vae_runtime.__file__)"],
                                       cwd=work, capture_output=True, text=True).stdout


def runtime_modules() -> dict[str, bytes]:
    """What the runtime wheel must hold: the modules of runtime/vae_runtime, byte for byte."""
    base = REPO / "runtime"
    return {path.relative_to(base).as_posix(): path.read_bytes()
            for path in sorted((base / "vae_runtime").rglob("*.py"))}


def test_the_runtime_wheel_holds_one_top_level_package_and_nothing_stale(tmp_path):
    """The wheel installs `vae_runtime` alone (the pipeline's `vae`, `common` and `pipeline` never collide with
    it), its modules byte for byte, and nothing from an earlier build folder (a stale runtime/build once put an
    old `pipeline` package into the wheel)."""
    import zipfile

    checkout = tmp_path / "runtime"
    shutil.copytree(REPO / "runtime", checkout,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    (checkout / "build" / "lib" / "pipeline").mkdir(parents=True)  # an earlier build's leftovers
    (checkout / "build" / "lib" / "pipeline" / "__init__.py").write_text("raise ImportError\n")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(tmp_path / "wheel"), str(checkout)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        held = {name: archive.read(name) for name in archive.namelist() if ".dist-info/" not in name}
        license_text = archive.read(next(n for n in archive.namelist() if n.endswith("licenses/LICENSE")))
    assert held == runtime_modules()
    assert {name.split("/")[0] for name in held} == {"vae_runtime"}
    assert license_text == (REPO / "LICENSE").read_bytes()
