"""The math of sample quality: distances between two sets of images or of their features (torch alone).

Every figure is a `{"value", "stderr"}` pair:
- `frechet_distance`: the Fréchet distance between the Gaussians fitted to two feature sets (FID on Inception
  pool3 features); its standard error from a bootstrap over the generated set.
- `kid`: the kernel inception distance (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial
  kernel k(x, y) = (x.y / d + 1)^3, averaged over disjoint blocks of images; the standard error is that of the
  block mean, so it is honest (no image is in two blocks).
- `prdc`: precision, recall, density and coverage (Kynkäänniemi et al. 2019; Naeem et al. 2020) from the k-th
  nearest-neighbour radii of each set; standard errors of the means over images (radii held fixed).
- `multiscale_swd`: ProGAN's multi-scale sliced Wasserstein distance (Karras et al. 2018) between 7x7
  patches of each Laplacian-pyramid level from 16x16 up, each set's patches normalised per channel, x 1e3;
  the mean over disjoint blocks of images and its standard error.
- `nearest_distances`: each image's RMS pixel distance to its nearest image of a reference set (memorisation).

Sets are float tensors [N, D] (features) or [N, 3, H, W] in [0, 1] (images); random choices (bootstrap, patch
positions, projections) come from a `torch.Generator` the caller seeds, so a figure is reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vae_runtime.errors import BadInput

KID_BLOCKS = 10  # disjoint blocks of images for KID's and SWD's standard errors (fewer when there are few images)
PRDC_K = 5  # nearest neighbours that set each image's radius (Naeem et al.'s choice)
SWD_PATCH, SWD_PATCHES, SWD_MIN_SIDE = 7, 128, 16  # Karras et al.'s patch size, patches an image, smallest level
SWD_DIRS = 128  # random directions a block and level (Karras et al.: 512 x 4 repeats over one larger set)
SWD_DESCRIPTORS, SWD_BLOCKS = 4_096, 4  # patches a level and set, over all blocks: bounds the cost
FID_BOOTSTRAP = 8


def figure(value: float, stderr: float | None) -> dict:
    return {"value": float(value), "stderr": None if stderr is None or not math.isfinite(stderr) else float(stderr)}


def require_images(name: str, *counts: int, at_least: int = 2) -> None:
    """One line (BadInput) when a set holds fewer than `at_least` images: no figure compares fewer."""
    if min(counts) < at_least:
        raise BadInput(f"{name}: needs at least {at_least} images in each set, got {', '.join(map(str, counts))}")


def mean_figure(values: torch.Tensor) -> dict:
    """The mean of per-item values and its standard error."""
    values = values.double()
    if values.numel() < 2:
        return figure(float(values.mean()), None)
    return figure(float(values.mean()), float(values.std(unbiased=True) / math.sqrt(values.numel())))


def _blocks(n: int, blocks: int) -> list[slice]:
    """`blocks` disjoint, equal slices of n items (at least 2 items each; fewer blocks when n is small)."""
    blocks = max(1, min(blocks, n // 2))
    size = n // blocks
    return [slice(b * size, (b + 1) * size) for b in range(blocks)]


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance


def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of a feature set, in float64."""
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / max(1, x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_from_moments(mu1, sigma1, mu2, sigma2, sqrt_sigma1: torch.Tensor | None = None) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the square root is taken as the sum of
    the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is symmetric and positive semi-definite and
    has the eigenvalues of S1 S2: no non-symmetric square root, no complex parts to drop."""
    root = _psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    middle = root @ sigma2 @ root
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt
    return max(0.0, float(value))


def frechet_distance(real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator,
                     bootstrap: int = FID_BOOTSTRAP) -> dict:
    """The Fréchet distance between the Gaussians of `real` and `fake` features; the standard error is the spread
    of the distance over bootstrap resamples of the fake set."""
    require_images("Fréchet distance", len(real), len(fake))
    mu1, sigma1 = gaussian(real)
    root = _psd_sqrt(sigma1)
    value = frechet_from_moments(mu1, sigma1, *gaussian(fake), sqrt_sigma1=root)
    again = [frechet_from_moments(mu1, sigma1, *gaussian(fake[torch.randint(len(fake), (len(fake),),
                                                                              generator=generator)]), sqrt_sigma1=root)
             for _ in range(bootstrap)]
    return figure(value, float(torch.tensor(again).std(unbiased=True)) if bootstrap > 1 else None)


# ----------------------------------------------------------------------------------------------------------
# KID


def _polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimate of MMD^2 with the cubic polynomial kernel: its expectation is 0 when x and y come
    from one distribution. Diagonals are left out of the within-set sums, and for sets of equal size out of the
    cross sum too (Gretton et al.'s U-statistic): then only pairs (x_i, y_j), i != j, meet, so the estimate stays
    unbiased when y_i is made from x_i (reconstructions of the same images), where the diagonal would pull it
    below 0."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    cross = (kxy.sum() - kxy.diagonal().sum()) / (n * (n - 1)) if m == n else kxy.mean()
    return float(within_x + within_y - 2 * cross)


def kid(real: torch.Tensor, fake: torch.Tensor, blocks: int = KID_BLOCKS) -> dict:
    """KID: the mean of the unbiased MMD^2 over disjoint blocks of both sets (each image in one block), and the
    standard error of that mean."""
    require_images("KID", len(real), len(fake))
    n = min(len(real), len(fake))
    real, fake = real[:n].double(), fake[:n].double()
    values = torch.tensor([mmd2_unbiased(real[s], fake[s]) for s in _blocks(n, blocks)])
    return mean_figure(values)


# ----------------------------------------------------------------------------------------------------------
# Precision, recall, density, coverage


def prdc_neighbours(n_real: int, n_fake: int, k: int = PRDC_K) -> int:
    """The neighbours that set the radii: k, or fewer when a set has no k other images."""
    return max(1, min(k, n_real - 1, n_fake - 1))


def _kth_radius(features: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 0th is the image itself


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = PRDC_K) -> dict:
    """Precision (share of fakes inside some real image's k-NN ball), recall (share of reals inside some fake's
    ball), density (fakes' mean count of real balls containing them, / k) and coverage (share of real balls
    holding a fake). Sets of k images or fewer use k = (their size - 1) neighbours (`prdc_neighbours`)."""
    require_images("precision/recall", len(real), len(fake))
    k = prdc_neighbours(len(real), len(fake), k)
    real, fake = real.double(), fake.double()
    real_radius, fake_radius = _kth_radius(real, k), _kth_radius(fake, k)
    between = torch.cdist(real, fake)  # [real, fake]
    inside_real_ball = between <= real_radius[:, None]
    precision = inside_real_ball.any(0).double()
    recall = (between <= fake_radius[None, :]).any(1).double()
    density = inside_real_ball.sum(0).double() / k
    coverage = (between.min(1).values <= real_radius).double()
    return {name: mean_figure(values) for name, values in
            (("precision", precision), ("recall", recall), ("density", density), ("coverage", coverage))}


# ----------------------------------------------------------------------------------------------------------
# Multi-scale sliced Wasserstein distance on Laplacian-pyramid patches


def _binomial_kernel(device) -> torch.Tensor:
    row = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    kernel = torch.outer(row, row) / 256.0
    return kernel.expand(3, 1, 5, 5).contiguous()


def _blur(x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), _binomial_kernel(x.device), groups=3)


def laplacian_pyramid(images: torch.Tensor, min_side: int = SWD_MIN_SIDE) -> list[torch.Tensor]:
    """Band-pass levels, finest first, down to the `min_side` level, which keeps its low frequencies (ProGAN's
    pyramid: Gaussian 5x5 binomial filter, factor 2)."""
    levels, current = [], images
    while current.shape[-1] > min_side and current.shape[-1] % 2 == 0:
        down = _blur(current)[..., ::2, ::2]
        up = F.interpolate(down, scale_factor=2, mode="nearest")
        levels.append(current - _blur(up))
        current = down
    levels.append(current)
    return levels


def _positions(n: int, side: int, per_image: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-left corners of `per_image` 7x7 patches in each of n images of `side` pixels."""
    p = min(SWD_PATCH, side)
    return (torch.randint(side - p + 1, (n, per_image), generator=generator),
            torch.randint(side - p + 1, (n, per_image), generator=generator))


def _patches(level: torch.Tensor, corners: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The patches at `corners` of each image, [N * per_image, 3 * 49], normalised per channel by the set's own
    mean and standard deviation (as ProGAN does, so each level's distance is on one scale)."""
    n, c, h, w = level.shape
    p = min(SWD_PATCH, h, w)
    ys, xs = corners
    per_image = ys.shape[1]
    offsets = torch.arange(p)
    rows = (ys[..., None] + offsets).to(level.device)  # [n, per, p]
    cols = (xs[..., None] + offsets).to(level.device)
    index = torch.arange(n, device=level.device)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[index, rows[..., :, None], cols[..., None, :]]  # [n, per, p, p, c]
    patches = patches.reshape(n * per_image, p * p, c)
    patches = (patches - patches.mean((0, 1))) / patches.std((0, 1)).clamp_min(1e-8)
    return patches.reshape(n * per_image, -1)


def _projections(points: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Each direction's sorted projections of the points, [directions, N] (sorted along rows: fast)."""
    return (directions @ points.float().T).sort(1).values


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator,
                       directions: int = SWD_DIRS) -> float:
    """The sliced Wasserstein-1 distance between two equal-sized point sets [N, D]: the mean over random unit
    directions of the mean absolute difference of the sorted projections."""
    dirs = _unit_directions(directions, a.shape[1], generator)
    return float((_projections(a, dirs) - _projections(b, dirs)).abs().mean())


def _unit_directions(count: int, dims: int, generator: torch.Generator) -> torch.Tensor:
    dirs = torch.randn(count, dims, generator=generator)
    return dirs / dirs.norm(dim=1, keepdim=True)


class SwdReference:
    """The real images' side of the multi-scale SWD, computed once and compared with any number of image sets:
    disjoint blocks of images, each level's patch positions and random directions, and the real patches' sorted
    projections. Every set is cut at the same positions and projected on the same directions, so identical sets
    are at distance 0 and differences between sets (two temperatures, two models on one test set) are not
    blurred by the draws."""

    def __init__(self, real: torch.Tensor, n: int, generator: torch.Generator, blocks: int = SWD_BLOCKS):
        require_images("sliced Wasserstein distance", len(real), n)
        self.parts = _blocks(min(n, len(real)), blocks)
        size = self.parts[0].stop - self.parts[0].start
        per_image = max(1, min(SWD_PATCHES, SWD_DESCRIPTORS // (len(self.parts) * size)))
        self.corners, self.directions, self.sorted = [], [], []
        for part in self.parts:
            levels = laplacian_pyramid(real[part].float())
            corners = [_positions(size, lv.shape[-1], per_image, generator) for lv in levels]
            dirs = [_unit_directions(SWD_DIRS, 3 * min(SWD_PATCH, lv.shape[-1]) ** 2, generator) for lv in levels]
            self.corners.append(corners)
            self.directions.append(dirs)
            self.sorted.append([_projections(_patches(lv, c), d) for lv, c, d in zip(levels, corners, dirs)])

    def distance(self, fake: torch.Tensor) -> dict:
        """The multi-scale SWD (x 1e3, the mean over pyramid levels) of `fake` [N, 3, H, W] in [0, 1] from the
        real images, and each level's figure (finest first): the mean over the blocks and its standard error."""
        require_images("sliced Wasserstein distance", len(fake), self.parts[-1].stop)
        per_block = []
        for part, corners, dirs, sorted_real in zip(self.parts, self.corners, self.directions, self.sorted):
            levels = laplacian_pyramid(fake[part].float())
            per_block.append([1e3 * float((_projections(_patches(lv, c), d) - r).abs().mean())
                              for lv, c, d, r in zip(levels, corners, dirs, sorted_real)])
        per_block = torch.tensor(per_block, dtype=torch.float64)  # [blocks, levels]
        return {**mean_figure(per_block.mean(1)), "levels": [round(float(v), 4) for v in per_block.mean(0)]}


def multiscale_swd(real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator) -> dict:
    """The multi-scale SWD of two image sets (`SwdReference` for one comparison). Each block compares up to
    SWD_DESCRIPTORS / blocks patches a level (at most 128 an image, ProGAN's count), so the cost does not grow
    with N; figures are compared only at equal image counts."""
    return SwdReference(real, len(fake), generator).distance(fake)


# ----------------------------------------------------------------------------------------------------------
# Memorisation


def nearest_distances(images: torch.Tensor, reference: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Each image's RMS pixel distance (in [0, 1] units) to its nearest image in `reference`."""
    flat_ref = reference.flatten(1).double()
    out = []
    for start in range(0, len(images), chunk):
        out.append(torch.cdist(images[start:start + chunk].flatten(1).double(), flat_ref).min(1).values)
    return torch.cat(out) / math.sqrt(flat_ref.shape[1])
