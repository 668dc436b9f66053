"""The hierarchical (top-down) VAE: shapes, a deterministic decoder in the whitened prior, the shared objective
code (log weights, IWAE >= ELBO, per-group KL), config validation, and train -> evaluate -> export end to end."""

import json
import math

import numpy as np
import pytest
import torch

from vae_runtime.errors import ConfigError
from conftest import perturbed, random_images, seeded_model, tiny_config
from pipeline.loader import eval_loader
from vae.core.checkpoint import load_checkpoint, load_trained
from vae.core.run import list_checkpoints
from vae.core.config import load_config
from vae.evaluation.evaluate import evaluate
from vae.models import build_model
from vae.models.conv import ConvVAE
from vae.models.hierarchical import HierarchicalVAE
from vae.core.objectives import elbo_terms, gaussian_kl, iwae_bound, log_weights
from vae.serving.export import TOLERANCE, export, export_graphs, random_ops
from vae_runtime import Decoder, Encoder

# 16x16 images, resolutions 8 and 4: groups of 1 channel at sides 4 and 8 -> 16 + 64 latent dimensions.
HIER = ["model.kind=hierarchical", "model.groups=2", "model.latent_channels=1", "model.latent_dim=80"]
SMALL = ["model.image_size=16", "model.channels=[8,16]", *HIER]


def _model(seed=0, *extra):
    return seeded_model(SMALL, seed, *extra)


def _images(n, seed=0):
    return random_images(n, 16, seed)


_perturb = perturbed


def test_build_model_picks_the_kind():
    assert isinstance(_model(), HierarchicalVAE)
    assert isinstance(build_model(load_config(None, ["model.image_size=16", "model.channels=[8,16]"]).model),
                      ConvVAE)


@pytest.mark.parametrize("likelihood", ["discretized_logistic", "logistic_mixture", "bernoulli", "gaussian"])
def test_shapes_and_the_mean_path(likelihood):
    model = _perturb(_model(0, f"model.likelihood={likelihood}"))
    assert model.latent_dim == 80 and model.group_sizes == [16, 64]
    x = torch.rand(3, 3, 16, 16)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 80)
    params = model.decode(mu)
    assert params.shape == (3, model.likelihood.num_params(3), 16, 16)
    mean = model.decode_mean(torch.randn(4, 80) * 10)
    assert mean.shape == (4, 3, 16, 16) and mean.min() >= 0 and mean.max() <= 1
    # eps = 0 follows the posterior-mean path: the same (mu, logvar) as encode, and decode(mu) reconstructs
    out, mu2, logvar2 = model(x, torch.zeros(3, 80))
    torch.testing.assert_close(mu2, mu)
    torch.testing.assert_close(logvar2, logvar)
    torch.testing.assert_close(out, params)


def test_lower_posterior_depends_on_the_upper_sample_and_decode_is_deterministic():
    model = _perturb(_model())
    x = torch.rand(2, 3, 16, 16)
    eps = torch.randn(2, 80, generator=torch.Generator().manual_seed(0))
    other = eps.clone()
    other[:, :16] += 1.0  # a different top-group sample
    _, mu_a, _ = model(x, eps)
    _, mu_b, _ = model(x, other)
    assert torch.equal(mu_a[:, :16], mu_b[:, :16])  # the top group's posterior: x alone
    assert not torch.allclose(mu_a[:, 16:], mu_b[:, 16:])  # the lower group's: conditional on the upper
    u = torch.randn(5, 80)
    assert torch.equal(model.decode(u), model.decode(u))


def test_exported_decoder_has_no_random_op_and_matches(tmp_path):
    model = _perturb(_model()).eval()
    export_graphs(model, tmp_path)
    assert random_ops(tmp_path / "decoder.onnx") == set() and random_ops(tmp_path / "encoder.onnx") == set()
    import onnxruntime as ort

    u = np.random.default_rng(0).standard_normal((7, 80)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["x_mean"], {"z": u})[0]
    np.testing.assert_allclose(got, session.run(["x_mean"], {"z": u})[0], rtol=0, atol=0)
    with torch.no_grad():
        want = model.decode_mean(torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_log_weights_shape_and_iwae_above_the_elbo_on_average():
    model = _perturb(_model())
    x = _images(2)
    with torch.no_grad():
        lw = log_weights(model, x, 6, generator=torch.Generator().manual_seed(0))
    assert lw.shape == (6, 2) and torch.isfinite(lw).all()
    many = x.repeat(100, 1, 1, 1)
    k1 = iwae_bound(model, many, 1, generator=torch.Generator().manual_seed(1)).double()
    k16 = iwae_bound(model, many, 16, chunk=5, generator=torch.Generator().manual_seed(2)).double()
    stderr = math.sqrt((k1.var() + k16.var()).item() / len(many))
    assert k16.mean() > k1.mean() + 2 * stderr  # the posterior is not exact: IWAE_16 is strictly tighter


def test_iwae_k1_is_the_single_sample_bound_along_the_sampled_path():
    model = _perturb(_model())
    x = _images(3)
    bound = iwae_bound(model, x, 1, generator=torch.Generator().manual_seed(4))
    eps = torch.randn((1, 3, 80), generator=torch.Generator().manual_seed(4))[0]
    with torch.no_grad():
        params, mu, logvar = model(x / 255.0, eps)
    u = mu + torch.exp(0.5 * logvar) * eps
    normal = torch.distributions.Normal
    by_hand = (model.likelihood.log_prob(params, x) + normal(0.0, 1.0).log_prob(u).sum(1)
               - normal(mu, torch.exp(0.5 * logvar)).log_prob(u).sum(1))
    torch.testing.assert_close(bound, by_hand, atol=1e-2, rtol=1e-5)


def test_elbo_terms_per_group_kl():
    model = _perturb(_model())
    x = _images(4)
    terms = elbo_terms(model, x, torch.randn(4, 80, generator=torch.Generator().manual_seed(0)))
    assert terms["kl_dims"].shape == (4, 80) and (terms["kl_dims"] >= 0).all()
    per_group = [part.sum(1) for part in terms["kl_dims"].split(model.group_sizes, dim=1)]
    assert all((kl > 0).all() for kl in per_group)
    torch.testing.assert_close(terms["kl"], sum(per_group))
    torch.testing.assert_close(terms["elbo"], terms["recon"] - terms["kl"])
    # a fresh model starts at q = p = N(0, I) for every group: KL exactly 0
    fresh = elbo_terms(_model(), x, torch.randn(4, 80))
    assert torch.equal(fresh["kl"], torch.zeros(4))
    # the KL of the path: the conditional posterior's own analytic KL against the whitened prior
    eps = torch.randn(4, 80, generator=torch.Generator().manual_seed(5))
    _, mu, logvar = model(x / 255.0, eps)
    torch.testing.assert_close(elbo_terms(model, x, eps)["kl_dims"], gaussian_kl(mu, logvar))


@pytest.mark.parametrize("override, key", [
    (["model.kind=ladder"], "model.kind"),
    ([*HIER, "model.groups=3"], "model.groups"),
    ([*HIER, "model.groups=0"], "model.groups"),
    ([*HIER, "model.latent_channels=0"], "model.latent_channels"),
    ([*HIER[:-1], "model.latent_dim=81"], "model.latent_dim"),
    (["model.groups=two"], "model.groups"),
])
def test_config_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, ["model.image_size=16", "model.channels=[8,16]", *override])


def test_latent_dim_error_says_what_to_set():
    with pytest.raises(ConfigError, match="set latent_dim=80"):
        load_config(None, [*SMALL[:-1], "model.latent_dim=4"])


@pytest.fixture(scope="module")
def hier_run(tiny_shards, tmp_path_factory):
    from vae.training.train import train

    run_dir = tmp_path_factory.mktemp("hier-run")
    cfg = tiny_config(run_dir, tiny_shards, *HIER, "train.steps=30", "train.checkpoint_every=15")
    train(cfg, progress=False)
    return run_dir, cfg


def _loss(model, x):
    eps = torch.randn((x.shape[0], model.latent_dim), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return -elbo_terms(model, x, eps)["elbo"].mean().item()


def test_training_lowers_the_loss(hier_run, tiny_shards):
    run_dir, cfg = hier_run
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model)
    trained = build_model(cfg.model)
    trained.load_state_dict(load_checkpoint(list_checkpoints(run_dir)[-1])["model"])
    _, x, _ = next(iter(eval_loader(str(tiny_shards), "train", 32)))
    assert _loss(trained, x) < 0.9 * _loss(initial, x)
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and log[-1]["skipped_steps"] == 0 and log[-1]["loss"] < log[0]["loss"]


def test_evaluate_and_export_pass_the_parity_gate(hier_run, tmp_path):
    run_dir, _ = hier_run
    metrics = evaluate(run_dir, split="test", k=8)
    assert json.loads((run_dir / "eval" / "metrics.json").read_text()) == metrics
    assert math.isclose(metrics["elbo_nats"], metrics["recon_nats"] - metrics["kl_nats"], rel_tol=1e-9)
    assert metrics["iwae_nats"] >= metrics["elbo_nats"] - 3 * metrics["iwae_stderr_nats"]
    assert 0 < metrics["nll_bpd"] < 8.5 and 0 <= metrics["active_units"] <= 80
    card = export(run_dir, tmp_path / "model", version="hier-1")  # raises unless onnxruntime matches torch
    assert card["latent_dim"] == 80 and max(v["decoder"] for v in card["validation"]["max_abs_diff"].values()) \
        <= TOLERANCE
    decoder, encoder = Decoder(tmp_path / "model" / "decoder.onnx"), Encoder(tmp_path / "model" / "encoder.onnx")
    assert np.array_equal(decoder.sample(3, seed=1), decoder.sample(3, seed=1))
    model, _, _ = load_trained(run_dir)
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    mu, _ = encoder.encode(x)
    with torch.no_grad():
        want = model.encode(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(mu, want, atol=TOLERANCE, rtol=0)
