"""Building blocks shared by the models (the conv VAE and the hierarchical VAE import them from here)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def soft_bound(t: torch.Tensor, limit: float = 12.0) -> torch.Tensor:
    """|t| < limit smoothly, for log-variances: exp(t) stays finite in bf16 and fp16, where an unbounded
    log-variance overflows and training diverges."""
    return limit * torch.tanh(t / limit)


class ResBlock(nn.Module):
    """x + f(x): two 3x3 convolutions; the second starts at zero so a new block is the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


MIN_STD = 1e-3  # the smallest standard deviation softplus_std gives (about 1e-3)


def softplus_std(raw: torch.Tensor) -> torch.Tensor:
    """A standard deviation from an unconstrained value: (softplus_2(raw) + MIN_STD) / (1 + MIN_STD), where
    softplus_2(t) = log2(1 + 2^t) (Efficient-VDVAE's smoothed softplus). Exactly 1 at raw = 0 (a zero-initialised
    layer starts at N(0, 1)), bounded below by about MIN_STD, linear above: no exp to overflow in bf16."""
    return (F.softplus(raw, beta=math.log(2.0)) + MIN_STD) / (1.0 + MIN_STD)


class Bottleneck(nn.Module):
    """VDVAE's cell: 1x1 -> 3x3 -> 3x3 -> 1x1 convolutions, each after a SiLU, `mid` channels in between.

    `residual`: x + f(x) (then c_in == c_out). The last convolution starts at zero (`zero_last`), so a new residual
    cell is the identity and a new output head outputs zeros. `spatial=False` makes the middle convolutions 1x1
    (VDVAE's choice at sides 1 and 2, where a 3x3 sees mostly padding)."""

    def __init__(self, c_in: int, mid: int, c_out: int, residual: bool = False, spatial: bool = True,
                 zero_last: bool = True):
        super().__init__()
        k = 3 if spatial else 1
        self.residual = residual
        self.c1 = nn.Conv2d(c_in, mid, 1)
        self.c2 = nn.Conv2d(mid, mid, k, padding=k // 2)
        self.c3 = nn.Conv2d(mid, mid, k, padding=k // 2)
        self.c4 = nn.Conv2d(mid, c_out, 1)
        if zero_last:
            nn.init.zeros_(self.c4.weight)
            nn.init.zeros_(self.c4.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.c4(F.silu(self.c3(F.silu(self.c2(F.silu(self.c1(F.silu(x))))))))
        return x + out if self.residual else out
