"""Training: steps change the weights and lower the loss, resume reproduces an uninterrupted run bitwise,
non-finite losses are skipped and then stop training with the last good checkpoint intact."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from vae_runtime.errors import ConfigError, TrainingError
from conftest import tensors_of, tiny_config
from pipeline.loader import eval_loader
from vae.core.checkpoint import load_checkpoint, load_trained
from vae.core.run import list_checkpoints
from vae.models import build_model
from vae.core.objectives import elbo_terms
from vae.training.steps import train_step
from vae.training.train import train


def _fixed_batch(shards):
    keys, x, _ = next(iter(eval_loader(str(shards), "train", 32)))
    return x


def _loss(model, x):
    eps = torch.randn((x.shape[0], model.latent_dim), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return -elbo_terms(model, x, eps)["elbo"].mean().item()


def test_training_changes_weights_and_lowers_the_loss(tiny_shards, trained_run):
    cfg = tiny_config(trained_run, tiny_shards)
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model)  # the same initial weights training starts from
    state = load_checkpoint(list_checkpoints(trained_run)[-1])
    trained = build_model(cfg.model)
    trained.load_state_dict(state["model"])
    changed = [k for k, v in initial.state_dict().items() if not torch.equal(v, state["model"][k])]
    assert len(changed) == len(initial.state_dict())  # every tensor moved
    x = _fixed_batch(tiny_shards)
    assert _loss(trained, x) < 0.9 * _loss(initial, x)
    log = [json.loads(line) for line in (trained_run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and log[-1]["skipped_steps"] == 0 and log[-1]["loss"] < log[0]["loss"]
    assert int(state["step"]) == 30
    ema_model, _, step = load_trained(trained_run)
    assert step == 30 and _loss(ema_model, x) < _loss(initial, x)


def test_resume_reproduces_the_uninterrupted_run_bitwise(tiny_shards, trained_run, tmp_path):
    # The session run saved at steps 15 and 30; a run that stopped after step 15 resumes from that file.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "step-00000015.pt", resumed / "checkpoints")
    train(tiny_config(resumed, tiny_shards, "train.steps=30", "train.checkpoint_every=15"), progress=False)
    a = load_checkpoint(trained_run / "checkpoints" / "step-00000030.pt")
    b = load_checkpoint(resumed / "checkpoints" / "step-00000030.pt")
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"


def test_checkpoints_load_with_weights_only(trained_run):
    state = torch.load(list_checkpoints(trained_run)[-1], weights_only=True)
    assert {"model", "ema", "optimizer", "scheduler", "config", "step"} <= set(state)
    assert json.loads(state["config"])["train"]["steps"] == 30


def _steps(cfg):
    """A run's state and an open stream, for driving single steps."""
    from vae.training.state import setup
    from vae.training.steps import Window
    from vae.training.train import open_stream

    state = setup(cfg)
    batches, noise = open_stream(state, None, state.progress.stream_start)
    return state, lambda: train_step(state, batches, noise, Window(), set())


def test_persistent_nonfinite_loss_stops_with_checkpoint_intact(tiny_shards, tmp_path):
    run = tmp_path / "nan"
    train(tiny_config(run, tiny_shards, "train.steps=10", "train.checkpoint_every=5"), progress=False)
    good = load_checkpoint(run / "checkpoints" / "step-00000010.pt")
    state, step = _steps(tiny_config(run, tiny_shards, "train.steps=20", "train.checkpoint_every=5",
                                     "train.max_nonfinite=3"))
    with torch.no_grad():
        next(state.raw_model.parameters()).fill_(float("nan"))  # every loss from here on is NaN
    assert step().skipped and step().skipped and state.progress.skipped == 2
    with pytest.raises(TrainingError, match="3 non-finite"):
        step()
    after = load_checkpoint(list_checkpoints(run)[-1])
    assert int(after["step"]) == 10
    for key in good["model"]:
        assert torch.equal(good["model"][key], after["model"][key])


def test_isolated_nonfinite_steps_are_skipped_and_counted(tiny_shards, tmp_path):
    state, step = _steps(tiny_config(tmp_path / "skip", tiny_shards, "train.steps=10"))
    weight = next(state.raw_model.parameters())
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("inf"))
    result = step()
    assert result.skipped and result.grad_norm != result.grad_norm and (
        state.progress.step, state.progress.skipped, state.progress.skipped_outliers, state.progress.images) == (
        1, 1, 0, 16)
    with torch.no_grad():
        weight.copy_(kept)  # the skipped step left the weights as they were
    assert not step().skipped and state.nonfinite_in_a_row == 0 and state.progress.skipped == 1
    assert all(torch.isfinite(p).all() for p in state.raw_model.parameters())


def test_an_fp16_overflow_is_the_loss_scalers_to_handle(tiny_shards, tmp_path, monkeypatch):
    """Under fp16 a gradient past the loss scale goes to the scaler's step (which skips the update and lowers the
    scale; without it the next unscale fails); it is counted as skipped, not towards max_nonfinite."""
    state, step = _steps(tiny_config(tmp_path / "fp16", tiny_shards, "train.steps=10", "train.max_nonfinite=2"))
    stepped = []
    scaler = type("Scaler", (), {"scale": staticmethod(lambda loss: loss)})()  # what fp16 gives the accelerator
    monkeypatch.setattr(state.accelerator, "scaler", scaler, raising=False)
    monkeypatch.setattr(state.accelerator, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    monkeypatch.setattr(state.optimizer, "step", lambda *a, **k: stepped.append(1))
    from vae.training import steps as steps_module

    monkeypatch.setattr(steps_module, "SCALE_HALVINGS", 3)
    for _ in range(3):  # more overflows in a row than max_nonfinite: calibration, not divergence
        assert step().skipped
    assert len(stepped) == 3 and state.progress.skipped == 3 and state.nonfinite_in_a_row == 0
    assert step().skipped and state.nonfinite_in_a_row == 1  # past what calibration takes: divergence
    with pytest.raises(TrainingError, match="2 non-finite"):
        step()


def test_fp16_training_on_a_gpu_runs_through_the_loss_scale_calibration(tiny_shards, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import os
    import subprocess
    import sys

    from conftest import TINY

    run = tmp_path / "fp16-gpu"  # its own process: Accelerate's mixed precision is fixed once per process
    cmd = [sys.executable, "-m", "vae.cli", "train", *TINY, f"run_dir={run}", f"data.shards={tiny_shards}",
           "train.steps=40", "train.mixed_precision=fp16", "train.log_every=10"]
    path = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=path))
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 40 and math.isfinite(log[-1]["loss"]) and log[-1]["skipped_steps"] < 40


def test_a_step_moves_the_weights_the_scheduler_and_the_ema(tiny_shards, tmp_path):
    state, step = _steps(tiny_config(tmp_path / "one", tiny_shards, "train.steps=10"))
    before = {k: v.clone() for k, v in state.raw_model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in state.ema.state_dict().items()}
    lr = state.scheduler.get_last_lr()[0]
    assert not step().skipped
    after = state.raw_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(ema_before[k], v) for k, v in state.ema.state_dict().items())
    assert state.scheduler.get_last_lr()[0] != lr and state.progress.step == 1


def test_fp16_on_cpu_is_refused_not_ignored(tiny_shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ConfigError, match="fp16"):
        train(tiny_config(tmp_path, tiny_shards, "train.mixed_precision=fp16", "train.steps=2"), progress=False)


def test_training_writes_tensorboard_events_and_grids(trained_run):
    assert list(trained_run.rglob("events.out.tfevents.*"))  # Accelerate's TensorBoard tracker
    grids = sorted(p.name for p in (trained_run / "grids").iterdir())
    assert "step-00000030-samples.png" in grids and "step-00000015-reconstructions.png" in grids
    record = json.loads((trained_run / "train_log.jsonl").read_text().splitlines()[-1])
    for key in ("grad_norm", "lr", "images_per_s", "kl_dim_max", "kl_dims_active", "elbo_bpd", "skipped_steps"):
        assert key in record, key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(trained_run.rglob("events.out.tfevents.*")).parent), size_guidance={"images": 0})
    events.Reload()
    assert {"grids/samples", "grids/reconstructions"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("grids/samples")] == [15, 30]


def test_memory_stream_visits_every_image_once_per_epoch(tiny_shards):
    from pipeline.memory import MemoryStream

    stream = MemoryStream(str(tiny_shards), 8, seed=0)
    n = len(stream.keys)
    batches = stream.batches(0)
    epoch = [next(batches) for _ in range(n // 8)]
    keys = [k for ks, _ in epoch for k in ks]
    assert len(keys) == len(set(keys)) == n // 8 * 8
    assert all(b.shape == (8, 3, 16, 16) and b.dtype == torch.uint8 for _, b in epoch)
    again = stream.batches(0)
    assert [next(again)[0] for _ in range(3)] == [ks for ks, _ in epoch[:3]]  # seeded by (seed, rank, step)
    from vae_runtime.errors import BadInput

    with pytest.raises(BadInput, match=rf"gives this process {n} images, fewer than a batch \({n + 1}\)"):
        MemoryStream(str(tiny_shards), n + 1, seed=0)


def test_in_memory_training_resumes_bitwise(tiny_shards, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("data.in_memory=true", "train.steps=8", "train.checkpoint_every=4", "train.tensorboard=false")
    train(tiny_config(a, tiny_shards, *args), progress=False)
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(a / "checkpoints" / "step-00000004.pt", b / "checkpoints")
    train(tiny_config(b, tiny_shards, *args), progress=False)
    sa = load_checkpoint(a / "checkpoints" / "step-00000008.pt")["model"]
    sb = load_checkpoint(b / "checkpoints" / "step-00000008.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_gradient_accumulation_steps_like_one_large_batch(tiny_shards, tmp_path):
    """3 micro-batches of 8 update the weights as one batch of 24 does: in memory, both runs draw the same
    images (one permutation) and the same noise (one generator: three draws of [8, 4] equal one of [24, 4],
    which holds when 8 * latent_dim is a multiple of 16), so only the accumulation could differ. Free bits
    are off: they clamp the KL per micro-batch, so with them accumulation is not one large batch."""
    def weights_after(name, *overrides):
        run = tmp_path / name
        train(tiny_config(run, tiny_shards, "data.in_memory=true", "train.steps=2", "train.checkpoint_every=2",
                          *overrides), progress=False)
        state = load_checkpoint(run / "checkpoints" / "step-00000002.pt")
        return state, (run / "ranks" / "rank-0.keys").read_text().split()

    accumulated, keys_a = weights_after("accum", "data.batch_size=8", "train.grad_accum_steps=3")
    large, keys_b = weights_after("large", "data.batch_size=24")
    first_micro_only, _ = weights_after("micro", "data.batch_size=8")
    assert sorted(keys_a) == sorted(keys_b) and len(keys_a) == 48
    assert int(accumulated["images"]) == int(large["images"]) == 2 * 24
    # Adam's first steps move each weight by about lr whatever its gradient's size, so float rounding in a
    # near-zero gradient can move a stray weight by up to a step: compare whole weight vectors, against how far
    # updating from the first micro-batch alone lands (the comparison can fail)
    flat = {key: torch.cat([v.flatten().float() for v in state["model"].values()])
            for key, state in (("accum", accumulated), ("large", large), ("micro", first_micro_only))}
    off_by_accumulation = (flat["accum"] - flat["large"]).norm()
    assert off_by_accumulation <= 0.02 * (flat["micro"] - flat["large"]).norm(), off_by_accumulation


def test_sigkill_mid_training_then_rerun_ends_with_the_uninterrupted_weights(tiny_shards, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import TINY

    args = [*TINY, "train.steps=60", "train.checkpoint_every=10", "train.tensorboard=false",
            f"data.shards={tiny_shards}"]

    def cli(run, **kw):  # both runs through the same command, so thread settings match
        return subprocess.Popen([sys.executable, "-m", "vae.cli", "train", *args, f"run_dir={run}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)

    assert cli(tmp_path / "whole").wait() == 0
    killed = tmp_path / "killed"
    proc = cli(killed, start_new_session=True)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-00000020.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step-00000060.pt").exists()  # it really stopped midway
    (killed / "checkpoints" / ".step-00000030.pt.abc123.tmp").write_bytes(b"torn")  # as a kill mid-write leaves
    assert cli(killed).wait() == 0
    assert not list((killed / "checkpoints").glob(".*.tmp"))  # torn writes are cleaned up
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-00000060.pt")
    b = load_checkpoint(killed / "checkpoints" / "step-00000060.pt")
    for part in ("model", "ema", "optimizer"):
        flat_a = [t for t in tensors_of(a[part])]
        flat_b = [t for t in tensors_of(b[part])]
        assert len(flat_a) == len(flat_b) and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), part


def test_a_skipped_step_uses_up_all_its_micro_batches(tiny_shards, tmp_path):
    """A resumed run replays grad_accum_steps batches (and noise draws) per step: a step skipped at its first
    micro-batch must use up the others too, or everything after a resume shifts by a batch."""
    from vae.training.state import setup
    from vae.training.steps import Window
    from vae.training.train import open_stream

    state = setup(tiny_config(tmp_path / "accum", tiny_shards, "train.steps=10", "train.grad_accum_steps=2"))
    batches, noise = open_stream(state, None, state.progress.stream_start)
    taken = []

    def counted():
        for item in batches:
            taken.append(item[0])
            yield item

    draws_before = noise.get_state().clone()
    weight = next(state.raw_model.parameters())
    with torch.no_grad():
        weight.fill_(float("nan"))  # the first micro-batch's loss is NaN
    assert train_step(state, counted(), noise, Window(), set()).skipped
    assert len(taken) == 2
    replay = torch.Generator().set_state(draws_before)
    for _ in range(2):
        torch.randn((state.cfg.data.batch_size, state.cfg.model.latent_dim), generator=replay)
    assert torch.equal(replay.get_state(), noise.get_state())  # two noise draws, as the replay makes


def test_a_log_line_cut_short_is_dropped_on_resume(tmp_path):
    from vae_runtime.errors import BadInput
    from vae.training.state import trim_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n{"step": 30, "lo')
    trim_log(log, 20)
    assert log.read_text() == '{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n'
    log.write_text('{"step": 10}\nnot json\n{"step": 20}\n')
    with pytest.raises(BadInput, match="train_log.jsonl line 2: not JSON"):
        trim_log(log, 20)


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    import errno
    import os

    from vae.core import checkpoint as ckpt

    earlier = ckpt.save_checkpoint(tmp_path, 10, {"step": 10}, keep=3)
    before = sorted(p.name for p in earlier.parent.iterdir())

    def no_space(fd):  # how a full disk fails the write's fsync
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(TrainingError) as caught:
        ckpt.save_checkpoint(tmp_path, 20, {"step": 20}, keep=3)
    assert "step-00000020.pt: not written (No space left on device)" in str(caught.value)
    assert "free on its disk" in str(caught.value) and len(str(caught.value).splitlines()) == 1
    assert sorted(p.name for p in earlier.parent.iterdir()) == before  # no temporary file, the earlier one kept


def test_a_checkpoint_damaged_on_disk_is_refused_not_resumed_from(tmp_path):
    from vae_runtime.errors import BadInput
    from vae.core import checkpoint as ckpt

    path = ckpt.save_checkpoint(tmp_path, 10, {"model": {"w": torch.ones(4096)}, "ema": {}, "step": 10,
                                               "config": "{}"}, keep=3)
    assert ckpt.load_checkpoint(path)["step"] == 10 and path.with_name(path.name + ".sha256").is_file()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor's bytes: torch alone loads it without noticing
    path.write_bytes(bytes(data))
    with pytest.raises(BadInput, match=r"step-00000010.pt: its bytes differ from step-00000010.pt.sha256"):
        ckpt.load_checkpoint(path)
    path.with_name(path.name + ".sha256").unlink()  # a checkpoint from before digests loads as it is
    assert ckpt.load_checkpoint(path)["step"] == 10


def test_a_log_window_of_skipped_steps_says_so_in_strict_json():
    """Every step in the window skipped: no fake zeros, and no NaN (strict JSON readers refuse it)."""
    from vae.training.steps import Window

    record = Window().record(50, 3 * 16 * 16, beta=1.0, grad_norm=float("nan"), lr=1e-3, skipped_steps=50)
    assert record["loss"] is None and record["elbo_bpd"] is None and record["grad_norm"] is None
    assert json.loads(json.dumps(record, allow_nan=False))["skipped_steps"] == 50


def test_checkpoint_rotation_keeps_the_one_just_written(tmp_path):
    """A run that resumed from an earlier step (machines agreeing on the last step they all hold) writes a
    checkpoint older than one it abandoned: the new one stays, the abandoned one goes (it would be taken for
    the latest)."""
    from vae.core import checkpoint as ckpt

    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.pt", "step-00000003.pt"]
    ckpt.save_checkpoint(tmp_path, 10, {"step": 10}, keep=1)
    ckpt.save_checkpoint(tmp_path, 9, {"step": 9}, keep=1)  # resumed from 8 elsewhere, stopped at 9
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000009.pt"]


def test_a_torn_log_of_a_run_killed_before_its_first_checkpoint_is_trimmed_on_restart(tiny_shards, tmp_path):
    run = tmp_path / "torn"
    run.mkdir()
    (run / "train_log.jsonl").write_text('{"step": 50, "loss": 1.0}\n{"step": 100, "lo')  # killed mid-line
    train(tiny_config(run, tiny_shards, "train.steps=4", "train.log_every=2"), progress=False)
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # the abandoned lines are gone, the new ones whole


def test_the_time_budget_is_the_runs_not_each_launchs(tiny_shards, tmp_path):
    """train.max_seconds once restarted with every launch: a retried task trained a whole new budget. The spent
    time is checkpointed; a run resumed past its budget trains nothing and keeps its records."""
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_shards, "train.steps=100000", "train.max_seconds=1", "train.checkpoint_every=100000")
    train(cfg, progress=False)
    [first] = list_checkpoints(run)
    saved = load_checkpoint(first)
    assert saved["train_s"] >= 1.0 and 0 < saved["step"] < 100000
    keys = (run / "ranks" / "rank-0.keys").read_text()
    assert keys  # the audit of what the first launch consumed
    before = first.read_bytes()
    train(tiny_config(run, tiny_shards, "train.steps=100000", "train.max_seconds=1", "train.checkpoint_every=100000"),
          progress=False)
    assert list_checkpoints(run) == [first] and first.read_bytes() == before  # no step, nothing rewritten
    assert (run / "ranks" / "rank-0.keys").read_text() == keys  # not wiped by a launch that trained nothing
    longer = tiny_config(run, tiny_shards, "train.steps=100000", "train.max_seconds=3", "train.checkpoint_every=100000")
    train(longer, progress=False)  # a larger budget: only the time left of it
    again = load_checkpoint(list_checkpoints(run)[-1])
    assert again["step"] > saved["step"] and 3.0 <= again["train_s"] < 3.0 + (saved["train_s"] - 1.0) + 1.5


@pytest.mark.parametrize("jump_s", [30 * 86400.0, -30 * 86400.0])
def test_a_wall_clock_stepped_either_way_changes_no_budget(tiny_shards, tmp_path, monkeypatch, jump_s):
    """The budget once read the wall clock: stepped 30 days forward it ended training at once and recorded the run
    as done for good; stepped back it ignored the budget. The wall clock here jumps by `jump_s` after its first
    reading; a 1 s budget still trains about 1 s, and the checkpoint records about that."""
    import time as time_module

    real, readings = time_module.time, []

    def stepped() -> float:
        readings.append(1)
        return real() + (jump_s if len(readings) > 1 else 0.0)

    monkeypatch.setattr(time_module, "time", stepped)
    run = tmp_path / "run"
    started = time_module.monotonic()
    train(tiny_config(run, tiny_shards, "train.steps=100000", "train.max_seconds=1", "train.checkpoint_every=100000"),
          progress=False)
    took = time_module.monotonic() - started
    saved = load_checkpoint(list_checkpoints(run)[-1])
    assert 1.0 <= saved["train_s"] < 1.0 + 5.0 and saved["step"] > 1 and took < 60


def test_progress_reads_older_checkpoints_and_refuses_damaged_ones():
    """A checkpoint from before a field existed reads it as its default (stream_start: the step, as a run then
    resumed from its checkpoint's step); a damaged one is one line naming the field."""
    from vae_runtime.errors import BadInput
    from vae.training.progress import Progress

    old = Progress.from_checkpoint({"step": 40, "images": 640, "skipped": 1}, "ckpt")
    assert (old.step, old.images, old.skipped, old.skipped_outliers, old.stream_start, old.earlier_s) == (
        40, 640, 1, 0, 40, 0.0)
    back = Progress.from_checkpoint({**old.to_checkpoint(), "train_s": 12.5}, "ckpt")
    assert back.step == 40 and 12.5 <= back.train_s() < 13.5
    for key, value in [("step", -1), ("images", "12"), ("train_s", float("nan")), ("train_s", -3.0)]:
        with pytest.raises(BadInput, match=f"ckpt: {key} is"):
            Progress.from_checkpoint({"step": 4, key: value}, "ckpt")


def test_a_resume_on_shards_preprocessed_otherwise_is_refused(tiny_shards, synth_source, tmp_path):
    """data.shards may move on resume; the images may not change what they are (a crop-148 run once resumed on
    crop-0 shards silently, and its card then claimed crop 0)."""
    from vae_runtime.errors import BadInput
    from pipeline.shard import shard

    run = tmp_path / "run"
    train(tiny_config(run, tiny_shards, "train.steps=4", "train.checkpoint_every=2"), progress=False)
    shard(synth_source, tmp_path / "crop0", size=16, crop=0, maxcount=60, progress=False)
    with pytest.raises(BadInput, match=r"preprocessed with crop 0; the run trained on crop 148"):
        train(tiny_config(run, tmp_path / "crop0", "train.steps=6", "train.checkpoint_every=2"), progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_shards, moved)  # the same shards elsewhere: fine
    train(tiny_config(run, moved, "train.steps=6", "train.checkpoint_every=2"), progress=False)
    assert load_checkpoint(list_checkpoints(run)[-1])["step"] == 6


def test_a_sigterm_before_the_first_step_still_records_where_the_rank_stopped(tiny_shards, tmp_path, monkeypatch):
    """vae train reads the rank records to say whether every rank stopped at the checkpoint; a record left from an
    earlier launch made it report the opposite."""
    from vae.training import train as train_module

    run = tmp_path / "run"
    train(tiny_config(run, tiny_shards, "train.steps=4", "train.checkpoint_every=2"), progress=False)
    record = run / "ranks" / "rank-0.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "step": 2}))  # as a killed launch left it

    class RaisedAtOnce(train_module.SigtermFlag):
        def __init__(self):
            super().__init__()
            self.raised = True

    monkeypatch.setattr(train_module, "SigtermFlag", RaisedAtOnce)
    with pytest.raises(train_module.Preempted):
        train(tiny_config(run, tiny_shards, "train.steps=8", "train.checkpoint_every=2"), progress=False)
    assert json.loads(record.read_text())["step"] == 4


def test_fewer_train_shards_than_processes_is_said_not_silent(tiny_shards):
    from vae.training.state import overlap_note

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    count = len(manifest["splits"]["train"]["shards"])
    assert overlap_note("s", manifest, count) is None and overlap_note("s", manifest, 1) is None
    note = overlap_note("s", manifest, count + 1)
    assert f"hold {count} train shards for {count + 1} processes" in note and "--maxcount" in note
