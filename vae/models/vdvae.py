"""A deep top-down hierarchical VAE in the manner of VDVAE: many latent groups per resolution, set by
`model.layout`, every network in it the same bottleneck residual cell (`blocks.Bottleneck`).

The layout reads top-down from the coarsest side: "4x2,8x3,16x3,32x2" places 2 latent groups at 4x4, then 3 at
8x8, 3 at 16x16 and 2 at 32x32 (10 groups of `latent_channels` channels each). `model.channels[k]` is the width
at side image_size / 2^(k+1), as for the other models, and the layout starts at the last of those sides.

Bottom-up (the encoder): a stride-2 4x4 convolution from the image to side image_size / 2, then at each side
`model.res_blocks` residual cells, keeping the feature map there; between sides an average pooling (and a 1x1
convolution where the width changes). Nothing but the stem runs at the image's full resolution.

Top-down (the decoder, and the posterior's path), from a learned constant at the coarsest side; per group
(VDVAE's DecBlock, in the whitened prior of `vae/models/hierarchical.py`):
  prior cell(h)                 -> mu_p, std_p of z_l, and a residual update of h
  posterior cell([h, features]) -> mu_q, std_q of u_l: q(u_l | x, u_<l) (NVAE's residual normal in z)
  z_l = mu_p + std_p * u_l;  h = cell(h + proj(z_l))
Between sides: a 1x1 convolution where the width changes (at the coarser side, the cheaper), nearest upsampling
and a learned bias per side; then a transposed 4x4 convolution to the likelihood's parameters at full size.
Every group works at its own side: no group pays for a finer resolution than its own.

Standard deviations come through `softplus_std` (bounded below, no exp). The flat latent u (every group's u_l,
top group first) is N(0, I) under the prior: `decode(u)` is a deterministic pass with u given, so
`decoder.onnx` takes the whitened prior noise; KL(q(u_l) || N(0, I)) is each group's KL in z. At
initialisation the last convolution of every cell is zero: residual cells are the identity, every prior and
posterior is N(0, I) (KL exactly 0), and each group's projection is scaled by 1/sqrt(groups) (VDVAE) so the sum
of all groups' noise keeps its scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae.core.config import ModelConfig
from vae.models.blocks import Bottleneck, softplus_std
from vae.models.likelihoods import get_likelihood
from vae.models.protocol import TopDownLatents

BOTTLENECK = 4  # a cell's middle width is its width / 4 (VDVAE's bottleneck_multiple 0.25)


def _cell(width: int, side: int) -> Bottleneck:
    """A residual cell at this width and side, the identity when new."""
    return Bottleneck(width, max(1, width // BOTTLENECK), width, residual=True, spatial=side > 2)


class TopDownGroup(nn.Module):
    """One latent group: its prior (with a residual update of the state), its posterior, and the cell that
    merges its sample into the state."""

    def __init__(self, width: int, latent_channels: int, side: int, n_groups: int):
        super().__init__()
        mid, spatial = max(1, width // BOTTLENECK), side > 2
        self.latent_channels, self.width = latent_channels, width
        self.prior = Bottleneck(width, mid, 2 * latent_channels + width, spatial=spatial)
        self.posterior = Bottleneck(2 * width, mid, 2 * latent_channels, spatial=spatial)
        self.proj = nn.Conv2d(latent_channels, width, 1)
        with torch.no_grad():
            self.proj.weight.mul_(math.sqrt(1.0 / n_groups))
        self.cell = _cell(width, side)

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mu_p, std_p) in float32, and the state with the prior cell's update added."""
        c = self.latent_channels
        mu_p, raw, update = self.prior(h).split([c, c, self.width], dim=1)
        return mu_p.float(), softplus_std(raw.float()), h + update

    def posterior_params(self, h: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_q, std_q) of u_l in float32, from the state before the prior's update and the encoder's features."""
        mu_q, raw = self.posterior(torch.cat([h, features], dim=1)).float().chunk(2, dim=1)
        return mu_q, softplus_std(raw)

    def merge(self, h: torch.Tensor, mu_p: torch.Tensor, std_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        z = mu_p + std_p * u
        return self.cell(h + self.proj(z.to(h.dtype)))

    def visit(self, h: torch.Tensor, features: torch.Tensor | None, noise: torch.Tensor | None, mean_path: bool):
        """The group's step of the top-down pass (`TopDownLatents._top_down`): (h, u_l, mu_q, logvar_q)."""
        mu_p, std_p, h_prior = self.prior_params(h)
        if features is None:
            u, mu_q, logvar_q = noise.to(mu_p.dtype), None, None
        else:
            mu_q, std_q = self.posterior_params(h, features)
            u = mu_q if mean_path else mu_q + std_q * noise.to(mu_q.dtype)
            logvar_q = 2.0 * torch.log(std_q)
        return self.merge(h_prior, mu_p, std_p, u), u, mu_q, logvar_q


class Upsample(nn.Module):
    """From one side to the next finer: a 1x1 convolution where the width changes, nearest upsampling, a bias."""

    def __init__(self, c_in: int, c_out: int, side_out: int):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.bias = nn.Parameter(torch.zeros(1, c_out, side_out, side_out))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.proj(h), scale_factor=2.0, mode="nearest") + self.bias


class VDVAE(TopDownLatents, nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.likelihood = get_likelihood(cfg.likelihood, cfg.mixtures)
        widths, sides = list(cfg.channels), cfg.level_sides()  # finest first
        self.depth = len(widths)
        self.sides = cfg.group_resolutions()  # top group first
        self.group_shapes = [(cfg.latent_channels, r, r) for r in self.sides]
        self.group_sizes = [c * r * r for c, r, _ in self.group_shapes]
        self.latent_dim = sum(self.group_sizes)
        self.group_levels = [sides.index(r) for r in self.sides]  # the level (index into channels) of each group

        self.stem = nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1)
        self.down = nn.ModuleList()
        for s, (width, side) in enumerate(zip(widths, sides)):
            pool = [] if s == 0 else [nn.AvgPool2d(2)]
            if s > 0 and widths[s - 1] != width:
                pool.append(nn.Conv2d(widths[s - 1], width, 1))
            self.down.append(nn.Sequential(*pool, *[_cell(width, side) for _ in range(cfg.res_blocks)]))

        self.h0 = nn.Parameter(torch.zeros(1, widths[-1], sides[-1], sides[-1]))
        self.groups = nn.ModuleList(TopDownGroup(widths[s], cfg.latent_channels, sides[s], len(self.sides))
                                    for s in self.group_levels)
        # up[i] goes from level depth-1-i to the next finer level, in the order the top-down pass runs
        self.up = nn.ModuleList(Upsample(widths[s], widths[s - 1], sides[s - 1]) for s in range(self.depth - 1, 0, -1))
        self.to_params = nn.ConvTranspose2d(widths[0], self.likelihood.num_params(in_channels), 4, stride=2,
                                            padding=1)

    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in [0, 1] -> the encoder's feature map at each side, finest first."""
        h, features = self.stem(x * 2.0 - 1.0), []
        for block in self.down:
            h = block(h)
            features.append(h)
        return features

    def _rise(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.up[i](h) if i < self.depth - 1 else h  # the finest level goes to `to_params` as it is

    def _to_params(self, h: torch.Tensor) -> torch.Tensor:
        return self.to_params(F.silu(h))
