"""The base install works without the optional packages: torchvision (the `fid` extra) and tensorboard (the
`tensorboard` extra) are made unimportable in a subprocess, which then imports every module of the product
(but the FID network's, which needs torchvision) and trains with `train.tensorboard=true`: it trains, logs to
train_log.jsonl and says that tensorboard is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, TINY

pytestmark = pytest.mark.slow

WITHOUT = ("torchvision", "tensorboard", "tensorboardX")
CHECK = r'''
import importlib, pathlib, sys

for name in {WITHOUT}:  # as if not installed: `import` fails and importlib.util.find_spec says None
    sys.modules[name] = None
roots = {{"vae_runtime": pathlib.Path({runtime!r}), "common": pathlib.Path({repo!r}), "pipeline": pathlib.Path({repo!r}),
         "vae": pathlib.Path({repo!r}), "flows": pathlib.Path({repo!r})}}
for package, base in roots.items():
    for path in sorted((base / package).rglob("*.py")):
        parts = path.relative_to(base).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] in ("__init__", "__main__") else parts)
        if module not in ("vae.evaluation.inception",) and parts[-1] != "__main__":
            importlib.import_module(module)
from vae.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_the_product_imports_and_trains_without_torchvision_and_tensorboard(tiny_shards, tmp_path):
    run = tmp_path / "run"
    code = CHECK.format(WITHOUT=repr(WITHOUT), runtime=str(REPO / "runtime"), repo=str(REPO))
    done = subprocess.run([sys.executable, "-c", code, "train", *TINY, "train.steps=2", "train.tensorboard=true",
                           f"run_dir={run}", f"data.shards={tiny_shards}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tensorboard is not installed" in done.stderr
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [2]
    assert not any(run.rglob("events.out.tfevents*"))  # no tracker ran
