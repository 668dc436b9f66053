"""Evaluation: the true bounds and grids of a run on a split (`evaluate.py`), per-image scores (`score.py`)."""
