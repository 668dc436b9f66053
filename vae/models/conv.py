"""The convolutional VAE: encoder q(z|x) = N(mu, diag(exp(logvar))), decoder to likelihood parameters.

The model computes nothing but the networks: objectives live in `vae/core/objectives.py`, the observation model in
`vae/models/likelihoods.py`, shared blocks in `vae/models/blocks.py`. Inputs are images in [0, 1], float,
[N, 3, H, W]; latents are [N, latent_dim].
"""

from __future__ import annotations

import torch
from torch import nn

from vae.core.config import ModelConfig
from vae.models.blocks import ResBlock, soft_bound
from vae.models.likelihoods import get_likelihood
from vae.models.protocol import gaussian_posterior_pass


class ConvVAE(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.in_channels = in_channels
        self.latent_dim = cfg.latent_dim
        self.likelihood = get_likelihood(cfg.likelihood, cfg.mixtures)
        widths = list(cfg.channels)
        self.bottom = cfg.image_size // 2 ** len(widths)
        flat = widths[-1] * self.bottom * self.bottom

        enc: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            enc += [nn.Conv2d(prev, width, 4, stride=2, padding=1), nn.SiLU()]
            enc += [ResBlock(width) for _ in range(cfg.res_blocks)]
            prev = width
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.to_posterior = nn.Linear(flat, 2 * cfg.latent_dim)

        self.from_latent = nn.Linear(cfg.latent_dim, flat)
        dec: list[nn.Module] = []
        rev = widths[::-1]
        for i, width in enumerate(rev):
            out = rev[i + 1] if i + 1 < len(rev) else widths[0]
            dec += [ResBlock(width) for _ in range(cfg.res_blocks)]
            dec += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1), nn.SiLU()]
        out_channels = self.likelihood.num_params(in_channels)
        self.decoder = nn.Sequential(*dec, nn.Conv2d(widths[0], out_channels, 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1] -> (mu, logvar) of q(z|x)."""
        h = self.to_posterior(self.encoder(x * 2.0 - 1.0))
        mu, logvar = h.chunk(2, dim=1)
        return mu, soft_bound(logvar)

    def bottom_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the posterior needs from x: (mu, logvar), shared by any number of samples."""
        return self.encode(x)

    def posterior_pass(self, features: tuple[torch.Tensor, torch.Tensor], eps: torch.Tensor):
        """K samples from eps [K, N, D]: (params [K*N, ...], u, mu, logvar [K, N, D])."""
        return gaussian_posterior_pass(self, features, eps)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z -> likelihood parameters [N, likelihood.num_params(C), H, W]."""
        h = self.from_latent(z).view(z.shape[0], -1, self.bottom, self.bottom)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reparameterized training pass: x in [0, 1], eps ~ N(0, I) drawn by the caller.

        Returns (likelihood params, mu, logvar); z = mu + exp(logvar / 2) * eps, its scale in float32.
        """
        mu, logvar = self.encode(x)
        z = mu.float() + torch.exp(0.5 * logvar.float()) * eps
        return self.decode(z.to(mu.dtype)), mu, logvar

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """z -> the image the decoder means, in [0, 1] (what `decoder.onnx` returns as `x_mean`)."""
        return self.likelihood.mean(self.decode(z))
