"""Sample quality of a trained model: the `samples` object of `metrics.json` (SPEC.md's metrics contract).

Prior draws at each temperature (u ~ N(0, t^2 I), decoded to the expected image, as `vae sample --temperature`
does) and reconstructions of the split's images are compared with the split's images (held out from training);
the same figures for the split's images against as many training images are the real-versus-real floor, the
best a model can be expected to reach with this many images. Figures (`sample_metrics.py`):
- download-free, always: KID (the primary metric), precision, recall, density and coverage, in the features of
  a fixed random network (`features.py`, its identity recorded), and the multi-scale sliced Wasserstein distance
  on Laplacian-pyramid patches (no network);
- FID, on the standard FID Inception weights when the user gives them (`inception.py`), else null with why;
- memorisation: the prior samples' RMS pixel distance to their nearest training image, against the held-out
  images' distance to theirs and against the samples' own distance to the nearest held-out image (ratios well
  below 1 mean samples copy training images).
The temperature the primary figure reports (and an export ships, `vae sample`'s default) is chosen on the valid
split when the measured split is another one: the draws at each temperature are compared with as many valid
images, so the test figure is not the best of several tries on the test images themselves (`selection`).
`measure` hashes everything that makes two `samples` objects comparable (features, weights of the Inception
network, image counts, temperatures, seed): promotion compares primary figures only when it is equal.
"""

from __future__ import annotations

import hashlib
import json

import torch

from vae_runtime.errors import BadInput
from pipeline.loader import eval_loader
from vae.evaluation import sample_metrics as sm
from vae.evaluation.features import RandomFeatures, embed
from vae.core.objectives import to_unit

PRIMARY = "kid"
# One seed for every model's prior draws and random choices (not the run's train.seed): two models are measured
# on the same draws, so their figures differ by the models alone and are comparable whatever seed trained them
SAMPLE_SEED = 7_919
# 2: KID's cross sum leaves out the pairs (x_i, y_i) (reconstructions were biased below 0); 3: the primary
# figure's temperature is chosen on the valid split
FORMAT = 3
SELECTION_SPLIT = "valid"
GRID_IMAGES = 64  # prior draws shown at each temperature (the first of those measured)


def collect_images(shards: str, split: str, n: int, manifest: dict, batch_size: int,
                   exclude: set[str] | frozenset = frozenset()) -> tuple[torch.Tensor, list[str]]:
    """The split's first `n` images in the loader's order (uint8 [n, 3, H, W]) and their keys, skipping `exclude`."""
    images, keys = [], []
    for batch_keys, x, _ in eval_loader(shards, split, batch_size, 0, 1, manifest=manifest):
        for key, image in zip(batch_keys, x):
            if key not in exclude:
                images.append(image)
                keys.append(key)
        if len(images) >= n:
            break
    return (torch.stack(images[:n]) if images else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)), keys[:n]


@torch.no_grad()
def prior_samples(model, n: int, temperature: float, seed: int, batch_size: int) -> torch.Tensor:
    """`n` decoded prior draws u ~ N(0, temperature^2 I), float [n, 3, H, W] in [0, 1] on the CPU; the draws come
    from one CPU generator, so they do not depend on the device or the batch size."""
    device = next(model.parameters()).device
    u = torch.randn((n, model.latent_dim), generator=torch.Generator().manual_seed(seed)) * temperature
    return torch.cat([model.decode_mean(u[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, n, batch_size)])


@torch.no_grad()
def reconstructions(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Decoded posterior means of uint8 images, float [n, 3, H, W] on the CPU."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        mu, _ = model.encode(to_unit(images[i:i + batch_size].to(device)))
        out.append(model.decode_mean(mu).float().cpu())
    return torch.cat(out)


class FeatureSpaces:
    """The networks a figure is measured in: the random features always, the FID Inception network when given."""

    def __init__(self, device, inception=None):
        self.random = RandomFeatures().to(device)
        self.inception = inception

    def identity(self) -> dict:
        inception = getattr(self.inception, "identity", None)
        return {"random": self.random.identity(), "inception": inception}

    def embed(self, images: torch.Tensor) -> dict:
        out = {"random": embed(self.random, images)}
        if self.inception is not None:  # full float32 on GPUs too (TF32 would move FID off published numbers)
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
                torch.backends.cuda.matmul.allow_tf32 = False
                try:
                    out["inception"] = embed(self.inception, images, batch_size=32)
                finally:
                    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        return out


def compare(real: sm.SwdReference, real_features: dict, fake: torch.Tensor, fake_features: dict,
            generator: torch.Generator) -> dict:
    """Every figure of `fake` images (float [n, 3, H, W] and their features) against the real ones (their SWD
    reference and features)."""
    out = {"kid": sm.kid(real_features["random"], fake_features["random"]),
           **sm.prdc(real_features["random"], fake_features["random"]),
           "swd": real.distance(fake),
           "fid": None}
    if "inception" in real_features:
        out["fid"] = sm.frechet_distance(real_features["inception"], fake_features["inception"], generator)
    return out


def select_temperature(drawn: dict[float, torch.Tensor], prior: dict, split: str, selection_features
                       ) -> dict:
    """The temperature whose draws (their random features, `drawn`) are closest to the valid split's images by the
    primary metric; `selection_features()` embeds those images, called only when there is a choice to make and
    the measured split is not the valid split itself. Where the valid split has too few images for the
    figure, the choice falls back to the measured split's figures (`prior`), and says so."""
    temperatures = list(drawn)
    if len(temperatures) == 1:
        return {"temperature": temperatures[0], "split": None}
    if split != SELECTION_SPLIT:
        n = len(next(iter(drawn.values())))
        reference = selection_features()["random"]
        if len(reference) >= n:
            figures = {t: sm.kid(reference[:n], features) for t, features in drawn.items()}
            best = min(temperatures, key=lambda t: figures[t]["value"])
            return {"temperature": best, "split": SELECTION_SPLIT,
                    PRIMARY: {f"{t:g}": figure for t, figure in figures.items()}}
    best = min(temperatures, key=lambda t: prior[f"{t:g}"][PRIMARY]["value"])
    return {"temperature": best, "split": split}


def measure_id(identity: dict, counts: dict, temperatures: list[float], seed: int) -> str:
    blob = json.dumps({"format": FORMAT, "features": identity, "counts": counts, "temperatures": temperatures,
                       "seed": seed, "primary": PRIMARY}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sample_quality(model, shards: str, split: str, manifest: dict, temperatures: list[float], n_images: int,
                   batch_size: int, inception=None, fid_reason: str | None = None, seed: int = SAMPLE_SEED
                   ) -> tuple[dict, dict[float, torch.Tensor]]:
    """The `samples` object and, for grids, the first GRID_IMAGES prior samples drawn at each temperature."""
    heldout, keys = collect_images(shards, split, n_images, manifest, batch_size)
    train, _ = collect_images(shards, "train", len(heldout), manifest, batch_size, exclude=set(keys))
    n = min(len(heldout), len(train))
    try:
        sm.require_images(f"sample metrics of the {split} split against training images", len(heldout), len(train))
    except BadInput as err:
        raise BadInput(f"shards {shards}: {err} (set eval.sample_images, or give the splits more images)") from None
    heldout_u8 = heldout[:n]  # reconstructions encode the 8-bit images, as evaluation does
    heldout, train = to_unit(heldout_u8).float(), to_unit(train[:n]).float()
    spaces = FeatureSpaces(next(model.parameters()).device, inception)
    generator = torch.Generator().manual_seed(seed)
    heldout_features, train_features = spaces.embed(heldout), spaces.embed(train)
    reference = sm.SwdReference(heldout, n, generator)
    heldout_nearest = sm.nearest_distances(heldout, train)
    prior, drawn, drawn_features = {}, {}, {}
    for t in temperatures:
        images = prior_samples(model, max(n, GRID_IMAGES), t, seed, batch_size)
        drawn[t], images = images[:GRID_IMAGES], images[:n]
        drawn_features[t] = spaces.embed(images)
        figures = compare(reference, heldout_features, images, drawn_features[t], generator)
        nearest, nearest_heldout = sm.nearest_distances(images, train), sm.nearest_distances(images, heldout)
        figures["memorisation"] = {
            "nearest_train_rms": sm.mean_figure(nearest),
            # the held-out images' own distance to the training set: samples far closer than that copy it
            "ratio_to_heldout": float(nearest.mean() / heldout_nearest.mean().clamp_min(1e-12)),
            # the samples' distance to training images over theirs to as many held-out images: about 1 for a
            # model that does not copy (even a blurry one, which is close to everything), well below 1 if it does
            "train_to_heldout": float(nearest.mean() / nearest_heldout.mean().clamp_min(1e-12))}
        prior[f"{t:g}"] = figures
    recon = reconstructions(model, heldout_u8, batch_size)
    selection = select_temperature(
        {t: f["random"] for t, f in drawn_features.items()}, prior, split,
        lambda: spaces.embed(to_unit(collect_images(shards, SELECTION_SPLIT, n, manifest, batch_size)[0]).float()))
    best = selection["temperature"]
    identity = spaces.identity()
    samples = {
        "format": FORMAT, "primary": {"metric": PRIMARY, "of": "prior", "temperature": best,
                                      **prior[f"{best:g}"][PRIMARY]},
        "selection": selection,
        "measure": measure_id(identity, {"heldout": n, "train": n, "generated": n}, list(temperatures), seed),
        "features": identity, "fid_reason": None if inception is not None else fid_reason,
        "n_heldout": n, "n_train": n, "n_generated": n, "temperatures": list(temperatures),
        "prdc_neighbours": sm.prdc_neighbours(n, n),
        "floor": compare(reference, heldout_features, train, train_features, generator),
        "prior": prior,
        "reconstructions": compare(reference, heldout_features, recon, spaces.embed(recon), generator),
        "heldout_nearest_train_rms": sm.mean_figure(heldout_nearest),
    }
    return samples, drawn
