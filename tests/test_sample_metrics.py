"""The sample-quality math against closed forms and references: the Fréchet distance (scipy's matrix square root
on non-commuting covariances, the diagonal closed form, 0 on one set), KID (0 in expectation for one
distribution, clearly positive for a shifted one), precision/recall/density/coverage, the multi-scale sliced
Wasserstein distance (0 on identical sets, growing with blur and with collapse to one mean image) and the
memorisation distances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vae_runtime.errors import BadInput
from vae.evaluation import sample_metrics as sm


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_covariance(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_matches_scipys_matrix_square_root_on_non_commuting_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    d = 12
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    assert not np.allclose(s1 @ s2, s2 @ s1)  # the case where sqrt(S1) sqrt(S2) is not sqrt(S1 S2)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    reference = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    ours = sm.frechet_from_moments(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-9)
    wrong = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                  - 2 * np.trace(scipy_linalg.sqrtm(s1).real @ scipy_linalg.sqrtm(s2).real))
    assert abs(wrong - reference) > 1e-3  # the shortcut a wrong implementation would take is told apart


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = float((mu1 - mu2).pow(2).sum() + (var1.sqrt() - var2.sqrt()).pow(2).sum())  # 1 + 4 + 1 + 1 + 4
    got = sm.frechet_from_moments(mu1.double(), torch.diag(var1).double(), mu2.double(), torch.diag(var2).double())
    assert got == pytest.approx(expected, rel=1e-12) and expected == pytest.approx(11.0)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = torch.randn(400, 16, generator=_gen(1))
    same = sm.frechet_distance(x, x, _gen(2))
    assert same["value"] == pytest.approx(0.0, abs=1e-8)
    shifted = sm.frechet_distance(x, x + 0.5, _gen(2))
    assert shifted["value"] == pytest.approx(16 * 0.25, rel=1e-6)  # the mean term alone: 16 dims x 0.5^2
    assert shifted["stderr"] is not None and shifted["stderr"] > 0


def test_kid_is_zero_within_noise_for_one_distribution_and_clearly_positive_for_a_shifted_one():
    a = torch.randn(1000, 32, generator=_gen(3))
    b = torch.randn(1000, 32, generator=_gen(4))
    same = sm.kid(a, b)
    assert abs(same["value"]) < 3 * same["stderr"], same
    shifted = sm.kid(a, b + 0.3)
    assert shifted["value"] > 10 * shifted["stderr"] and shifted["value"] > 20 * abs(same["value"]), (same, shifted)


def test_kid_of_paired_sets_such_as_reconstructions_is_not_pulled_below_zero():
    # y_i made from x_i (a reconstruction): the same distribution, so KID must be 0 within its error; a cross sum
    # that kept the pairs (x_i, y_i) would put it far below 0
    a = torch.randn(1000, 32, generator=_gen(16))
    paired = sm.kid(a, a + 0.05 * torch.randn(1000, 32, generator=_gen(17)))
    assert abs(paired["value"]) < 3 * paired["stderr"], paired


def test_unbiased_mmd_of_equal_sizes_matches_the_u_statistic():
    x, y = torch.randn(6, 3, generator=_gen(18)).double(), torch.randn(6, 3, generator=_gen(19)).double()
    k = lambda a, b: (float(a @ b) / 3 + 1) ** 3  # noqa: E731
    h = sum(k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i])
            for i in range(6) for j in range(6) if i != j) / (6 * 5)
    assert sm.mmd2_unbiased(x, y) == pytest.approx(h, rel=1e-12)


def test_unbiased_mmd_matches_a_direct_double_sum():
    x, y = torch.randn(7, 3, generator=_gen(5)).double(), torch.randn(9, 3, generator=_gen(6)).double()
    k = lambda a, b: (float(a @ b) / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    assert sm.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_precision_recall_density_coverage_on_identical_disjoint_and_collapsed_sets():
    real = torch.randn(300, 8, generator=_gen(7))
    same = sm.prdc(real, real.clone())
    assert all(same[k]["value"] == 1.0 for k in ("precision", "recall", "coverage"))
    assert same["density"]["value"] == pytest.approx(1 + 1 / sm.PRDC_K)  # each fake lies in its twin's ball + k others'
    far = sm.prdc(real, real + 100.0)
    assert all(far[k]["value"] == 0.0 for k in ("precision", "recall", "density", "coverage"))
    collapsed = sm.prdc(real, real.mean(0, keepdim=True).repeat(300, 1))  # mode collapse: realistic, not diverse
    assert collapsed["precision"]["value"] == 1.0 and collapsed["recall"]["value"] < 0.05
    assert collapsed["coverage"]["value"] < 0.1


def test_precision_recall_of_sets_smaller_than_k_use_fewer_neighbours():
    real = torch.randn(4, 8, generator=_gen(20))
    assert sm.prdc_neighbours(4, 4) == 3
    same = sm.prdc(real, real.clone())
    assert same["precision"]["value"] == same["recall"]["value"] == same["coverage"]["value"] == 1.0
    assert sm.prdc(real, real + 100.0)["precision"]["value"] == 0.0


def _textures(n: int, seed: int, side: int = 32) -> torch.Tensor:
    """Images with structure at every scale: smooth random fields plus fine noise, in [0, 1]."""
    g = _gen(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=side, mode="bilinear", align_corners=False)
    middle = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=side, mode="bilinear", align_corners=False)
    fine = torch.rand(n, 3, side, side, generator=g)
    return (0.5 * coarse + 0.3 * middle + 0.2 * fine).clamp(0, 1)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum())
    k2 = torch.outer(kernel, kernel).expand(3, 1, -1, -1)
    return F.conv2d(F.pad(images, (radius,) * 4, mode="reflect"), k2, groups=3)


def test_sliced_wasserstein_is_zero_on_identical_sets_and_grows_with_blur_and_collapse():
    real = _textures(256, 8)
    reference = sm.SwdReference(real, 256, _gen(9))
    assert reference.distance(real.clone())["value"] == 0.0
    other = reference.distance(_textures(256, 10))  # another draw of the same distribution: the noise floor
    blurred = [reference.distance(_blur(real, s))["value"] for s in (0.5, 1.0, 2.0)]
    collapsed = reference.distance(real.mean(0, keepdim=True).repeat(256, 1, 1, 1))["value"]
    assert blurred[0] < blurred[1] < blurred[2] and blurred[2] > other["value"] + 3 * other["stderr"], \
        (other, blurred)
    assert collapsed > 2 * other["value"], (other, collapsed)
    levels = reference.distance(_blur(real, 2.0))["levels"]
    assert len(levels) == 2 and levels[0] > levels[1]  # 32x32 and 16x16: blur takes the finest band most


def test_laplacian_pyramid_levels_add_back_to_the_image_band_by_band():
    images = _textures(2, 11, side=64)
    levels = sm.laplacian_pyramid(images)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    # each band is the image minus its blurred, down- and up-sampled version: the bands carry the detail
    assert levels[0].abs().mean() < images.abs().mean() and levels[-1].shape[-1] == 16


def test_memorisation_distances_are_zero_for_copies_of_the_reference():
    train = _textures(20, 12)
    copies = train[torch.randperm(20, generator=_gen(13))]
    assert sm.nearest_distances(copies, train).abs().max() < 1e-6
    fresh = sm.nearest_distances(_textures(20, 14), train)
    assert fresh.min() > 0.01
    assert math.isclose(float(sm.nearest_distances(train[:1] + 0.1, train[:1])), 0.1, rel_tol=1e-5)  # RMS units


@pytest.mark.parametrize("call", [
    lambda: sm.kid(torch.randn(1, 4), torch.randn(5, 4)),
    lambda: sm.frechet_distance(torch.randn(5, 4), torch.randn(1, 4), _gen()),
    lambda: sm.prdc(torch.randn(1, 4), torch.randn(3, 4)),
    lambda: sm.SwdReference(torch.rand(1, 3, 16, 16), 1, _gen()),
])
def test_fewer_images_than_a_figure_needs_is_one_line(call):
    with pytest.raises(BadInput) as err:
        call()
    assert "\n" not in str(err.value) and "needs at least" in str(err.value)


def test_the_random_feature_network_is_pinned_and_deterministic():
    from vae.evaluation.features import RandomFeatures, embed

    a, b = RandomFeatures(), RandomFeatures()
    assert a.identity() == b.identity() and len(a.identity()["sha256"]) == 64
    images = _textures(6, 15)
    fa = embed(a, images)
    assert fa.shape == (6, a.dims) and torch.equal(fa, embed(b, images))
    # the embedding separates a blurred set from the set itself more than from another draw of it
    far = (fa - embed(a, _blur(images, 2.0))).norm(dim=1).mean()
    assert far > 0.1 * fa.norm(dim=1).mean()
