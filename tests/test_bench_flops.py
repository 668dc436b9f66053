"""bench/export.py's operation count, against the adjoint identity and hand counts."""

import importlib.util
from pathlib import Path

import torch
from torch import nn

_BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("bench_export", _BENCH / "export.py")
bench_export = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_export)


def test_transposed_convolution_costs_what_its_adjoint_convolution_costs():
    # ConvTranspose2d(3 -> 5) maps 8x8 to 16x16; the Conv2d(5 -> 3) with the same kernel, stride and padding
    # maps 16x16 back to 8x8 and is its adjoint: the same multiply-adds, 3 * 8 * 8 * 5 * 4 * 4
    up = nn.ConvTranspose2d(3, 5, 4, stride=2, padding=1)
    down = nn.Conv2d(5, 3, 4, stride=2, padding=1)
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 16, 16)
    assert bench_export.flops_per_image(up, up, x) == bench_export.flops_per_image(down, down, y) == 2 * 3 * 64 * 80


def test_grouped_transposed_convolution_against_its_grouped_adjoint():
    up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    down = nn.Conv2d(6, 4, 3, stride=2, groups=2)
    x = torch.randn(1, 4, 5, 5)
    y = torch.randn(1, 6, *up(x).shape[2:])  # 11x11 back to 5x5
    assert down(y).shape[2:] == x.shape[2:]
    expected = 2 * 4 * 25 * 3 * 9  # each input value meets out_ch / groups = 3 filters of 3x3
    assert bench_export.flops_per_image(up, up, x) == bench_export.flops_per_image(down, down, y) == expected


def test_linear_and_a_stack_add_up():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 7))
    expected = 2 * (4 * 25 * 3 * 9) + 2 * (7 * 100)
    assert bench_export.flops_per_image(model, model, torch.randn(3, 3, 5, 5)) == expected
