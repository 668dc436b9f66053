"""The folder tree is the architecture: every import points down the layers, read from the source itself.

    common                          errors, atomic writes, storage, grids: nothing of ours below it
    pipeline                        data: manifest, records, sources, writer (shard) and readers (loader, memory)
    vae core                        config, models, objectives, checkpoint, distributed
    vae.training, vae.evaluation    side by side: neither imports the other
    vae.serving                     export (which may evaluate), registry, runtime
    vae.cli, flows                  the edges
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "pipeline", "vae", "flows")

CORE = ("vae.config", "vae.models", "vae.objectives", "vae.checkpoint", "vae.distributed", "vae")
ALLOWED = {  # layer -> the layers its modules may import (besides themselves)
    "common": (),
    "pipeline": ("common",),
    "core": ("common",),
    "training": ("common", "pipeline", "core"),
    "evaluation": ("common", "pipeline", "core"),
    "serving": ("common", "pipeline", "core", "evaluation"),
    "edge": ("common", "pipeline", "core", "training", "evaluation", "serving"),
}
TORCH_FREE = ("common", "vae.serving.runtime", "vae.serving.device_buffers", "vae.serving.registry", "vae.runtime",
              "vae.serving.graph_files", "vae.serving.watchdog", "vae.grid", "vae.cli", "vae.info")


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in ("common", "pipeline"):
        return top
    if top == "flows" or module in ("vae.cli", "vae.info"):
        return "edge"
    for name in ("training", "evaluation", "serving"):
        if module.startswith(f"vae.{name}"):
            return name
    if module in ("vae.runtime", "vae.grid"):  # the app's paths: re-exports of the serving layer
        return "serving"
    return "core"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module imported, line, at module level) for every import of a project module, lazy ones included."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        out += [(name, node.lineno, id(node) in top_level) for name in names
                if name.split(".")[0] in PACKAGES or name.split(".")[0] in ("torch", "accelerate", "prefect")]
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    mine = layer(module)
    for target, line, _ in imports(MODULES[module]):
        if target.split(".")[0] not in PACKAGES:
            continue
        theirs = layer(target)
        assert theirs == mine or theirs in ALLOWED[mine], \
            f"{module}:{line} imports {target} ({mine} may not depend on {theirs})"


@pytest.mark.parametrize("module", [m for m in sorted(MODULES) if m.startswith(TORCH_FREE)])
def test_the_runtime_side_never_imports_torch_accelerate_or_prefect(module):
    for target, line, _ in imports(MODULES[module]):
        assert target.split(".")[0] not in ("torch", "accelerate", "prefect"), f"{module}:{line} imports {target}"


def test_the_readers_do_not_import_the_writer_nor_private_names():
    for reader in ("pipeline.loader", "pipeline.memory"):
        targets = [t for t, _, _ in imports(MODULES[reader])]
        assert "pipeline.shard" not in targets, reader
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__all__"]
                assert not private, f"{module} imports private {private} from {node.module}"


def test_models_build_on_shared_blocks_without_cycles():
    for model in ("vae.models.conv", "vae.models.hierarchical"):
        targets = {t for t, _, _ in imports(MODULES[model])}
        assert "vae.models.blocks" in targets
        assert not targets & {"vae.models.conv", "vae.models.hierarchical"} - {model}, model
    assert not {t for t, _, _ in imports(MODULES["vae.models.blocks"])} & {"vae.models.conv",
                                                                           "vae.models.hierarchical"}


def test_the_layer_test_can_fail():
    """A deliberate upward import is caught (the check above is not vacuous)."""
    assert layer("pipeline.loader") == "pipeline" and "core" not in ALLOWED["pipeline"]
    assert layer("vae.training.train") == "training" and "evaluation" not in ALLOWED["training"]
    assert any(t == "common.errors" for t, _, _ in imports(MODULES["pipeline.loader"]))
