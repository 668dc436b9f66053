"""The benchmarks' operation count (`bench/benchkit.py`'s `flops_per_image`, which bench/export.py and
bench/train.py use), against the adjoint identity, hand counts and PyTorch's own counter."""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import load_bench

bench_export = load_bench("export")  # puts bench/ on the path first
import benchkit  # noqa: E402


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


def test_export_counts_with_the_shared_counter():
    assert bench_export.flops_per_image is benchkit.flops_per_image


class OneConvVAE(nn.Module):
    """The smallest thing with a model's training signature `model(x01, eps)`: one convolution, one linear layer."""

    def __init__(self):
        super().__init__()
        self.latent_dim = 5
        self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.fc = nn.Linear(2 * 4 * 4 + 5, 7)

    def forward(self, x01, eps):
        return self.fc(torch.cat([self.conv(x01).flatten(1), eps], dim=1))


def test_training_forward_of_a_tiny_model_against_a_hand_count():
    # the convolution: 2 * 4 * 4 outputs, each 3 * 3 * 3 multiply-adds; the linear layer: 7 outputs of 37
    expected = 2 * (2 * 16 * 27) + 2 * (7 * 37)
    assert benchkit.training_forward_flops(OneConvVAE(), image_size=8, batch=3) == expected


def test_the_hierarchical_layout_model_counts_what_torch_counts():
    # a tiny VDVAE (model.layout): the counter's hooks see every convolution of the bottom-up pass and of the
    # top-down pass along the posterior, as PyTorch's FlopCounterMode does (2 per multiply-add)
    from vae.core.config import load_config
    from vae.models import build_model

    cfg = load_config(None, ["model.kind=hierarchical", "model.image_size=16", "model.channels=[8,8]",
                             "model.layout=4x2,8x1", "model.latent_channels=2", "model.latent_dim=192",
                             "model.res_blocks=1"])
    model = build_model(cfg.model)
    x, eps = torch.rand(2, 3, 16, 16), torch.randn(2, model.latent_dim)
    with FlopCounterMode(display=False) as counter:
        model(x, eps)
    counted = benchkit.training_forward_flops(model, 16, batch=2)
    assert counted > 0 and counted == counter.get_total_flops() / 2
    work = benchkit.config_flops(cfg.model)
    assert work["train_gflop_per_image_3x_forward"] == float(f"{3 * counted / 1e9:.6g}")
