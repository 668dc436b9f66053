"""The download-free feature space of the sample metrics: a fixed, randomly initialised convolutional network.

KID, precision/recall and density/coverage need an embedding of images. The FID Inception network needs a
weights file these machines cannot download, and a network trained here would move with every retrain. Naeem
et al. (2020, "Reliable Fidelity and Diversity Metrics for Generative Models") show that randomly initialised
convolutional embeddings rank generative models sensibly where ImageNet features do not fit the domain. So the
features are those of a small random CNN whose weights are drawn from a named, frozen random stream (numpy's
legacy `RandomState`, whose stream numpy guarantees never to change) and pinned by their sha256: figures are only
compared when their `features` identity is the same.

The network: images larger than 64x64 resized to 64x64 (antialiased; smaller ones, such as the demo's 32x32,
run at their own size, which costs a quarter and compares only with figures at that size, as the `measure` and
the split's fingerprint ensure) and scaled to [-1, 1]; four 3x3 stride-2 convolutions with
ReLU (32, 64, 128, 256 channels, He-normal weights, no bias). The embedding concatenates the spatial means of the
first three stages (colour and texture statistics at three scales) and the last stage pooled to 2x2 (coarse
layout), each part divided by the square root of its size so that every part weighs the same in a distance.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ENV_WEIGHTS = "VAE_INCEPTION_WEIGHTS"
NAME = "randconv-v1"
SEED = 20181203
INPUT_SIDE = 64
WIDTHS = (32, 64, 128, 256)


class RandomFeatures(nn.Module):
    """forward(x: float [N, 3, H, W] in [0, 1]) -> float32 [N, dims]."""

    def __init__(self):
        super().__init__()
        rng = np.random.RandomState(SEED)
        self.convs = nn.ModuleList()
        previous = 3
        for width in WIDTHS:
            conv = nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False)
            weights = rng.standard_normal(conv.weight.shape) * np.sqrt(2.0 / (previous * 9))
            conv.weight.data = torch.from_numpy(weights.astype(np.float32))
            conv.requires_grad_(False)
            self.convs.append(conv)
            previous = width
        self.dims = sum(WIDTHS[:-1]) + 4 * WIDTHS[-1]
        self.eval()

    def identity(self) -> dict:
        digest = hashlib.sha256()
        for conv in self.convs:
            digest.update(conv.weight.detach().cpu().numpy().tobytes())
        return {"name": NAME, "sha256": digest.hexdigest(), "dims": self.dims}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-1] > INPUT_SIDE or x.shape[-2] != x.shape[-1]:  # smaller squares run at their own size
            x = F.interpolate(x, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", align_corners=False,
                              antialias=True)
        h, parts = x * 2 - 1, []
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(h))
            part = h.mean((2, 3)) if i < len(self.convs) - 1 else F.adaptive_avg_pool2d(h, 2).flatten(1)
            parts.append(part / part.shape[1] ** 0.5)
        # each part's squared norm is its mean squared activation; scaled so that x.y / dims is of order one,
        # the scale KID's polynomial kernel (x.y / dims + 1)^3 expects
        return torch.cat(parts, dim=1) * (self.dims / len(parts)) ** 0.5


def embed(network: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features of `images` [N, 3, H, W] in [0, 1], in batches, on the network's device; returned on the CPU."""
    device = next(network.parameters()).device
    out = [network(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def resolve_weights(cli_value: str | None, config_value: str = "") -> str | None:
    """Where the FID Inception weights are (`vae.evaluation.inception` checks and loads them): the CLI flag, else
    $VAE_INCEPTION_WEIGHTS, else the config's eval.inception_weights; None when none is given (empty or blank
    strings count as not given). Here, not beside the network, so that finding none imports no torchvision."""
    for value in (cli_value, os.environ.get(ENV_WEIGHTS), config_value):
        if value is not None and value.strip():
            return value
    return None
