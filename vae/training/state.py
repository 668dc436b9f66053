"""A training run's state and its two ends: `setup` (build, check and resume) and `save_checkpoint`.

`TrainState` holds what the loop and its steps share: the Accelerator, the prepared model and optimizer, the
scheduler, the EMA, and the run's `Progress` (steps, images, skipped steps, noise position, training time),
checkpointed with the weights so that a resume is one call. Everything that can refuse a run (image size, a changed config on resume,
a warm start from another architecture) is checked before anything is written.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from vae_runtime.atomic import atomic_write_text
from vae_runtime.errors import BadInput, ConfigError, TrainingError
from pipeline.manifest import require_image_size
from vae.core import checkpoint as ckpt
from vae.core import hardware
from vae.core.config import Config, config_hash, config_to_dict
from vae.core.keys import flat
from vae.core.run import Run, checkpoint_dir, checkpoint_name, checkpoint_step, latest_checkpoint
from vae.models import build_model
from vae.training import trackers
from vae.training.ema import EMA
from vae.training.progress import Progress


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_accelerator(cfg: Config, run_dir: Path, tracker_names: list[str]) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not on_gpu:
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU; on CPU use bf16 or no")
    if cfg.train.mixed_precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'train.mixed_precision': this GPU has no bf16; use fp16")
    # fp16 gets Accelerate's GradScaler; parameters stay float32 under autocast in every mode.
    # A lost machine ends every collective after collective_timeout_s instead of the backend's default minutes.
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.train.collective_timeout_s))
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=cfg.train.mixed_precision,
                              log_with=tracker_names or None,
                              project_dir=str(run_dir), kwargs_handlers=[timeout])
    if accelerator.is_main_process:
        warn_slow_bf16(cfg.train.mixed_precision, on_gpu)
    return accelerator


def slow_bf16_note(precision: str, on_gpu: bool, cpuinfo: str | None = None) -> str | None:
    """A warning when bf16 autocast is asked of a CPU whose flags show neither AMX-BF16 nor AVX512-BF16 (it then
    emulates bf16 and is slower than float32); None otherwise, and where the flags cannot be read (not x86)."""
    if precision != "bf16" or on_gpu:
        return None
    units = hardware.cpu_bf16_units(hardware.read_cpuinfo() if cpuinfo is None else cpuinfo)
    if units is None or units:
        return None
    return ("vae train: warning: train.mixed_precision=bf16 on a CPU without bf16 units (neither amx_bf16 nor "
            "avx512_bf16 in /proc/cpuinfo): it runs, but slower than float32 here")


def warn_slow_bf16(precision: str, on_gpu: bool) -> None:
    note = slow_bf16_note(precision, on_gpu)
    if note:
        print(note, file=sys.stderr)


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    """AdamW (the default), or Adamax (NVAE trains with it: its second moment is a decaying maximum of |gradient|,
    so one large gradient shrinks the following updates rather than pushing them). torch's default betas and eps in
    both; Adamax's weight_decay is an L2 term added to the gradient, AdamW's is decoupled."""
    if cfg.train.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


@dataclass
class TrainState:
    cfg: Config
    run_dir: Path
    accelerator: Accelerator
    model: torch.nn.Module  # prepared (DDP-wrapped with several processes)
    raw_model: torch.nn.Module
    forward: torch.nn.Module  # the model, compiled when train.compile is set
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA
    progress: Progress = field(default_factory=Progress)
    nonfinite_in_a_row: int = 0
    preprocessing: dict | None = None  # the shards' (recorded in checkpoints: a resume must use shards made alike)
    overflows_in_a_row: int = 0  # fp16 steps the loss scaler skipped, in a row
    trackers: list[str] = field(default_factory=list)  # the experiment trackers it logs to (`trackers.py`)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def overlap_note(shards: str, manifest: dict, processes: int) -> str | None:
    """A warning when there are fewer train shards than processes: each process then resamples all of them, and
    their data overlap (with as many shards as processes, each takes its own)."""
    count = len((manifest.get("splits", {}).get("train") or {}).get("shards") or [])
    if processes <= count:
        return None
    return (f"vae train: warning: shards {shards} hold {count} train shards for {processes} processes, so every "
            "process samples all of them and their data overlap; re-shard with a smaller --maxcount for disjoint "
            "subsets")


def setup(cfg: Config) -> TrainState:
    """Checks, then the model, optimizer, scheduler and EMA: fresh, warm-started or resumed from the run's latest
    checkpoint; prepared with Accelerate (the data loaders never are: they are already split by rank)."""
    run_dir = Path(cfg.run_dir)
    tracker_names = trackers.resolve(cfg.train.trackers, cfg.train.tensorboard)  # one line if one is missing
    accelerator = make_accelerator(cfg, run_dir, tracker_names)
    manifest = require_image_size(cfg.data.shards, cfg.model.image_size)
    preprocessing = manifest.get("preprocessing")
    note = overlap_note(cfg.data.shards, manifest, accelerator.num_processes)
    if note and accelerator.is_main_process:
        print(note, file=sys.stderr)
    step = agreed_step(accelerator, run_dir)
    run = Run(run_dir, step)
    resume, saved = (run.checkpoint, run.state) if step is not None else (None, None)
    if saved is not None:
        ckpt.check_resume(resume, saved, cfg)
        ckpt.check_resume_shards(resume, saved, cfg, preprocessing)
    warm = ckpt.warm_start_weights(cfg) if saved is None else None
    if accelerator.is_local_main_process:  # every machine keeps its own run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        run.remove_torn_writes()
        run.write_config(cfg)

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    if warm is not None:  # a new run from another run's EMA weights (the champion's); the EMA starts there too
        model.load_state_dict(warm["ema"])
        if accelerator.is_main_process:
            print(f"starting {run_dir} from the EMA weights of {warm['checkpoint']} (step {warm['step']})",
                  file=sys.stderr)
    optimizer = make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.train.warmup_steps, cfg.train.steps))
    ema = EMA(model, cfg.train.ema_decay)
    progress = Progress()
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        ema.load_state_dict(saved["ema"])
        progress = Progress.from_checkpoint(saved, str(resume))
        if accelerator.is_main_process:
            print(f"resuming {run_dir} from {resume.name} (step {progress.step})", file=sys.stderr)
    if accelerator.is_main_process:  # lines past the step this run starts at (from scratch: all) were abandoned
        trim_log(run_dir / "train_log.jsonl", progress.step)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The scheduler is stepped by hand: a prepared one steps once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    if saved is not None and accelerator.scaler is not None and "scaler" in saved:
        accelerator.scaler.load_state_dict(saved["scaler"])
    raw_model = accelerator.unwrap_model(model)
    forward = torch.compile(model) if cfg.train.compile else model
    if accelerator.is_main_process:
        accelerator.init_trackers("train", config=trackers.parameters(flat(config_to_dict(cfg)), config_hash(cfg)),
                                  init_kwargs=trackers.init_kwargs(tracker_names, run_dir))
    return TrainState(cfg, run_dir, accelerator, model, raw_model, forward, optimizer, scheduler, ema, progress,
                      preprocessing=preprocessing, trackers=tracker_names)


def agreed_step(accelerator: Accelerator, run_dir: Path) -> int | None:
    """The checkpoint step every machine resumes from: the newest step that all of them hold (each machine keeps
    its own run folder, and a machine lost mid-write may be a checkpoint behind). None: a fresh start everywhere."""
    latest = latest_checkpoint(run_dir)
    here = checkpoint_step(latest) if latest is not None else 0
    if accelerator.num_processes == 1:
        return here or None
    steps = accelerator.gather(torch.tensor([here], device=accelerator.device)).tolist()
    agreed = min(steps)
    if agreed and not (checkpoint_dir(run_dir) / checkpoint_name(agreed)).is_file():
        raise BadInput(f"run {run_dir}: the machines' newest common checkpoint is step {agreed} (they hold "
                       f"{sorted(set(steps))}), and this machine no longer has it; restore it or start a new run_dir")
    return agreed or None


def save_checkpoint(state: TrainState) -> None:
    """A checkpoint of the step just done (written by each machine's first process into that machine's run
    folder), after checking the weights are finite on every rank (DDP keeps them identical, so every rank reaches
    the same verdict)."""
    state.accelerator.wait_for_everyone()
    tensors = [*state.raw_model.parameters(), *state.ema.state_dict().values()]
    if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
        raise TrainingError(f"training stopped at step {state.progress.step}: the weights are no longer finite; "
                            f"the last good checkpoint is kept in {state.run_dir / 'checkpoints'}")
    if state.accelerator.is_local_main_process:
        saved = {"model": state.raw_model.state_dict(), "ema": state.ema.state_dict(),
                 "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                 "config": ckpt.config_json(state.cfg), **state.progress.to_checkpoint(),
                 "preprocessing": state.preprocessing}
        if state.accelerator.scaler is not None:
            saved["scaler"] = state.accelerator.scaler.state_dict()
        ckpt.save_checkpoint(state.run_dir, state.progress.step, saved, state.cfg.train.keep_checkpoints)
    state.accelerator.wait_for_everyone()


def trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after `step` (logged before a kill, then trained again on resume)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            if number == len(lines):  # a last line cut short by a kill or a full disk: dropped, re-logged later
                continue
            raise BadInput(f"{path} line {number}: not JSON (the log was edited or damaged); repair or remove "
                           "that line to resume") from None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
