"""What every model presents to the objectives, training, evaluation and export (a typed Protocol).

Inputs are images in [0, 1], float [N, C, H, W]; latents are [N, latent_dim] with the prior N(0, I). The
posterior is reached in two calls so that K samples reuse one encoder pass: `bottom_up(x01)` computes what the
posterior needs from x (the conv VAE: its (mu, logvar); the hierarchical VAE: its feature maps), and
`posterior_pass(features, eps)` turns noise eps [K, N, latent_dim] into samples u = mu + exp(logvar / 2) * eps
along each sample's own path, returning (likelihood params [K*N, ...], u, mu, logvar [K, N, latent_dim]).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from vae.config import ModelConfig


@runtime_checkable
class VAEModel(Protocol):
    cfg: ModelConfig
    latent_dim: int
    likelihood: Any  # vae.models.likelihoods.Likelihood: log_prob(params, x), mean(params), num_params(C)

    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x) [N, latent_dim] (the hierarchical VAE: along the posterior-mean path)."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters [N, likelihood.num_params(C), H, W] for latents z."""

    def decode_mean(self, z: torch.Tensor) -> torch.Tensor:
        """The image the decoder means, in [0, 1]: what `decoder.onnx` returns."""

    def forward(self, x01: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One reparameterized posterior sample per image: (params, mu, logvar) of the sampled path."""

    def bottom_up(self, x01: torch.Tensor) -> Any:
        """What the posterior needs from x, computed once for any number of samples."""

    def posterior_pass(self, features: Any, eps: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """K posterior samples from eps [K, N, latent_dim]: (params [K*N, ...], u, mu, logvar [K, N, D])."""


def gaussian_posterior_pass(model: VAEModel, features: tuple[torch.Tensor, torch.Tensor], eps: torch.Tensor):
    """`posterior_pass` for a model whose posterior is one Gaussian per image, `features` = (mu, logvar):
    u = mu + exp(logvar / 2) * eps, decoded in the model's parameter dtype; mu and logvar broadcast to [K, N, D]."""
    mu, logvar = (t.float() for t in features)
    k, n, d = eps.shape
    u = mu + torch.exp(0.5 * logvar) * eps
    params = model.decode(u.reshape(k * n, d).to(next(model.parameters()).dtype))
    return params, u, mu.expand(k, n, d), logvar.expand(k, n, d)
