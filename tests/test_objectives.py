"""Objectives against math: a linear-Gaussian model with an exact log p(x), analytic KL against Monte
Carlo, likelihoods that sum to one over the 256 levels, and bits/dim by hand."""

import math

import pytest
import torch
from torch.distributions import Normal

from vae.models.likelihoods import Bernoulli, DiscretizedLogistic, Gaussian, LogisticMixture
from vae.models.protocol import gaussian_posterior_pass
from vae.core.objectives import (ImageNoise, bits_per_dim, elbo_terms, gaussian_kl, iwae_bound, log_weights,
                            training_loss)


class ExactGaussian:
    """p(x|z) = N(x; params, s^2 I) as a density of raw x (the linear-Gaussian test's likelihood)."""

    def __init__(self, s: float):
        self.s = s

    def log_prob(self, params, x):
        return Normal(params.double(), self.s).log_prob(x.double()).flatten(1).sum(1).float()


class LinearGaussian(torch.nn.Module):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I), W with orthogonal columns so the posterior is diagonal.

    q(z|x) is the exact posterior scaled by `mean_scale` and `var_scale` (1, 1: exact)."""

    def __init__(self, D=6, d=2, s=0.7, mean_scale=1.0, var_scale=1.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
        self.scales = torch.tensor([1.5, 0.8], dtype=torch.float64)[:d]
        self.W = q * self.scales
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        self.s, self.D, self.latent_dim = s, D, d
        self.mean_scale, self.var_scale = mean_scale, var_scale
        self.likelihood = ExactGaussian(s)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s ** 2 * torch.eye(self.D, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.double())

    def encode(self, u):
        x = u.double() * 255.0  # objectives hand the encoder x / 255
        post_var = 1.0 / (1.0 + self.scales ** 2 / self.s ** 2)
        mu = (x - self.b) @ self.W / self.s ** 2 * post_var
        logvar = torch.log(post_var * self.var_scale).expand_as(mu)
        return (mu * self.mean_scale).float(), logvar.float()

    def decode(self, z):
        return (z.double() @ self.W.T + self.b).float()

    def forward(self, u, eps):
        mu, logvar = self.encode(u)
        return self.decode(mu + torch.exp(0.5 * logvar) * eps), mu, logvar

    def bottom_up(self, u):
        return self.encode(u)

    def posterior_pass(self, features, eps):
        return gaussian_posterior_pass(self, features, eps)


def _data(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=g, dtype=torch.float64)
    return (z @ model.W.T + model.b + model.s * torch.randn(n, model.D, generator=g, dtype=torch.float64)).float()


def test_exact_posterior_makes_every_bound_exact():
    model = LinearGaussian()
    x = _data(model, 5)
    exact = model.log_px(x).float()
    g = torch.Generator().manual_seed(0)
    lw = log_weights(model, x, 7, generator=g)
    assert lw.shape == (7, 5)
    torch.testing.assert_close(lw, exact.expand(7, 5), atol=2e-4, rtol=0)  # every weight is p(x)
    for k in (1, 10, 100):
        torch.testing.assert_close(iwae_bound(model, x, k, chunk=3, generator=g), exact, atol=2e-4, rtol=0)


def test_exact_posterior_analytic_elbo_is_log_px_on_average():
    model = LinearGaussian()
    x = _data(model, 1).expand(20000, -1).contiguous()
    exact = model.log_px(x[:1]).item()
    eps = torch.randn(20000, 2, generator=torch.Generator().manual_seed(2))
    elbo = elbo_terms(model, x, eps)["elbo"].double()
    assert abs(elbo.mean().item() - exact) < 4 * elbo.std().item() / math.sqrt(len(elbo)) + 1e-4


def test_worse_posterior_bounds_are_ordered_and_converge():
    model = LinearGaussian(mean_scale=0.5, var_scale=3.0)
    x = _data(model, 1, seed=5).expand(2000, -1).contiguous()
    exact = model.log_px(x[:1]).item()
    g = torch.Generator().manual_seed(3)
    means = [iwae_bound(model, x, k, chunk=50, generator=g).double().mean().item() for k in (1, 5, 50, 500)]
    elbo = means[0]
    assert elbo < means[1] < means[2] < means[3] < exact
    assert exact - means[3] < 0.1 * (exact - elbo)  # the bound closes most of the gap at K=500
    assert exact - elbo > 0.3  # the test q really is worse


def test_chunking_does_not_change_the_bound():
    model = LinearGaussian(mean_scale=0.5, var_scale=3.0)
    x = _data(model, 1, seed=5).expand(3000, -1).contiguous()
    whole = iwae_bound(model, x, 60, chunk=60, generator=torch.Generator().manual_seed(9)).double()
    parts = iwae_bound(model, x, 60, chunk=7, generator=torch.Generator().manual_seed(10)).double()
    stderr = math.sqrt((whole.var() + parts.var()).item() / len(x))
    assert abs(whole.mean().item() - parts.mean().item()) < 4 * stderr
    again = iwae_bound(model, x[:4], 60, chunk=7, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(again, iwae_bound(model, x[:4], 60, chunk=7, generator=torch.Generator().manual_seed(9)))


def test_an_images_bound_does_not_depend_on_the_images_beside_it():
    """ImageNoise: each image's noise is its own, so batching, order and sharding change no image's bound."""
    model = LinearGaussian(mean_scale=0.7, var_scale=2.0)
    x = _data(model, 5)
    keys = [f"img-{i}" for i in range(5)]
    together = iwae_bound(model, x, 12, chunk=5, generator=ImageNoise(3, keys))
    order = [3, 0, 4, 1, 2]
    shuffled = iwae_bound(model, x[order], 12, chunk=5, generator=ImageNoise(3, [keys[i] for i in order]))
    alone = torch.cat([iwae_bound(model, x[i:i + 1], 12, chunk=5, generator=ImageNoise(3, keys[i:i + 1]))
                       for i in range(5)])
    torch.testing.assert_close(shuffled, together[order])
    torch.testing.assert_close(alone, together)
    # the draws are standard normal, and differ between keys and between seeds
    draws = ImageNoise(0, [f"k{i}" for i in range(2000)]).normal(4, 3)
    assert draws.shape == (4, 2000, 3)
    assert abs(draws.mean().item()) < 0.03 and abs(draws.std().item() - 1) < 0.03
    assert not torch.equal(draws[:, 0], draws[:, 1])
    assert not torch.equal(ImageNoise(0, ["a"]).normal(2, 3), ImageNoise(1, ["a"]).normal(2, 3))
    with pytest.raises(ValueError, match="noise for 1 images, asked for 2"):
        iwae_bound(model, x[:2], 4, generator=ImageNoise(0, ["a"]))


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=g)
    logvar = torch.randn(3, 4, generator=g) * 0.5
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = q.sample((200000,))
    mc = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).mean(0)
    torch.testing.assert_close(gaussian_kl(mu, logvar), mc, atol=0.02, rtol=0.02)


def test_iwae_k1_equals_the_single_sample_elbo():
    model = LinearGaussian(mean_scale=0.7, var_scale=2.0)
    x = _data(model, 3)
    bound = iwae_bound(model, x, 1, generator=torch.Generator().manual_seed(4))
    eps = torch.randn((1, 3, 2), generator=torch.Generator().manual_seed(4))[0]
    mu, logvar = model.encode(x / 255.0)
    z = mu + torch.exp(0.5 * logvar) * eps
    by_hand = (Normal(model.decode(z).double(), model.s).log_prob(x.double()).sum(1)
               + Normal(0.0, 1.0).log_prob(z.double()).sum(1)
               - Normal(mu.double(), torch.exp(0.5 * logvar.double())).log_prob(z.double()).sum(1))
    torch.testing.assert_close(bound.double(), by_hand, atol=1e-4, rtol=0)


def _all_levels(likelihood, params):
    levels = torch.arange(256.0).view(256, 1, 1, 1, 1)
    x = levels.expand(256, *params.shape[:1], 3, *params.shape[2:])
    return torch.stack([likelihood.log_prob_pixels(params, x[v]) for v in range(256)]).exp().sum(0)


@pytest.mark.parametrize("likelihood", [DiscretizedLogistic(), Bernoulli()], ids=lambda l: l.name)
def test_discrete_likelihoods_sum_to_one_over_256_levels(likelihood):
    g = torch.Generator().manual_seed(0)
    params = torch.randn(2, likelihood.num_params(3), 4, 4, generator=g) * 2
    if likelihood.name == "discretized_logistic":
        params[:, 3:] = params[:, 3:].clamp(-6, 1)  # log scales from sharp to broad
    torch.testing.assert_close(_all_levels(likelihood, params), torch.ones(2, 3, 4, 4), atol=1e-4, rtol=0)


def test_discretized_logistic_bin_mass_by_hand():
    params = torch.zeros(1, 6, 1, 1)
    params[:, :3] = 100 / 127.5 - 1  # mean at the centre of level 100
    params[:, 3:] = -5.0
    x = torch.full((1, 3, 1, 1), 100.0)
    h = (1 / 255) / math.exp(-5.0)  # bin half-width in units of the scale
    sigmoid = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    by_hand = 3 * math.log(sigmoid(h) - sigmoid(-h))
    assert DiscretizedLogistic().log_prob(params, x).item() == pytest.approx(by_hand, abs=1e-5)
    # the edge levels take the tails: level 0 gets everything below the first bin edge
    x0 = torch.zeros(1, 3, 1, 1)
    edge = (-1 + 1 / 255 - (100 / 127.5 - 1)) / math.exp(-5.0)
    assert DiscretizedLogistic().log_prob(params, x0).item() == pytest.approx(3 * math.log(sigmoid(edge)), rel=1e-4)


def _mixture_params(mixtures: int, seed: int) -> torch.Tensor:
    """Logistic-mixture parameters for two RGB pixels: the first harsh (scales e^-5..e^-1, strong coupling that
    pushes locations past the edges), the second mild (locations well inside but one, scales <= e^-3)."""
    g = torch.Generator().manual_seed(seed)
    n = mixtures
    logits = torch.randn(1, n, 1, 2, generator=g)
    means = torch.rand(1, 3 * n, 1, 2, generator=g) * 1.2 - 0.6
    log_scales = torch.rand(1, 3 * n, 1, 2, generator=g) * -4.0 - 1.0
    coeffs = torch.randn(1, 3 * n, 1, 2, generator=g)
    means[..., 1] *= 0.5
    means[0, 0, 0, 1] = 1.4  # ... except one component's R, beyond the top level: its value is 255 there, and
    # that component's G and B couple to 255, while the other components' R stay inside
    log_scales[..., 1] = log_scales[..., 1].clamp(max=-3.0)
    coeffs[..., 1] *= 0.3
    return torch.cat([logits, means, log_scales, coeffs], dim=1)


def _mixture_joint(likelihood: LogisticMixture, params: torch.Tensor) -> torch.Tensor:
    """P(r, g, b) of every one of the 256^3 colours of each pixel: [256, 256, 256, pixels]."""
    gb = torch.cartesian_prod(torch.arange(256.0), torch.arange(256.0))  # [65536, 2]
    pixels = params.shape[-1]
    out = []
    for r in range(256):
        x = torch.cat([torch.full((gb.shape[0], 1), float(r)), gb], dim=1).view(-1, 3, 1, 1).expand(-1, 3, 1, pixels)
        out.append(likelihood.log_prob_pixels(params.expand(x.shape[0], -1, -1, -1), x).exp().view(256, 256, pixels))
    return torch.stack(out)


def test_logistic_mixture_is_a_distribution_over_all_colours_and_mean_is_its_expectation():
    likelihood = LogisticMixture(mixtures=3)
    params = _mixture_params(3, seed=1).double()
    joint = _mixture_joint(likelihood, params)
    # the colour channels are modelled jointly: the joint over all 256^3 colours of a pixel sums to one
    torch.testing.assert_close(joint.sum((0, 1, 2)).float(), torch.ones(2), atol=1e-4, rtol=0)
    # the exported mean is the distribution's expected colour (in [0, 1] units), from the exact joint, where
    # no mass piles up at the end levels (the mild pixel)
    levels = torch.arange(256.0, dtype=torch.float64) / 255.0
    expected = torch.stack([(joint.sum((1, 2)) * levels[:, None]).sum(0), (joint.sum((0, 2)) * levels[:, None]).sum(0),
                            (joint.sum((0, 1)) * levels[:, None]).sum(0)])
    torch.testing.assert_close(likelihood.mean(params)[0, :, 0, 1], expected[:, 1], atol=1e-3, rtol=0)


def test_logistic_mixture_couples_channels():
    """With coupling G = R exactly is cheap to encode; without it, G costs as much as R alone."""
    params = torch.zeros(1, 10, 1, 1)  # one component: logit, 3 means, 3 log scales, 3 coefficients
    params[:, 4:7] = -5.0
    x = torch.tensor([200.0, 200.0, 128.0]).view(1, 3, 1, 1)
    independent = LogisticMixture(1).log_prob(params, x)
    coupled = params.clone()
    coupled[:, 7] = 10.0  # G's location: 0 plus tanh(10) ~ 1 times R's value, so G follows R
    assert LogisticMixture(1).log_prob(coupled, x) > independent + 10.0
    # one component's mean (a shortcut) equals the general path's for two identical components
    one = torch.randn(2, 10, 3, 3)
    two = torch.cat([one[:, :1].repeat(1, 2, 1, 1), *[one[:, i:i + 3].repeat(1, 2, 1, 1) for i in (1, 4, 7)]], 1)
    torch.testing.assert_close(LogisticMixture(1).mean(one), LogisticMixture(2).mean(two))
    # a single uncoupled component is the factorized discretized logistic
    params[:, 1:4] = torch.tensor([0.5, 0.2, -0.3]).view(1, 3, 1, 1)
    factorized = torch.cat([params[:, 1:4], params[:, 4:7]], dim=1)
    torch.testing.assert_close(LogisticMixture(1).log_prob(params, x), DiscretizedLogistic().log_prob(factorized, x))


def test_gaussian_density_integrates_to_about_one_over_the_levels():
    params = torch.zeros(1, 6, 2, 2)
    params[:, 3:] = 2.0  # sigma = e^2 = 7.4 levels, mean 128: essentially all mass inside [0, 256]
    torch.testing.assert_close(_all_levels(Gaussian(), params), torch.ones(1, 3, 2, 2), atol=1e-3, rtol=0)
    assert Gaussian.is_density and not DiscretizedLogistic.is_density


def test_bits_per_dim_by_hand():
    dims = 3 * 64 * 64
    # an image whose log-likelihood is exactly 3 bits per sub-pixel
    assert bits_per_dim(-3 * dims * math.log(2), dims) == pytest.approx(3.0)
    # uniform over 256 levels is 8 bits/dim
    assert bits_per_dim(dims * math.log(1 / 256), dims) == pytest.approx(8.0)


def test_free_bits_floor_the_kl_per_dimension():
    kl_dims = torch.tensor([[0.01, 2.0], [0.03, 4.0]])
    terms = {"recon": torch.tensor([-10.0, -12.0]), "kl_dims": kl_dims}
    # mean KL per dimension: 0.02 and 3.0; with a floor of 0.5 nats: 0.5 + 3.0
    assert training_loss(terms, 1.0, 0.5).item() == pytest.approx(11.0 + 3.5)
    assert training_loss(terms, 1.0, 0.0).item() == pytest.approx(11.0 + 3.02)
    assert training_loss(terms, 0.5, 0.0).item() == pytest.approx(11.0 + 1.51)
