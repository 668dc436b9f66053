"""Optimisation options: the loss the optimiser sees per dimension, Adamax beside AdamW, skipping outlier updates,
random horizontal flips (drawn from the run's seed, replayed on resume, never in evaluation), and bf16 on CPUs
without bf16 units said, not silent."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vae_runtime.errors import ConfigError
from conftest import tensors_of, tiny_config
from vae.core import checkpoint as ckpt
from vae.core.run import latest_checkpoint
from vae.core.config import config_hash, load_config
from vae.models import build_model
from vae.core.objectives import image_dims
from vae.training import train as train_module
from vae.training.train import train

QUIET = ("train.tensorboard=false",)


def _assert_same_run(a: dict, b: dict) -> None:
    for part in ("model", "ema", "optimizer"):
        flat_a, flat_b = list(tensors_of(a[part])), list(tensors_of(b[part]))
        assert len(flat_a) == len(flat_b) and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), part
    for counter in ("step", "skipped", "skipped_outliers", "images"):
        assert a[counter] == b[counter], counter


def _resumed_equals_whole(tmp_path, shards, monkeypatch, *args, steps=6, every=4, stop_at=2) -> dict:
    """Train `steps` at once; train again stopped at `stop_at` (inside the first segment, as SIGTERM stops it),
    then resumed: both end bitwise alike (weights, EMA, optimizer, progress). Returns the whole run's last state."""
    common = (*QUIET, *args, f"train.steps={steps}", f"train.checkpoint_every={every}")
    train(tiny_config(tmp_path / "whole", shards, *common), progress=False)
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "stop_signal", lambda state, sigterm: train_module.PREEMPTED
                      if state.progress.step == stop_at else 0.0)
        with pytest.raises(train_module.Preempted):
            train(tiny_config(resumed, shards, *common), progress=False)
    stopped = ckpt.load_checkpoint(latest_checkpoint(resumed))
    assert stopped["step"] == stop_at and stopped["stream_start"] == 0  # the resume replays the stream
    train(tiny_config(resumed, shards, *common), progress=False)
    whole = ckpt.load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    _assert_same_run(whole, ckpt.load_checkpoint(latest_checkpoint(resumed)))
    assert whole["step"] == steps
    return whole


def _initial_weights(cfg) -> dict:
    torch.manual_seed(cfg.train.seed)  # as setup builds the model
    return build_model(cfg.model).state_dict()


# --- the loss per dimension -------------------------------------------------------------------------------------

def test_the_optimiser_sees_the_loss_per_dimension_and_the_logs_stay_in_nats(tiny_shards, tmp_path):
    from vae.training.state import setup
    from vae.training.steps import Window, forward_backward_step
    from vae.training.train import open_stream

    grads, windows = {}, {}
    for per_dim in (False, True):
        state = setup(tiny_config(tmp_path / str(per_dim), tiny_shards, *QUIET, "train.steps=4",
                                  f"objective.loss_per_dim={str(per_dim).lower()}"))
        batches, noise = open_stream(state, None, 0)
        windows[per_dim] = Window()
        finite, *_ = forward_backward_step(state, batches, noise, 1.0, windows[per_dim], set())
        assert finite
        grads[per_dim] = [p.grad.clone() for p in state.raw_model.parameters()]
    dims = image_dims(16)
    per_image, per_dim = (torch.cat([g.flatten() for g in grads[key]]) for key in (False, True))
    assert (per_dim * dims - per_image).norm() <= 1e-5 * per_image.norm()  # equal up to float32 rounding
    assert per_image.norm() > 1  # and not both zero
    assert windows[True].sums == windows[False].sums  # the loss and the ELBO logged: nats per image both ways

    run = tmp_path / "logged"
    train(tiny_config(run, tiny_shards, *QUIET, "train.steps=2", "train.log_every=2", "objective.loss_per_dim=true"),
          progress=False)
    [record] = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert record["elbo_bpd"] == pytest.approx(-record["elbo_nats"] / (dims * math.log(2)))
    assert 1 < record["elbo_bpd"] < 10 and record["loss"] > dims  # per image, not per dimension


# --- Adamax -----------------------------------------------------------------------------------------------------

def test_adamw_stays_the_default_with_torchs_betas_and_eps(tiny_shards, tmp_path):
    from vae.training.state import make_optimizer

    cfg = tiny_config(tmp_path, tiny_shards)
    optimizer = make_optimizer(cfg, torch.nn.Linear(2, 2).parameters())
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    adamax = make_optimizer(tiny_config(tmp_path, tiny_shards, "train.optimizer=adamax"),
                            torch.nn.Linear(2, 2).parameters())
    assert type(adamax) is torch.optim.Adamax and adamax.defaults["lr"] == cfg.train.lr


def test_adamax_trains_and_resumes_exactly(tiny_shards, tmp_path, monkeypatch):
    whole = _resumed_equals_whole(tmp_path, tiny_shards, monkeypatch, "train.optimizer=adamax")
    assert all("exp_inf" in s for s in whole["optimizer"]["state"].values())  # Adamax's state was checkpointed
    initial = _initial_weights(tiny_config(tmp_path, tiny_shards))
    assert all(not torch.equal(v, whole["model"][k]) for k, v in initial.items() if v.is_floating_point())
    log = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]


def test_resuming_with_another_optimizer_is_refused(tiny_shards, tmp_path):
    from vae_runtime.errors import BadInput

    run = tmp_path / "run"
    train(tiny_config(run, tiny_shards, *QUIET, "train.steps=2"), progress=False)
    with pytest.raises(BadInput, match=r"train.optimizer 'adamw' -> 'adamax'"):
        train(tiny_config(run, tiny_shards, *QUIET, "train.steps=4", "train.optimizer=adamax"), progress=False)


# --- skipping outlier updates -----------------------------------------------------------------------------------

def test_a_tiny_skip_threshold_skips_every_update_and_counts_them_apart(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_shards, *QUIET, "train.steps=6", "train.log_every=3", "train.skip_threshold=1e-9")
    train(cfg, progress=False)
    state = ckpt.load_checkpoint(latest_checkpoint(run))
    assert all(torch.equal(v, state["model"][k]) for k, v in _initial_weights(cfg).items())
    assert state["skipped_outliers"] == 6 and state["skipped"] == 0 and state["step"] == 6
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [(r["skipped_outliers"], r["skipped_steps"]) for r in log] == [(3, 0), (6, 0)]
    assert all(r["loss"] is not None and r["grad_norm"] > 1e-9 for r in log)  # measured, only not applied


def test_outlier_skips_resume_exactly(tiny_shards, tmp_path, monkeypatch):
    # Gradient norms of the tiny model are about 420-520 over its first steps: 440 skips some, not all.
    whole = _resumed_equals_whole(tmp_path, tiny_shards, monkeypatch, "train.skip_threshold=440")
    assert 0 < whole["skipped_outliers"] < whole["step"] and whole["skipped"] == 0


def test_an_fp16_outlier_closes_the_loss_scalers_unscale_without_an_update(tiny_shards, tmp_path, monkeypatch):
    """Under fp16 clipping unscales the gradients; a skipped outlier must still end that with the scaler's update
    (torch's GradScaler refuses a second unscale before it), and make no optimizer step."""
    from vae.training.state import setup
    from vae.training.steps import Window, train_step
    from vae.training.train import open_stream

    state = setup(tiny_config(tmp_path / "fp16", tiny_shards, *QUIET, "train.steps=4", "train.skip_threshold=10"))
    batches, noise = open_stream(state, None, 0)
    calls = []
    scaler = type("Scaler", (), {"scale": staticmethod(lambda loss: loss),
                                 "update": staticmethod(lambda: calls.append("update"))})()
    monkeypatch.setattr(state.accelerator, "scaler", scaler, raising=False)
    monkeypatch.setattr(state.accelerator, "clip_grad_norm_", lambda *a, **k: torch.tensor(1000.0))
    monkeypatch.setattr(state.optimizer, "step", lambda *a, **k: calls.append("step"))
    result = train_step(state, batches, noise, Window(), set())
    assert result.skipped and result.grad_norm == 1000.0 and calls == ["update"]
    assert state.progress.skipped_outliers == 1 and state.progress.skipped == 0


def test_a_checkpoint_from_before_the_outlier_counter_resumes_with_it_at_zero(tiny_shards, tmp_path):
    run = tmp_path / "run"
    args = (*QUIET, "train.checkpoint_every=2")
    train(tiny_config(run, tiny_shards, *args, "train.steps=2"), progress=False)
    saved = ckpt.load_checkpoint(latest_checkpoint(run))
    del saved["skipped_outliers"]
    ckpt.save_checkpoint(run, 2, saved, keep=3)
    train(tiny_config(run, tiny_shards, *args, "train.steps=4"), progress=False)
    assert ckpt.load_checkpoint(latest_checkpoint(run))["skipped_outliers"] == 0


# --- horizontal flips -------------------------------------------------------------------------------------------

def test_flips_mirror_the_drawn_images_and_follow_the_seed(tiny_shards, tmp_path, monkeypatch):
    from pipeline.memory import stream_seed
    from vae.training import steps
    from vae.training.state import setup
    from vae.training.steps import Window, flip_images, micro_batch_draws, train_step
    from vae.training.train import open_stream

    cfg = tiny_config(tmp_path, tiny_shards, *QUIET, "train.steps=4", "data.flip=true")
    state = setup(cfg)
    batches, noise = open_stream(state, None, 0)
    _, raw = next(open_stream(state, None, 0)[0])  # the same stream again: its first batch before flipping
    fed = []
    real = steps.elbo_terms
    monkeypatch.setattr(steps, "elbo_terms", lambda model, x, *a: fed.append(x.clone()) or real(model, x, *a))
    train_step(state, batches, noise, Window(), set())
    _, flips = micro_batch_draws(torch.Generator().manual_seed(stream_seed(cfg.train.seed, 0, 0)), 16, cfg)
    assert flips.any() and not flips.all()
    assert torch.equal(fed[0], flip_images(raw, flips)) and not torch.equal(fed[0], raw)
    assert torch.equal(flip_images(raw, flips)[flips], raw[flips].flip(-1))

    def drawn(seed):
        return micro_batch_draws(torch.Generator().manual_seed(stream_seed(seed, 0, 0)), 64, cfg)[1]

    assert torch.equal(drawn(0), drawn(0)) and not torch.equal(drawn(0), drawn(1))
    off = tiny_config(tmp_path, tiny_shards, "data.flip=false")
    assert micro_batch_draws(torch.Generator().manual_seed(0), 16, off)[1] is None


def test_flips_are_deterministic_for_a_seed(tiny_shards, tmp_path):
    args = (*QUIET, "train.steps=3", "data.flip=true")
    states = []
    for name in ("a", "b"):
        train(tiny_config(tmp_path / name, tiny_shards, *args), progress=False)
        states.append(ckpt.load_checkpoint(latest_checkpoint(tmp_path / name)))
    _assert_same_run(*states)
    train(tiny_config(tmp_path / "plain", tiny_shards, *QUIET, "train.steps=3"), progress=False)
    plain = ckpt.load_checkpoint(latest_checkpoint(tmp_path / "plain"))["model"]
    assert any(not torch.equal(v, plain[k]) for k, v in states[0]["model"].items())  # the flips changed training


def test_flipped_training_from_shards_resumes_exactly(tiny_shards, tmp_path, monkeypatch):
    _resumed_equals_whole(tmp_path, tiny_shards, monkeypatch, "data.flip=true")


def test_flipped_training_in_memory_resumes_exactly(tiny_shards, tmp_path, monkeypatch):
    _resumed_equals_whole(tmp_path, tiny_shards, monkeypatch, "data.flip=true", "data.in_memory=true")


def test_evaluation_never_flips(tiny_shards, tmp_path):
    """The same weights measure the same with data.flip on and off: evaluation reads its own loader."""
    from vae.evaluation.evaluate import evaluate

    flipped = tmp_path / "flipped"
    train(tiny_config(flipped, tiny_shards, *QUIET, "train.steps=2", "data.flip=true"), progress=False)
    plain = tmp_path / "plain"
    saved = ckpt.load_checkpoint(latest_checkpoint(flipped))
    config = json.loads(saved["config"])
    assert config["data"]["flip"] is True
    config["data"]["flip"] = False
    ckpt.save_checkpoint(plain, 2, {**saved, "config": json.dumps(config, sort_keys=True)}, keep=1)
    a, b = (evaluate(run, k=4, grids=False, out=tmp_path / f"eval-{run.name}") for run in (flipped, plain))
    for key in ("elbo_nats", "recon_nats", "kl_nats", "iwae_nats", "nll_bpd", "n_images", "weights_sha256"):
        assert a[key] == b[key], key


# --- bf16 on CPUs -----------------------------------------------------------------------------------------------

SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                   "flags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
GENOA = "model name\t: AMD EPYC 9654 96-Core Processor\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n"


def test_bf16_units_are_read_from_the_cpu_flags():
    from vae.core.hardware import cpu_bf16_units, cpu_model_name

    assert cpu_bf16_units(SAPPHIRE_RAPIDS) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_units(GENOA) == ["avx512_bf16"]
    assert cpu_bf16_units(SKYLAKE) == []
    assert cpu_bf16_units(GRAVITON) is None and cpu_bf16_units("") is None  # unknown, not absent
    assert cpu_model_name(GENOA) == "AMD EPYC 9654 96-Core Processor" and cpu_model_name(GRAVITON) is None


def test_bf16_on_a_cpu_without_bf16_units_warns_in_one_line(monkeypatch, capsys):
    from vae.core import hardware
    from vae.training.state import warn_slow_bf16

    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: SKYLAKE)
    warn_slow_bf16("bf16", on_gpu=False)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "train.mixed_precision=bf16" in lines[0] and "slower than float32" in lines[0]
    warn_slow_bf16("no", on_gpu=False)
    warn_slow_bf16("bf16", on_gpu=True)
    for cpu in (SAPPHIRE_RAPIDS, GENOA, GRAVITON):
        monkeypatch.setattr(hardware, "read_cpuinfo", lambda cpu=cpu: cpu)
        warn_slow_bf16("bf16", on_gpu=False)
    assert capsys.readouterr().err == ""


# --- configuration ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.skip_threshold=-1", "config key 'train.skip_threshold': must be >= 0"),
    ("train.optimizer=sgd", "config key 'train.optimizer': must be one of adamw, adamax, got 'sgd'"),
    ("data.flip=maybe", "config key 'data.flip': expected true or false"),
])
def test_bad_optimisation_keys_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_new_keys_enter_the_hash_only_when_set():
    base = config_hash(load_config(None, []))
    assert config_hash(load_config(None, ["train.optimizer=adamw", "train.skip_threshold=0", "data.flip=false",
                                          "objective.loss_per_dim=false"])) == base
    for override in ("train.optimizer=adamax", "train.skip_threshold=400", "data.flip=true",
                     "objective.loss_per_dim=true"):
        assert config_hash(load_config(None, [override])) != base, override
