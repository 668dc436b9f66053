"""The folder tree is the architecture: every import points down the layers, read from the source itself, and a
module's layer follows from its path alone.

    runtime/vae_runtime             the torch-free base (its own distribution): errors, atomic writes, storage, size
                                    caps, records, grids, the registry's records, the ONNX runtime
    common                          the pipeline's process helpers: folder locks, orphaned workers, ports
    pipeline                        data: manifest, records, sources, writer (shard) and readers (loader, memory)
    vae/core, vae/models            config, objectives, run folders and checkpoints, distributed; the models
    vae/training, vae/evaluation    side by side: neither imports the other
    vae/serving                     export (which may evaluate), quantization, publication
    vae/cli, flows                  the edges
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"vae_runtime": REPO / "runtime", "common": REPO, "pipeline": REPO, "vae": REPO, "flows": REPO}
PACKAGES = tuple(ROOTS)

ALLOWED = {  # layer -> the layers its modules may import (besides themselves)
    "vae_runtime": (),
    "common": ("vae_runtime",),
    "pipeline": ("vae_runtime", "common"),
    "core": ("vae_runtime", "common"),
    "training": ("vae_runtime", "common", "pipeline", "core"),
    "evaluation": ("vae_runtime", "common", "pipeline", "core"),
    "serving": ("vae_runtime", "common", "pipeline", "core", "evaluation"),
    "edge": ("vae_runtime", "common", "pipeline", "core", "training", "evaluation", "serving"),
}
FOLDERS = {"vae.core": "core", "vae.models": "core", "vae.training": "training", "vae.evaluation": "evaluation",
           "vae.serving": "serving", "vae.cli": "edge", "flows": "edge"}
TORCH_FREE = ("vae_runtime", "common", "vae.cli")


def layer(module: str) -> str:
    """The layer of a module, from its path: its top package, or its folder under vae/."""
    top = module.split(".")[0]
    if top in ("vae_runtime", "common", "pipeline"):
        return top
    for folder, name in FOLDERS.items():
        if module == folder or module.startswith(folder + "."):
            return name
    if module == "vae":
        return "core"
    raise AssertionError(f"{module}: a module outside the layers' folders")


def modules() -> dict[str, Path]:
    found = {}
    for package, base in ROOTS.items():
        for path in sorted((base / package).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
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


def test_every_module_has_a_layer_from_its_path():
    assert {layer(m) for m in MODULES} == set(ALLOWED)


def test_the_layer_test_can_fail(tmp_path, monkeypatch):
    """The checker fed a real upward import (a pipeline module importing the trainer, the runtime importing the
    pipeline) fails; fed the same file without it, it passes."""
    upward = tmp_path / "upward.py"
    upward.write_text("import json\nfrom vae_runtime.errors import BadInput\nfrom vae.training.train import train\n")
    monkeypatch.setitem(MODULES, "pipeline.upward", upward)
    with pytest.raises(AssertionError, match=r"pipeline.upward:3 imports vae.training.train"):
        test_imports_point_down("pipeline.upward")
    upward.write_text("from pipeline.manifest import read_manifest\n")
    monkeypatch.setitem(MODULES, "vae_runtime.upward", upward)
    with pytest.raises(AssertionError, match=r"vae_runtime.upward:1 imports pipeline.manifest"):
        test_imports_point_down("vae_runtime.upward")
    upward.write_text("import json\nfrom vae_runtime.errors import BadInput\n")
    test_imports_point_down("pipeline.upward")
