"""The conv VAE's shapes and the decoder mean's range, for each likelihood."""

import pytest
import torch

from vae.core.config import load_config
from vae.models import build_model


@pytest.mark.parametrize("likelihood", ["discretized_logistic", "logistic_mixture", "bernoulli", "gaussian"])
@pytest.mark.parametrize("size, channels", [(16, [8, 16]), (32, [8, 16, 16])])
def test_shapes_and_ranges(likelihood, size, channels):
    cfg = load_config(None, [f"model.image_size={size}", f"model.channels={channels}", "model.latent_dim=5",
                             f"model.likelihood={likelihood}"]).model
    model = build_model(cfg)
    x = torch.rand(3, 3, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 5)
    params = model.decode(mu)
    assert params.shape == (3, model.likelihood.num_params(3), size, size)
    mean = model.decode_mean(torch.randn(4, 5) * 10)
    assert mean.shape == (4, 3, size, size) and mean.min() >= 0 and mean.max() <= 1
    out, mu2, _ = model(x, torch.zeros(3, 5))
    torch.testing.assert_close(out, model.decode(mu2))  # eps = 0 decodes the posterior mean
