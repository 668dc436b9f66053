"""Objectives: one log-weight function, and the ELBO, IWAE bound and bits/dim derived from it.

`log_weights` computes log p(x|z_k) + log p(z_k) - log q(z_k|x) for K posterior samples; `iwae_bound`
combines chunks of them with a running logsumexp so memory does not grow with K; the training ELBO uses the
analytic KL (lower variance) with beta, warm-up and free bits applied to training only. All values are
per image, in nats, computed in float32 whatever the autocast context.

Models present `vae.models.protocol.VAEModel`: `bottom_up(x01)` once per image, then
`posterior_pass(features, eps) -> (params, u, mu, logvar)` for any number of samples, and `likelihood.log_prob`;
so there is one log-weight computation for every kind of model, including those whose posterior depends on its
own sample (the top-down hierarchical VAE: q(u_l | x, u_<l)).

Noise comes from a `torch.Generator` or from `ImageNoise`, which draws each image's noise from its own
generator seeded by the image's key: then an image's bound does not depend on the images beside it in a batch,
on the order of the data, or on how many processes share it.
"""

from __future__ import annotations

import hashlib
import math

import torch

from vae.models.protocol import VAEModel

LOG_2PI = math.log(2 * math.pi)


class ImageNoise:
    """Standard normal draws per image, each image's from a generator seeded by (seed, its key)."""

    def __init__(self, seed: int, keys, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(key_seed(seed, key)) for key in keys]

    def normal(self, k: int, d: int) -> torch.Tensor:
        """[k, N, d]: image n's next k draws of d dimensions."""
        return torch.stack([torch.randn((k, d), generator=g, device=self.device) for g in self.generators], dim=1)


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed from a run's seed and an image key."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big") >> 1


def standard_normal(k: int, n: int, d: int, device, generator: torch.Generator | ImageNoise | None) -> torch.Tensor:
    """[k, n, d] draws of N(0, I) from a generator, an `ImageNoise` (of n images) or the global generator."""
    if isinstance(generator, ImageNoise):
        if len(generator.generators) != n:
            raise ValueError(f"noise for {len(generator.generators)} images, asked for {n}")
        return generator.normal(k, d).to(device)
    return torch.randn((k, n, d), device=device, generator=generator)


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """Pixel levels 0..255 -> float in [0, 1], the encoder's input."""
    return x_uint8.float() / 255.0


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per dimension, [N, D]."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def posterior_features(model: VAEModel, x01: torch.Tensor):
    """What the posterior needs from x, computed once per image (`VAEModel.bottom_up`)."""
    return model.bottom_up(x01)


def posterior_samples(model: VAEModel, features, eps: torch.Tensor):
    """Samples u = mu + exp(logvar / 2) * eps of q(u|x), eps [K, N, D] ~ N(0, I), and their likelihood params.

    Returns (params [K*N, ...], u, mu, logvar [K, N, D]) in float32; for a hierarchical model mu and logvar are
    the conditional posterior parameters along each sample's own path."""
    params, u, mu, logvar = model.posterior_pass(features, eps)
    return params, u.float(), mu.float(), logvar.float()


def log_weights(model: VAEModel, x: torch.Tensor, k: int, features=None,
                generator: torch.Generator | ImageNoise | None = None) -> torch.Tensor:
    """log p(x|z_k) + log p(z_k) - log q(z_k|x) for k samples z_k ~ q(z|x): shape [k, N].

    `x` holds pixel levels 0..255. Pass `features` (`posterior_features`) to reuse one encoder pass across
    chunks of samples.
    """
    if features is None:
        features = posterior_features(model, to_unit(x))
    n, d = x.shape[0], model.latent_dim
    eps = standard_normal(k, n, d, x.device, generator)
    params, u, mu, logvar = posterior_samples(model, features, eps)
    x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
    log_px = model.likelihood.log_prob(params.float(), x_rep).view(k, n)
    return log_px + log_standard_normal(u) - log_normal(u, mu, logvar)


@torch.no_grad()
def iwae_bound(model: VAEModel, x: torch.Tensor, k: int, chunk: int = 50,
               generator: torch.Generator | ImageNoise | None = None) -> torch.Tensor:
    """log (1/K) sum_k p(x, z_k) / q(z_k|x), per image [N], chunked over K with a running logsumexp."""
    features = posterior_features(model, to_unit(x))
    running = None
    done = 0
    while done < k:
        step = min(chunk, k - done)
        lw = torch.logsumexp(log_weights(model, x, step, features, generator), dim=0)
        running = lw if running is None else torch.logaddexp(running, lw)
        done += step
    return running - math.log(k)


def elbo_terms(model: VAEModel, x: torch.Tensor, eps: torch.Tensor, likelihood=None) -> dict[str, torch.Tensor]:
    """One-sample reconstruction term and analytic KL per image; `kl_dims` is per latent dimension.

    Calls `model(x01, eps)` (the forward pass, so DDP hooks run); `likelihood` defaults to the model's. For
    the hierarchical VAE, (mu, logvar) are each group's conditional posterior along the sampled path, so
    `kl_dims` is the per-group analytic KL against the whitened prior N(0, I) there (NVAE's estimator).
    """
    params, mu, logvar = model(to_unit(x), eps)
    likelihood = likelihood or model.likelihood
    recon = likelihood.log_prob(params.float(), x)
    kl_dims = gaussian_kl(mu, logvar)
    return {"recon": recon, "kl": kl_dims.sum(1), "kl_dims": kl_dims, "elbo": recon - kl_dims.sum(1),
            "mu": mu.float()}


def beta_at(step: int, beta: float, warmup_steps: int) -> float:
    """KL weight at a training step: linear warm-up from 0 to beta."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def kl_balance_groups(cfg, beta: float) -> list[int] | None:
    """The latent groups' sizes (`ModelConfig.latent_group_sizes`) while `objective.kl_balance` applies, during
    the KL warm-up (beta below its target); else None. What `training_loss` takes as `balance`."""
    if cfg.objective.kl_balance and beta < cfg.objective.beta:
        return cfg.model.latent_group_sizes()
    return None


def kl_balance_weights(group_kl: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """NVAE's KL balancing coefficients [G] for the groups' batch-mean KL [G]: proportional to each group's KL
    per dimension (plus 0.01 nats per group, so a collapsed group keeps a little weight), mean 1 over the
    groups, constants for the gradient. A group that carries little information is penalised less for it, so
    no group collapses while beta is small; the groups' total weight stays that of the plain sum."""
    share = (group_kl.detach() + 0.01) / torch.tensor(sizes, dtype=group_kl.dtype, device=group_kl.device)
    return share / share.mean()


def training_loss(terms: dict[str, torch.Tensor], beta: float, free_bits: float,
                  balance: list[int] | None = None) -> torch.Tensor:
    """Negative (reconstruction - beta * KL), KL per dimension floored at `free_bits` nats (batch mean).

    `balance` (the latent groups' sizes, from `kl_balance_groups`): each group's KL weighted by
    `kl_balance_weights`. Training only: evaluation reports the true bound, never this."""
    kl_dims = terms["kl_dims"]
    if balance is not None and len(balance) > 1:
        per_dim = torch.clamp(kl_dims.mean(0), min=free_bits) if free_bits > 0 else kl_dims.mean(0)
        group_kl = torch.stack([part.sum() for part in per_dim.split(balance)])
        kl = (kl_balance_weights(group_kl, balance) * group_kl).sum()
    elif free_bits > 0:
        kl = torch.clamp(kl_dims.mean(0), min=free_bits).sum()
    else:
        kl = kl_dims.sum(1).mean()
    return -(terms["recon"].mean() - beta * kl)


def image_dims(size: int, channels: int = 3) -> int:
    """D in bits/dim: the sub-pixels of one image (3 * 64 * 64 for CelebA-64)."""
    return channels * size * size


def bits_per_dim(log_px_nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """-log p(x) / (D ln 2): nats per image to bits per sub-pixel."""
    return -log_px_nats / (dims * math.log(2.0))

