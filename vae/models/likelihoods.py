"""Observation models p(x|z) for 8-bit images: each a true log-probability of the pixel values.

`x` is always the raw data: integer levels 0..255 (any dtype), shape [N, C, H, W]. The decoder emits
`params` of shape [N, num_params(C), H, W]. `log_prob` returns one value per image (summed over
pixels, in nats); `mean` gives the image in [0, 1] that the ONNX decoder exports as `x_mean`.

- discretized_logistic: a logistic per sub-pixel integrated over its 1/255 bin (PixelCNN++), edges to
  +-infinity: a distribution over the 256 levels.
- bernoulli: the 8-bit form of the Bernoulli cross-entropy: Binomial(255, p) over the levels (it includes
  the log C(255, v) term that makes it a probability).
- logistic_mixture: PixelCNN++'s mixture of `mixtures` discretized logistics per pixel with channel
  dependencies: within a component, channel c's location moves linearly with the values of channels < c
  (for RGB: G with R, B with R and G), so one pixel's colours are modelled jointly, not independently.
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

    def num_params(self, channels: int) -> int:
        """How many decoder output channels an image with `channels` colour channels needs."""
        return channels * self.params_per_channel


def bin_centres(x: torch.Tensor) -> torch.Tensor:
    """Levels 0..255 -> their bins' centres in [-1, 1] (bin half-width 1/255)."""
    return x / 127.5 - 1.0


def discretized_logistic_log_prob(mean: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log P(x) of integer levels x (0..255) under logistics with `mean` in [-1, 1] units, integrated over
    each level's 2/255-wide bin, the end levels taking the tails; all three broadcast together."""
    log_scale = log_scale.clamp(min=LOG_SCALE_MIN)
    centered = bin_centres(x) - mean
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


class DiscretizedLogistic(PixelLikelihood):
    name = "discretized_logistic"
    params_per_channel = 2
    is_density = False

    def log_prob_pixels(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, log_scale = _split(params.float(), 2)
        return discretized_logistic_log_prob(mean, log_scale, x.float())

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        mean, _ = _split(params, 2)
        return (mean.clamp(-1.0, 1.0) + 1.0) / 2.0


class LogisticMixture(PixelLikelihood):
    """`params` per pixel: n mixture logits, then n * C locations, n * C log-scales and n * C(C-1)/2
    coupling coefficients (tanh-bounded), each block component-major."""

    name = "logistic_mixture"
    is_density = False

    def __init__(self, mixtures: int = 1):
        self.mixtures = mixtures

    def num_params(self, channels: int) -> int:
        return self.mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _unpack(self, params: torch.Tensor, channels: int):
        n, (b, _, h, w) = self.mixtures, params.shape
        pairs = channels * (channels - 1) // 2
        logits, means, log_scales, coeffs = params.split([n, n * channels, n * channels, n * pairs], dim=1)
        shape = (b, n, -1, h, w)
        return logits, means.reshape(shape), log_scales.reshape(shape), torch.tanh(coeffs.reshape(shape))

    @staticmethod
    def _locations(means: torch.Tensor, coeffs: torch.Tensor, values: list[torch.Tensor] | None) -> torch.Tensor:
        """Each channel's location: its own plus coefficient * the values of the channels before it; with
        no `values`, the channels' expected values (a sharp logistic's mean is its location, within the
        range the end levels clamp it to). [B, n, C, H, W]."""
        out: list[torch.Tensor] = []
        pair = 0
        for c in range(means.shape[2]):
            loc = means[:, :, c]
            for j in range(c):
                loc = loc + coeffs[:, :, pair] * (values[j] if values is not None else out[j].clamp(-1.0, 1.0))
                pair += 1
            out.append(loc)
        return torch.stack(out, dim=2)

    def log_prob_pixels(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        logits, means, log_scales, coeffs = self._unpack(params.float(), channels)
        x = x.float().unsqueeze(1)  # [B, 1, C, H, W] against the n components
        locs = self._locations(means, coeffs, [bin_centres(x[:, :, c]) for c in range(channels)])
        per_component = discretized_logistic_log_prob(locs, log_scales, x).sum(2)  # [B, n, H, W]
        return torch.logsumexp(F.log_softmax(logits, dim=1) + per_component, dim=1)

    def channels_of(self, params: torch.Tensor) -> int:
        """The colour channels that `params` holds parameters for."""
        for channels in range(1, 65):
            if self.num_params(channels) == params.shape[1]:
                return channels
        raise ValueError(f"{params.shape[1]} parameters per pixel fit no channel count with {self.mixtures} "
                         f"mixture components")

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The image in [0, 1] that the decoder means: each component's expected colour (its locations,
        clamped to the levels' range; exact for sharp components), weighted by the mixture."""
        logits, means, _, coeffs = self._unpack(params, self.channels_of(params))
        colours = self._locations(means, coeffs, None).clamp(-1.0, 1.0)
        if self.mixtures == 1:  # the weight is exactly 1: fewer ops in the exported decoder
            return (colours[:, 0] + 1.0) / 2.0
        weights = torch.softmax(logits, dim=1).unsqueeze(2)
        return ((weights * colours).sum(1) + 1.0) / 2.0


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


def get_likelihood(name: str, mixtures: int = 1):
    """The observation model named in `model.likelihood` (`mixtures`: components of logistic_mixture)."""
    table = {cls.name: cls for cls in (DiscretizedLogistic, LogisticMixture, Bernoulli, Gaussian)}
    if name not in table:
        raise ValueError(f"unknown likelihood {name!r}; known: {', '.join(table)}")
    return LogisticMixture(mixtures) if name == LogisticMixture.name else table[name]()
