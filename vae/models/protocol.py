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

from vae.core.config import ModelConfig


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


class TopDownLatents:
    """The `VAEModel` methods of a top-down model and its one top-down pass, built on the model's
    `bottom_up(x01)` (feature maps, finest level first) and its parts:
    - `h0` [1, C, side, side], the learned state at the coarsest level; `depth`, the number of levels;
    - `groups`, top group first, each with `visit(h, features, noise, mean_path) -> (h, u_l, mu_q, logvar_q)`
      (features None: the prior path, noise is u_l itself), at the levels `group_levels` (index into levels);
    - `_rise(i, h)`: the state after the i-th level from the top to the next; `_to_params(h)`: to the
      likelihood's parameters;
    - `group_shapes` ([C, side, side] per latent group) and `group_sizes` (their sizes), top group first; the
      flat latent is every group's u flattened in that order.

    Mixed into `HierarchicalVAE` and `VDVAE` (before nn.Module, so its `forward` is the model's)."""

    group_shapes: list[tuple[int, int, int]]
    group_sizes: list[int]
    group_levels: list[int]
    depth: int

    def _top_down(self, n: int, u: torch.Tensor | None = None, features: list[torch.Tensor] | None = None,
                  eps: torch.Tensor | None = None, mean_path: bool = False):
        """The one top-down pass. Without features: the prior path with noise `u` (decode). With features: the
        posterior path, u_l = mu_q + std_q * eps_l (or mu_q on the mean path).

        Returns (params, u, mu_q, logvar_q), the last three flat ([n, latent_dim]; None on the prior path)."""
        noise = u if features is None else eps
        noises = self._split(noise) if noise is not None else [None] * len(self.groups)
        h = self.h0.expand(n, -1, -1, -1)
        taken, mus, logvars, g = [], [], [], 0
        for i in range(self.depth):
            level = self.depth - 1 - i
            while g < len(self.groups) and self.group_levels[g] == level:
                h, u_l, mu_q, logvar_q = self.groups[g].visit(
                    h, None if features is None else features[level], noises[g], mean_path)
                taken.append(u_l)
                mus.append(mu_q)
                logvars.append(logvar_q)
                g += 1
            h = self._rise(i, h)
        params = self._to_params(h)
        if features is None:
            return params, None, None, None
        return params, self._flat(taken), self._flat(mus), self._flat(logvars)

    # -- the flat latent <-> the groups ------------------------------------------------------------------
    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [part.reshape(flat.shape[0], *shape)
                for part, shape in zip(flat.split(self.group_sizes, dim=1), self.group_shapes)]

    @staticmethod
    def _flat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.flatten(1) for p in parts], dim=1)

    # -- the interface ------------------------------------------------------------------------------------
    def posterior_pass(self, features: list[torch.Tensor], eps: torch.Tensor):
        """K posterior samples along their own paths: eps [K, N, latent_dim] ~ N(0, I).

        Returns (params [K*N, ...], u, mu, logvar [K, N, latent_dim]) with u = mu + exp(logvar / 2) * eps."""
        k, n, d = eps.shape
        repeated = [f.unsqueeze(0).expand(k, *f.shape).reshape(k * n, *f.shape[1:]) for f in features]
        params, u, mu, logvar = self._top_down(k * n, features=repeated, eps=eps.reshape(k * n, d))
        return params, u.view(k, n, d), mu.view(k, n, d), logvar.view(k, n, d)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1] -> flat (mu, logvar) of q(u|x) along the posterior-mean path (each u_l = its mu_q).

        The lower groups' posterior depends on the upper groups' sample; this is the one path that needs no
        noise. `decode(mu)` follows exactly this path, so it is the model's reconstruction of x."""
        _, _, mu, logvar = self._top_down(x.shape[0], features=self.bottom_up(x), mean_path=True)
        return mu, logvar

    def decode(self, u: torch.Tensor) -> torch.Tensor:
        """u [N, latent_dim] (the whitened prior noise, N(0, I) for samples) -> likelihood parameters."""
        return self._top_down(u.shape[0], u=u)[0]

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reparameterized training pass: one posterior sample per image along its own path.

        Returns (likelihood params, mu, logvar): the flat posterior parameters of the sampled path, so
        `gaussian_kl(mu, logvar)` is the per-group analytic KL against the whitened prior N(0, I)."""
        params, _, mu, logvar = self._top_down(x.shape[0], features=self.bottom_up(x), eps=eps)
        return params, mu, logvar

    def decode_mean(self, u: torch.Tensor) -> torch.Tensor:
        """u -> the image the decoder means, in [0, 1] (what `decoder.onnx` returns as `x_mean`)."""
        return self.likelihood.mean(self.decode(u))
