"""The VDVAE-style hierarchical option (`model.layout`, vae/models/vdvae.py): layout parsing and its errors, the
latent's size, the zero-initialised start, the whitened-prior contract (deterministic decode, encode on the mean
path), the shared bounds, KL balancing, a training run, the export gate; and that configs without a layout build,
hash and resume exactly as before."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from vae_runtime.errors import ConfigError
from conftest import REPO, load_bench, perturbed, random_images, seeded_model, tiny_config
from vae.core.checkpoint import config_json, load_checkpoint, load_trained, resume_differences
from vae.core.run import list_checkpoints
from vae.core.config import ModelConfig, config_hash, load_config
from vae.models import build_model
from vae.models.blocks import Bottleneck
from vae.models.hierarchical import HierarchicalVAE
from vae.models.vdvae import VDVAE
from vae.core.objectives import (elbo_terms, gaussian_kl, iwae_bound, kl_balance_groups, kl_balance_weights, log_weights,
                            training_loss)
from vae.serving.export import TOLERANCE, export, export_graphs, random_ops

# 16x16 images, sides 8 and 4: 2 groups at 4x4 and 3 at 8x8 of 2 channels -> 2*(2*16 + 3*64) = 448 dimensions
LAYOUT = ["model.kind=hierarchical", "model.layout=4x2,8x3", "model.latent_channels=2", "model.latent_dim=448"]
SMALL = ["model.image_size=16", "model.channels=[8,16]", *LAYOUT]
SIZES = [32, 32, 128, 128, 128]


def _model(seed=0, *extra):
    return seeded_model(SMALL, seed, *extra)


def _images(n, seed=0):
    return random_images(n, 16, seed)


_perturb = perturbed


# -- the layout ---------------------------------------------------------------------------------------------
def test_a_layout_places_its_groups_top_down_and_sizes_the_latent():
    cfg = load_config(None, ["model.kind=hierarchical", "model.channels=[64,64,128,128]",
                             "model.layout=4x2, 8x3,16X3,32x2", "model.latent_channels=4",
                             "model.latent_dim=12160"]).model
    assert cfg.layout_groups() == [(4, 2), (8, 3), (16, 3), (32, 2)]
    assert cfg.group_resolutions() == [4, 4, 8, 8, 8, 16, 16, 16, 32, 32]
    assert cfg.latent_group_sizes() == [4 * r * r for r in cfg.group_resolutions()]
    assert cfg.hierarchical_latent_dim() == 4 * (2 * 16 + 3 * 64 + 3 * 256 + 2 * 1024) == 12160
    model = _model()
    assert isinstance(model, VDVAE) and model.latent_dim == 448 and model.group_sizes == SIZES
    assert len(model.groups) == 5 and [g.proj.in_channels for g in model.groups] == [2] * 5
    assert isinstance(build_model(load_config(None, ["model.image_size=16", "model.channels=[8,16]",
                                                     "model.kind=hierarchical", "model.latent_dim=80",
                                                     "model.latent_channels=1"]).model), HierarchicalVAE)


@pytest.mark.parametrize("layout, says", [
    ("4x2,,8x1", "item 2 is empty"),
    ("4x2,8x1,", "item 3 is empty"),
    ("4x0,8x1", "groups at a side must be in [1, 64]"),
    ("4x2,8x65", "groups at a side must be in [1, 64]"),
    ("4x2,8x", "is not SIDExGROUPS"),
    ("4*2", "is not SIDExGROUPS"),
    ("banana", "is not SIDExGROUPS"),
    ("4x2,-8x1", "is not SIDExGROUPS"),
    ("4x2,6x1", "side 6 is not a resolution"),
    ("4x2,16x1", "side 16 is not a resolution"),  # the image's own side: no width for it
    ("4x1,8x2,4x1", "sides must grow from the coarsest, 4 comes after 8"),
    ("4x1,4x1", "sides must grow from the coarsest, 4 comes after 4"),
    ("8x3", "starts at side 8, but model.channels has 2 widths, down to side 4"),
])
def test_a_layout_that_does_not_fit_fails_in_one_line_naming_the_key(layout, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.image_size=16", "model.channels=[8,16]", "model.kind=hierarchical",
                           f"model.layout={layout}"])
    message = str(err.value)
    assert message.startswith("config key 'model.layout': ") and says in message and "\n" not in message
    assert "e.g. model.layout=4x2,8x2" in message or "start the layout at 4" in message  # what to set


def test_a_layout_is_for_the_hierarchical_kind_and_the_latent_dim_error_says_what_to_set():
    with pytest.raises(ConfigError, match="'model.layout': a layout is for kind=hierarchical"):
        load_config(None, ["model.image_size=16", "model.channels=[8,16]", "model.layout=4x2"])
    with pytest.raises(ConfigError, match=r"'model.latent_dim': .*layout '4x2,8x3' \(5 groups of 2 channels\) "
                                          r"has 448 latent dimensions; set latent_dim=448"):
        load_config(None, [*SMALL[:-1], "model.latent_dim=80"])
    with pytest.raises(ConfigError, match="'model.layout': .*expected a string"):
        load_config(None, [*SMALL, "model.layout=48"])


# -- the start and the whitened-prior contract ----------------------------------------------------------
def test_a_fresh_model_has_kl_zero_and_identity_cells():
    model = _model()
    terms = elbo_terms(model, _images(4), torch.randn(4, 448))
    assert torch.equal(terms["kl"], torch.zeros(4)) and torch.isfinite(terms["recon"]).all()
    cells = [m for m in model.modules() if isinstance(m, Bottleneck) and m.residual]
    assert len(cells) == 5 + 2  # one per group, res_blocks=1 per side bottom-up
    x = torch.randn(2, 8, 8, 8)
    torch.testing.assert_close(model.groups[2].cell(x), x, rtol=0, atol=0)
    for group in model.groups:  # prior and posterior heads start at zero: N(0, I), no update of the state
        assert not group.prior.c4.weight.any() and not group.posterior.c4.weight.any()
    # perturbed, the cells are no longer the identity and the KL is positive in every group (the test can fail)
    _perturb(model)
    per_group = elbo_terms(model, _images(4), torch.randn(4, 448))["kl_dims"].split(SIZES, dim=1)
    assert all((part.sum(1) > 0).all() for part in per_group)


def test_decode_is_deterministic_and_encode_follows_the_posterior_mean_path():
    model = _perturb(_model(0, "model.likelihood=logistic_mixture"))
    x = torch.rand(3, 3, 16, 16)
    u = torch.randn(5, 448)
    assert torch.equal(model.decode(u), model.decode(u))
    mean = model.decode_mean(u * 10)
    assert mean.shape == (5, 3, 16, 16) and mean.min() >= 0 and mean.max() <= 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 448) and logvar.std() > 0
    params, mu2, logvar2 = model(x, torch.zeros(3, 448))  # eps = 0: the posterior-mean path
    torch.testing.assert_close(mu2, mu)
    torch.testing.assert_close(logvar2, logvar)
    torch.testing.assert_close(params, model.decode(mu))  # decoding the code reproduces the path
    # the lower groups' posterior depends on the upper groups' sample; the top group's on x alone
    eps = torch.randn(3, 448, generator=torch.Generator().manual_seed(0))
    other = eps.clone()
    other[:, :32] += 1.0
    _, mu_a, _ = model(x, eps)
    _, mu_b, _ = model(x, other)
    assert torch.equal(mu_a[:, :32], mu_b[:, :32]) and not torch.allclose(mu_a[:, 64:], mu_b[:, 64:])


def test_standard_deviations_are_bounded_below_and_never_overflow():
    model = _model()
    with torch.no_grad():
        for group in model.groups:
            group.posterior.c4.bias.fill_(-1e4)  # a raw value far below zero
    _, logvar = model.encode(torch.rand(2, 3, 16, 16))
    assert torch.isfinite(logvar).all() and logvar.min() > 2 * math.log(5e-4)


# -- the shared bounds and KL balancing -----------------------------------------------------------------
def test_the_elbo_is_finite_and_below_the_iwae_bound():
    model = _perturb(_model())
    x = _images(2)
    with torch.no_grad():
        lw = log_weights(model, x, 4, generator=torch.Generator().manual_seed(0))
        terms = elbo_terms(model, x, torch.randn(2, 448, generator=torch.Generator().manual_seed(3)))
    assert lw.shape == (4, 2) and torch.isfinite(lw).all() and torch.isfinite(terms["elbo"]).all()
    torch.testing.assert_close(terms["elbo"], terms["recon"] - terms["kl"])
    many = x.repeat(40, 1, 1, 1)
    k1 = iwae_bound(model, many, 1, generator=torch.Generator().manual_seed(1)).double()
    k8 = iwae_bound(model, many, 8, chunk=4, generator=torch.Generator().manual_seed(2)).double()
    stderr = math.sqrt((k1.var() + k8.var()).item() / len(many))
    assert k8.mean() > k1.mean() + 2 * stderr  # IWAE_8 is strictly tighter than the one-sample ELBO
    eps = torch.randn(2, 448, generator=torch.Generator().manual_seed(5))
    _, mu, logvar = model(x / 255.0, eps)
    torch.testing.assert_close(elbo_terms(model, x, eps)["kl_dims"], gaussian_kl(mu, logvar))


def test_kl_balancing_weights_groups_by_their_kl_per_dimension_during_warm_up_only():
    kl_dims = torch.zeros(2, 448)
    kl_dims[:, :32] = 0.5  # the top group carries information, the others have collapsed
    terms = {"recon": torch.zeros(2), "kl_dims": kl_dims.requires_grad_()}
    weights = kl_balance_weights(torch.stack([p.sum() for p in kl_dims.mean(0).split(SIZES)]), SIZES)
    assert math.isclose(weights.mean().item(), 1.0, rel_tol=1e-6) and weights[0] > 10 * weights[1:].max()
    balanced = training_loss(terms, 0.5, 0.0, SIZES)
    torch.testing.assert_close(balanced, 0.5 * weights[0].detach() * 16.0)
    balanced.backward()
    assert terms["kl_dims"].grad[0, 100] < terms["kl_dims"].grad[0, 0] / 10  # collapsed groups: pushed far less
    plain = training_loss({"recon": torch.zeros(2), "kl_dims": kl_dims.detach()}, 0.5, 0.0)
    torch.testing.assert_close(training_loss({"recon": torch.zeros(2), "kl_dims": kl_dims.detach()}, 0.5, 0.0, [448]),
                               plain)  # one group: nothing to balance
    cfg = load_config(None, [*SMALL, "objective.kl_balance=true", "objective.kl_warmup_steps=10"])
    assert kl_balance_groups(cfg, 0.3) == SIZES and kl_balance_groups(cfg, 1.0) is None
    assert kl_balance_groups(load_config(None, SMALL), 0.3) is None
    with pytest.raises(ConfigError, match="'objective.kl_balance': .*set objective.kl_warmup_steps > 0"):
        load_config(None, [*SMALL, "objective.kl_balance=true"])


# -- old configs ----------------------------------------------------------------------------------------------
def _keys_digest(model):
    return hashlib.sha256(";".join(f"{k}:{list(v.shape)}" for k, v in sorted(model.state_dict().items()))
                          .encode()).hexdigest()[:16]


def test_configs_without_a_layout_keep_their_model_hash_and_resume():
    """Pinned on purpose: a `groups`-style model's state-dict keys (and shapes) are those of the checkpoints
    already written, and `model.layout` at its default stays out of config_hash."""
    groups = ["model.image_size=16", "model.channels=[8,16]", "model.kind=hierarchical", "model.groups=2",
              "model.latent_channels=1", "model.latent_dim=80"]
    assert _keys_digest(build_model(load_config(None, groups).model)) == "9dc9710c7deeac63"
    hier = load_config(str(REPO / "configs" / "celeba64-hier.yaml"), [])
    assert _keys_digest(build_model(hier.model)) == "63921fa11e714f13"
    assert config_hash(hier) == "134db525571c3430"
    changed = load_config(str(REPO / "configs" / "celeba64-hier.yaml"),
                          ["model.layout=4x2,8x2", "model.latent_dim=1280", "objective.kl_warmup_steps=5"])
    assert config_hash(changed) != config_hash(load_config(str(REPO / "configs" / "celeba64-hier.yaml"),
                                                           ["objective.kl_warmup_steps=5"]))
    differ = resume_differences({"config": config_json(hier)}, changed)
    assert any(d.startswith("model.layout '' -> '4x2,8x2'") for d in differ)
    assert ModelConfig().layout == "" and resume_differences({"config": config_json(hier)}, hier) == []


# -- training, evaluation and export ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def vdvae_run(tiny_shards, tmp_path_factory):
    from vae.training.train import train

    run_dir = tmp_path_factory.mktemp("vdvae-run")
    cfg = tiny_config(run_dir, tiny_shards, *LAYOUT, "train.steps=4", "train.checkpoint_every=4",
                      "objective.kl_warmup_steps=4", "objective.kl_balance=true")
    train(cfg, progress=False)
    return run_dir, cfg


def test_a_training_step_changes_the_weights(vdvae_run):
    run_dir, cfg = vdvae_run
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model).state_dict()
    trained = load_checkpoint(list_checkpoints(run_dir)[-1])["model"]
    assert trained.keys() == initial.keys()
    moved = [k for k in initial if not torch.equal(initial[k], trained[k].to(initial[k].dtype))]
    assert "groups.0.posterior.c4.weight" in moved and "stem.weight" in moved and "to_params.weight" in moved
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and log[-1]["skipped_steps"] == 0 and math.isfinite(log[-1]["loss"])


def test_the_exported_graphs_have_no_random_op_and_match_pytorch(tmp_path):
    import onnxruntime as ort

    model = _perturb(_model(0, "model.likelihood=logistic_mixture")).eval()
    export_graphs(model, tmp_path)
    assert random_ops(tmp_path / "decoder.onnx") == set() and random_ops(tmp_path / "encoder.onnx") == set()
    u = np.random.default_rng(0).standard_normal((7, 448)).astype(np.float32)
    decoder = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model.decode_mean(torch.from_numpy(u)).numpy()
    np.testing.assert_allclose(decoder.run(["x_mean"], {"z": u})[0], want, atol=TOLERANCE, rtol=0)
    x = np.random.default_rng(1).random((3, 3, 16, 16), dtype=np.float32)
    encoder = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    mu, logvar = encoder.run(["mu", "logvar"], {"x": x})
    with torch.no_grad():
        want_mu, want_logvar = model.encode(torch.from_numpy(x))
    np.testing.assert_allclose(mu, want_mu.numpy(), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(logvar, want_logvar.numpy(), atol=TOLERANCE, rtol=0)


def test_vae_export_of_a_trained_run_passes_the_parity_gate(vdvae_run, tmp_path):
    run_dir, _ = vdvae_run
    card = export(run_dir, tmp_path / "model", version="vdvae-1")  # raises unless onnxruntime matches torch
    assert card["latent_dim"] == 448
    assert max(v["decoder"] for v in card["validation"]["max_abs_diff"].values()) <= TOLERANCE
    model, _, _ = load_trained(run_dir)
    assert isinstance(model, VDVAE)


def test_the_gpu_recipe_builds_and_takes_a_finite_bf16_step_on_the_cpu():
    """configs/celeba64-gpu.yaml at its real size (no GPU here): one bf16-autocast training step on two images is
    finite, and the flat latent is the whitened prior noise decoder.onnx takes."""
    import torch

    from conftest import REPO
    from vae.core.config import load_config
    from vae.models import build_model
    from vae.core.objectives import elbo_terms, training_loss

    cfg = load_config(REPO / "configs" / "celeba64-gpu.yaml")
    model = build_model(cfg.model)
    assert model.latent_dim == cfg.model.latent_dim == 85504
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, model.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = elbo_terms(model, x, eps, model.likelihood)
    loss = training_loss(terms, 1.0, 0.0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


def test_the_weights_digest_does_not_depend_on_the_memory_layout():
    """channels_last 1x1 kernels count as contiguous with a last stride other than 1: the digest (which names the
    evaluated and exported weights) reads values in logical order, so both layouts give one digest."""
    import torch

    from vae.core.checkpoint import weights_digest

    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.Conv2d(16, 4, 3))
    before = weights_digest(model)
    model.to(memory_format=torch.channels_last)
    assert model[0].weight.stride()[-1] != 1  # the layout that broke a byte view
    assert weights_digest(model) == before
    with torch.no_grad():
        model[0].weight[0, 1, 0, 0] += 1.0
    assert weights_digest(model) != before


def test_the_group_temperature_bench_scales_exactly_each_sides_groups():
    """bench/group_temperatures.py scales the flat noise side by side: split as the model splits it, the 8x8
    groups' noise is 0.5 times the draw, the 4x4 groups' is untouched, and a side the model lacks is refused."""
    bench = load_bench("group_temperatures")
    model = _model()
    scale = bench.noise_scale(model, {8: 0.5})
    u = torch.randn(3, model.latent_dim, generator=torch.Generator().manual_seed(0))
    groups, scaled = model._split(u), model._split(u * scale)
    assert [g.shape[-1] for g in groups] == [4, 4, 8, 8, 8]
    for side, plain, cooled in zip([4, 4, 8, 8, 8], groups, scaled):
        assert torch.equal(cooled, plain * (0.5 if side == 8 else 1.0))
    with pytest.raises(SystemExit, match="sides \\[32\\] are not among"):
        bench.noise_scale(model, {32: 0.5})
    assert bench.parse_profiles("8:0.5;4:0.9,8:0.7") == [{}, {8: 0.5}, {4: 0.9, 8: 0.7}]
