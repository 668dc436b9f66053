"""Observation models p(x|z) for 8-bit images: each a true log-probability of the pixel values.

`x` is always the raw data: integer levels 0..255 (any dtype), shape [N, C, H, W]. The decoder emits
`params` of shape [N, C * params_per_channel, H, W]. `log_prob` returns one value per image (summed over
pixels, in nats); `mean` gives the image in [0, 1] that the ONNX decoder exports as `x_mean`.

- discretized_logistic: a logistic per sub-pixel integrated over its 1/255 bin (PixelCNN++), edges to
  +-infinity: a distribution over the 256 levels.
- bernoulli: the 8-bit form of the Bernoulli cross-entropy: Binomial(255, p) over the levels (it includes
  the log C(255, v) term that makes it a probability).
- gaussian: a Gaussian density on the 0..256 scale evaluated at bin centres v + 0.5; per unit-width bin this
  approximates the bin's probability, so its bits/dim are comparable, but it is a density (`is_density`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_SCALE_MIN = -7.0


def _split(params: torch.Tensor, n: int) -> list[torch.Tensor]:
    c = params.shape[1] // n
    return [params[:, i * c:(i + 1) * c] for i in range(n)]


class PixelLikelihood:
    """Shared by the observation models: an image's log-probability is the sum over its sub-pixels."""

    def log_prob_pixels(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob_pixels(params, x).flatten(1).sum(1)


class DiscretizedLogistic(PixelLikelihood):
    name = "discretized_logistic"
    params_per_channel = 2
    is_density = False

    def log_prob_pixels(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, log_scale = _split(params.float(), 2)
        log_scale = log_scale.clamp(min=LOG_SCALE_MIN)
        x = x.float()
        xs = x / 127.5 - 1.0  # bin centres in [-1, 1], bin half-width 1/255
        centered = xs - mean
        inv_scale = torch.exp(-log_scale)
        plus_in = inv_scale * (centered + 1.0 / 255.0)
        min_in = inv_scale * (centered - 1.0 / 255.0)
        log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): the 0 level takes (-inf, edge]
        log_one_minus_cdf_min = -F.softplus(min_in)  # the 255 level takes [edge, +inf)
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        mid_in = inv_scale * centered
        # When the bin's mass underflows, use the density at the centre times the bin width (2/255).
        log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in) + math.log(2.0 / 255.0)
        log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
        return torch.where(x < 0.5, log_cdf_plus, torch.where(x > 254.5, log_one_minus_cdf_min, log_mid))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        mean, _ = _split(params, 2)
        return (mean.clamp(-1.0, 1.0) + 1.0) / 2.0


class Bernoulli(PixelLikelihood):
    name = "bernoulli"
    params_per_channel = 1
    is_density = False

    def log_prob_pixels(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits = params.float()
        v = x.float()
        log_binom = torch.lgamma(torch.tensor(256.0)) - torch.lgamma(v + 1) - torch.lgamma(256.0 - v)
        # v log p + (255 - v) log (1 - p), stably from logits
        return log_binom + v * F.logsigmoid(logits) + (255.0 - v) * F.logsigmoid(-logits)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)


class Gaussian(PixelLikelihood):
    name = "gaussian"
    params_per_channel = 2
    is_density = True

    def log_prob_pixels(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean_logit, log_scale = _split(params.float(), 2)
        log_scale = log_scale.clamp(min=-3.0)  # in units of one level: sigma >= 0.05 levels
        mu = 256.0 * torch.sigmoid(mean_logit)
        y = x.float() + 0.5
        return -0.5 * ((y - mu) * torch.exp(-log_scale)) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        mean_logit, _ = _split(params, 2)
        return ((256.0 * torch.sigmoid(mean_logit) - 0.5) / 255.0).clamp(0.0, 1.0)


def get_likelihood(name: str):
    """The observation model named in `model.likelihood`."""
    table = {cls.name: cls for cls in (DiscretizedLogistic, Bernoulli, Gaussian)}
    if name not in table:
        raise ValueError(f"unknown likelihood {name!r}; known: {', '.join(table)}")
    return table[name]()
