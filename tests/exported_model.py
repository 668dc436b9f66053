"""One export of the session's tiny trained run (float32 graphs and the float16 decoder), shared by
test_export.py and test_runtime.py so the suite exports it once."""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[str, tuple[Path, dict]] = {}


def exported_once(trained_run: Path, tmp_path_factory) -> tuple[Path, dict]:
    key = str(trained_run)
    if key not in _CACHE:
        from vae.serving.export import export

        out = tmp_path_factory.mktemp("export")
        _CACHE[key] = out, export(trained_run, out, version="test-1", precisions=("fp16",))
    return _CACHE[key]
