"""What the benchmarks share: where the repository and the shared CelebA sample are, timing, and the JSON line.

The benchmarks import the installed project (`make install`, then `.venv/bin/python bench/NAME.py`); this module
sits beside them, so `from benchkit import ...` works when a script runs from any folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The real aligned CelebA images beside the repository (never committed); VAE_CELEBA_SAMPLE points elsewhere.
SHARED_SAMPLE = Path(os.environ.get("VAE_CELEBA_SAMPLE") or REPO.parent / "shared" / "data" / "celeba-sample")


def best_rate(run, repeats: int = 3) -> float:
    """Items per second: the best of `repeats` calls of run() -> (items, seconds)."""
    return max(n / s for n, s in (run() for _ in range(repeats)))


def calls_per_second(fn, seconds: float, min_calls: int = 3) -> float:
    """Call fn() for at least `seconds` (and `min_calls` times); calls per second."""
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < min_calls:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def emit(result: dict) -> None:
    """The benchmark's one JSON line on stdout."""
    print(json.dumps(result), flush=True)
