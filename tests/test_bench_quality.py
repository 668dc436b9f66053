"""bench/quality.py's step plan: the budget at the probe's typical speed, robust to one slow window."""

from conftest import load_bench

bench_quality = load_bench("quality")  # puts bench/ on the path first


def test_the_plan_fills_the_budget_at_the_median_window_speed():
    # 100 images/s for 10 minutes at batch 32: 60,000 images, 1,875 steps; a window slowed to 30 images/s by a
    # checkpoint write does not move the median, where a mean (76.7 images/s) would plan 1,437 steps
    assert bench_quality.planned_steps([100.0, 30.0, 100.0], 10.0, 32) == 1875
    assert bench_quality.planned_steps([90.0, 100.0, 110.0, 1000.0], 10.0, 32) == 1968  # median 105 images/s
    assert bench_quality.planned_steps([1.0], 1.0, 32) == 20  # never fewer than 20 steps
