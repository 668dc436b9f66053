"""A top-down hierarchical VAE (in the spirit of NVAE and VDVAE): latent groups at several resolutions.

Bottom-up, a residual conv encoder (as the conv VAE's) keeps its feature map at each resolution. Top-down,
from a learned constant at the coarsest resolution, each group l (one per resolution, the coarsest first)
has a prior p(z_l | z_<l) = N(mu_p, sigma_p^2) and a posterior computed from the top-down state and the
bottom-up features at its resolution; z_l is added to the state, residual cells refine it, and the state
is upsampled towards the image.

The latent is parameterised in the *whitened prior*: z_l = mu_p + sigma_p * u_l, so p(u) = N(0, I) for the
whole flat vector u (every group's [latent_channels, side, side] flattened, top group first, `latent_dim`
values). The posterior over u_l is q(u_l | x, u_<l) = N(mu_q, exp(logvar_q)), i.e. in z-space
N(mu_p + sigma_p * mu_q, sigma_p^2 * exp(logvar_q)): NVAE's residual normal. The KL of each group in u-space
equals the KL in z-space (an affine change of variables), so the objectives' analytic KL against N(0, I),
evaluated along the sampled path, is the NVAE-style per-group KL.

Interface (what the objectives, training, evaluation and export use, the same as the conv VAE's):
- `decode(u)`: deterministic top-down pass with u as the noise -> likelihood params (no random op: the
  caller draws u ~ N(0, I), so `decoder.onnx` samples exactly like the conv VAE's).
- `forward(x01, eps)`: one posterior sample u = mu + exp(logvar / 2) * eps along its own path, returns
  (params, mu, logvar) with the path's flat posterior parameters.
- `bottom_up(x01)` and `posterior_pass(features, eps)`: what `log_weights` calls to draw K samples.
- `encode(x01)`: the flat (mu, logvar) along the posterior-mean path (u_l = mu_q of each group); decoding
  that mu reproduces the mean path exactly, so reconstructions and `encoder.onnx` stay meaningful.
"""

from __future__ import annotations

import torch
from torch import nn

from vae.core.config import ModelConfig
from vae.models.blocks import ResBlock, soft_bound
from vae.models.likelihoods import get_likelihood
from vae.models.protocol import TopDownLatents


class LatentGroup(nn.Module):
    """One group's prior, posterior and the residual cell that merges its sample into the state."""

    def __init__(self, width: int, latent_channels: int, res_blocks: int):
        super().__init__()
        self.prior = nn.Sequential(ResBlock(width), nn.Conv2d(width, 2 * latent_channels, 3, padding=1))
        self.posterior = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), ResBlock(width),
                                       nn.Conv2d(width, 2 * latent_channels, 3, padding=1))
        self.merge = nn.Conv2d(latent_channels, width, 1)
        self.cell = nn.Sequential(*[ResBlock(width) for _ in range(max(1, res_blocks))])
        # A new group starts with the prior N(0, I) and the posterior N(0, I): KL 0, like a fresh conv VAE.
        for conv in (self.prior[-1], self.posterior[-1]):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu_p, log_sigma_p = self.prior(h).chunk(2, dim=1)
        return mu_p, soft_bound(log_sigma_p, 6.0)

    def posterior_params(self, h: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu_q, logvar_q = self.posterior(torch.cat([h, features], dim=1)).chunk(2, dim=1)
        return mu_q, soft_bound(logvar_q)

    def merge_sample(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        mu_p, log_sigma_p = self.prior_params(h)
        z = mu_p + torch.exp(log_sigma_p) * u
        return self.cell(h + self.merge(z))

    def visit(self, h: torch.Tensor, features: torch.Tensor | None, noise: torch.Tensor | None, mean_path: bool):
        """The group's step of the top-down pass (`TopDownLatents._top_down`): (h, u_l, mu_q, logvar_q)."""
        if features is None:
            return self.merge_sample(h, noise), noise, None, None
        mu_q, logvar_q = self.posterior_params(h, features)
        u = mu_q if mean_path else mu_q + torch.exp(0.5 * logvar_q) * noise.to(mu_q.dtype)
        return self.merge_sample(h, u), u, mu_q, logvar_q


class HierarchicalVAE(TopDownLatents, nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.likelihood = get_likelihood(cfg.likelihood, cfg.mixtures)
        widths = list(cfg.channels)
        self.depth = len(widths)
        self.sides = cfg.group_resolutions()  # top group first
        self.group_shapes = [(cfg.latent_channels, r, r) for r in self.sides]
        self.group_sizes = [c * r * r for c, r, _ in self.group_shapes]
        self.latent_dim = sum(self.group_sizes)
        self.group_levels = list(range(self.depth - 1, self.depth - 1 - cfg.groups, -1))  # resolution index

        self.down = nn.ModuleList()
        prev = in_channels
        for width in widths:
            self.down.append(nn.Sequential(nn.Conv2d(prev, width, 4, stride=2, padding=1), nn.SiLU(),
                                           *[ResBlock(width) for _ in range(cfg.res_blocks)]))
            prev = width

        bottom = cfg.image_size // 2 ** self.depth
        self.h0 = nn.Parameter(torch.zeros(1, widths[-1], bottom, bottom))
        self.groups = nn.ModuleList(LatentGroup(widths[s], cfg.latent_channels, cfg.res_blocks)
                                    for s in self.group_levels)
        self.up = nn.ModuleList()
        for s in range(self.depth - 1, -1, -1):  # coarsest first, as the top-down pass runs
            out = widths[s - 1] if s > 0 else widths[0]
            self.up.append(nn.Sequential(*[ResBlock(widths[s]) for _ in range(cfg.res_blocks)],
                                         nn.ConvTranspose2d(widths[s], out, 4, stride=2, padding=1), nn.SiLU()))
        out_channels = self.likelihood.num_params(in_channels)
        self.to_params = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    # -- the passes ---------------------------------------------------------------------------------------
    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in [0, 1] -> the encoder's feature map at each resolution, finest first."""
        h, features = x * 2.0 - 1.0, []
        for block in self.down:
            h = block(h)
            features.append(h)
        return features

    def _rise(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.up[i](h)  # every level ends with its transposed convolution, the finest too

    def _to_params(self, h: torch.Tensor) -> torch.Tensor:
        return self.to_params(h)
