"""Building blocks shared by the models (the conv VAE and the hierarchical VAE import them from here)."""

from __future__ import annotations

import torch
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
