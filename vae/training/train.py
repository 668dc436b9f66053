"""Training with Hugging Face Accelerate: one process, several, or several nodes.

The loop below reads top to bottom: set up (build, check, resume: `state.py`), then segments of
`checkpoint_every` steps, each a stream of batches and noise seeded from (seed, rank, segment start), each step
one `train_step` (`steps.py`), then logging, the stop check and a checkpoint at the segment's end. A checkpoint
written inside a segment (SIGTERM, time budget) records where its stream started, and a resume replays the
stream to that step, so a resumed run ends with the weights of an uninterrupted one (bitwise on the CPU).
Launch with several processes through `vae train --num-processes N` (accelerate launch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import folder_lock
from vae_runtime.atomic import atomic_write_json, atomic_write_text
from vae_runtime.errors import BadInput, VaeError, one_line
from vae_runtime.grid import label, make_grid, write_png
from vae_runtime.limits import read_file
from pipeline.loader import train_loader
from pipeline.memory import MemoryStream, stream_seed
from vae.core.checkpoint import weights_digest
from vae.core.config import Config, config_from_dict, load_config
from vae.core.distributed import end_process_group
from vae.models import build_model
from vae.core.objectives import image_dims, to_unit
from vae.training.state import TrainState, save_checkpoint, setup
from vae.training import trackers
from vae.training.steps import StepResult, Window, micro_batch_draws, train_step

OUT_OF_TIME, PREEMPTED = 1.0, 2.0


def train(cfg: Config, progress: bool = True, wait_s: float = 0.0) -> Path:
    """Train (or resume) the run in `cfg.run_dir`, holding the run folder's lock from before anything in it is
    read (another process training it is refused, or waited for up to `wait_s` seconds); returns the run folder."""
    with run_folder_lock(cfg.run_dir, wait_s):
        return train_held(cfg, progress)


def run_folder_lock(run_dir: str | Path, wait_s: float = 0.0):
    """The run folder's lock (`common.folder_lock`), taken by one process per machine: a single process, the
    `vae train` launcher of several (its ranks inherit it), or the first rank of a direct `accelerate launch`
    (LOCAL_RANK 0; the machine's other ranks wait for it in the process group's rendezvous)."""
    if int(os.environ.get("LOCAL_RANK") or 0) > 0:
        return contextlib.nullcontext()
    return folder_lock.hold(run_dir, "run folder", wait_s)


def train_held(cfg: Config, progress: bool = True) -> Path:
    """`train` once the run folder's lock is held."""
    state = setup(cfg)
    memory = MemoryStream(cfg.data.shards, cfg.data.batch_size, cfg.train.seed, state.rank, state.world,
                          state.accelerator.device) if cfg.data.in_memory else None
    so_far = state.progress
    bar = tqdm(total=cfg.train.steps, initial=so_far.step, disable=not (state.main and progress),
               desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
    sigterm, first_step = SigtermFlag(), so_far.step
    so_far.start_launch()  # train.max_seconds is the run's budget, resumes included
    window, seen, grid_images = Window(), set(), None  # seen: keys this rank consumed (an audit)
    stop = stop_signal(state, sigterm)  # a run resumed past its time budget stays done
    state.model.train()
    try:
        while so_far.step < cfg.train.steps and not stop:
            segment_start = so_far.stream_start
            segment_end = min(cfg.train.steps, (segment_start // cfg.train.checkpoint_every + 1)
                              * cfg.train.checkpoint_every)
            batches, noise = open_stream(state, memory, segment_start)
            while so_far.step < segment_end:
                result = train_step(state, batches, noise, window, seen)
                if grid_images is None and result.first_images is not None:
                    grid_images = result.first_images[:8].clone()
                bar.update(1)
                window = log_if_due(state, window, result, bar)
                stop = stop_signal(state, sigterm)
                if stop:
                    break
                write_grids_if_due(state, grid_images)
            so_far.stream_start = segment_start if so_far.step < segment_end else so_far.step
            save_checkpoint(state)
    finally:
        bar.close()  # a newline after the bar, before any error line
        sigterm.restore()
    if so_far.step > first_step or stop == PREEMPTED:  # a launch that trained nothing keeps the record
        write_rank_record(state.run_dir, state.raw_model, state.rank, state.world, so_far.step, seen)
    if stop == OUT_OF_TIME and so_far.step == first_step and state.main:
        print(f"{state.run_dir}: train.max_seconds ({cfg.train.max_seconds:g} s) was spent by step {first_step}: "
              "nothing more to train (raise it to train on)", file=sys.stderr)
    state.accelerator.wait_for_everyone()
    state.accelerator.end_training()
    if stop == PREEMPTED:
        raise Preempted(f"stopped by SIGTERM at step {so_far.step} with a checkpoint; run the same "
                        "command again to resume")
    return state.run_dir


def open_stream(state: TrainState, memory: MemoryStream | None, start_step: int):
    """(batches, noise) seeded from (seed, rank, start_step), advanced to the run's current step: a run resumed
    inside a segment replays what the checkpoint's steps consumed (batches, posterior noise and flips)."""
    cfg = state.cfg
    noise = torch.Generator(device="cpu").manual_seed(stream_seed(cfg.train.seed, state.rank, start_step))
    if memory is not None:
        batches = memory.batches(start_step)
    else:
        batches = iter(train_loader(cfg.data.shards, cfg.data.batch_size, cfg.train.seed, state.rank, state.world,
                                    start_step, cfg.data.num_workers, cfg.data.shuffle_buffer))
    for _ in range((state.progress.step - start_step) * cfg.train.grad_accum_steps):
        next(batches)
        micro_batch_draws(noise, cfg.data.batch_size, cfg)
    return batches, noise


def log_if_due(state: TrainState, window: Window, result: StepResult, bar) -> Window:
    """Every `log_every` steps (and at the last): one line of `train_log.jsonl`, the trackers, the progress bar;
    returns the window to keep summing into."""
    cfg, done = state.cfg, state.progress.step
    if done % cfg.train.log_every and done != cfg.train.steps:
        return window
    record = window.record(done, image_dims(cfg.model.image_size), beta=result.beta, grad_norm=result.grad_norm,
                           lr=state.scheduler.get_last_lr()[0], skipped_steps=state.progress.skipped,
                           skipped_outliers=state.progress.skipped_outliers)
    if state.main:
        with open(state.run_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        state.accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=done)
        if record["elbo_bpd"] is not None:
            bar.set_postfix(bpd=f"{record['elbo_bpd']:.3f}", img_s=f"{record['images_per_s']:.0f}")
    return Window()


def stop_signal(state: TrainState, sigterm: "SigtermFlag") -> float:
    """PREEMPTED (a SIGTERM on any rank), OUT_OF_TIME (the run's training time, on the main process's clock, past
    train.max_seconds) or 0; the same on every rank, so all stop at the same step."""
    cfg = state.cfg
    late = bool(cfg.train.max_seconds) and state.main and state.progress.train_s() > cfg.train.max_seconds
    stop = PREEMPTED if sigterm.raised else (OUT_OF_TIME if late else 0.0)
    if state.world > 1:
        stop = state.accelerator.gather(torch.tensor([stop], device=state.accelerator.device)).max().item()
    return stop


def write_grids_if_due(state: TrainState, images: torch.Tensor | None) -> None:
    cfg, done = state.cfg, state.progress.step
    every = cfg.train.grids_every or cfg.train.checkpoint_every
    if state.main and (done % every == 0 or done == cfg.train.steps):
        grids = write_training_grids(state.run_dir, cfg, state.ema, images, done)
        files = {name: state.run_dir / "grids" / f"step-{done:08d}-{name}.png" for name in grids}
        trackers.log_grids(state.accelerator, state.trackers, grids, files, done)


@torch.no_grad()
def write_training_grids(run_dir: Path, cfg: Config, ema, x: torch.Tensor | None, step: int) -> dict:
    """`grids/step-N-samples.png` (fixed prior draws scaled by each of eval.temperatures, one labelled block
    each, so steps and temperatures compare at a glance) and `-reconstructions.png`, with the EMA weights;
    returns the grids (uint8 HWC) by name."""
    model = build_model(cfg.model)
    model.load_state_dict(ema.state_dict())
    model.eval()
    z = torch.randn((32, cfg.model.latent_dim), generator=torch.Generator().manual_seed(cfg.train.seed))
    blocks = [label(make_grid(model.decode_mean(z * t).numpy(), 8), f"temperature {t:g}")
              for t in cfg.eval.temperatures]
    grids = {"samples": np.concatenate(blocks, axis=0)}
    if x is not None:
        x = x.cpu()
        recon = model.decode_mean(model.encode(to_unit(x))[0])
        grids["reconstructions"] = make_grid(torch.stack([to_unit(x), recon], 1).flatten(0, 1).numpy(), 8)
    for name, grid in grids.items():
        write_png(run_dir / "grids" / f"step-{step:08d}-{name}.png", grid)
    return grids


class Preempted(VaeError):
    """SIGTERM stopped training after a checkpoint (exit code 143, as for a process ended by SIGTERM)."""

    exit_code = 143


class SigtermFlag:
    """Turns SIGTERM (Kubernetes, spot instances, `accelerate launch` passing it on) into a flag the loop reads
    after each step, so training stops at a step boundary with a checkpoint instead of dying mid-write."""

    def __init__(self):
        self.raised = False
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a test harness): no handler, never raised
            self.previous = None

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def write_rank_record(run_dir: Path, model: torch.nn.Module, rank: int, world: int, step: int,
                      seen: set[str]) -> None:
    """`ranks/rank-R.json` (parameter digest, world size) and `rank-R.keys`: what each rank ended with, and the keys
    it consumed in its last launch that trained."""
    folder = run_dir / "ranks"
    atomic_write_json(folder / f"rank-{rank}.json", {"rank": rank, "world_size": world, "step": step,
                                                     "params_sha256": weights_digest(model), "keys_seen": len(seen)})
    atomic_write_text(folder / f"rank-{rank}.keys", "".join(f"{k}\n" for k in sorted(seen)))


def launched_config(argv: list[str]) -> Config:
    """The run config of a launched process: `--config RUN.yaml [key=value ...]`, as `vae train` takes it (a direct
    `accelerate launch --config_file FILE -m vae.training.train --config RUN.yaml ...`, as Accelerate's docs
    teach), or the one JSON file `vae train --num-processes N` writes for its ranks."""
    parser = argparse.ArgumentParser(prog="accelerate launch -m vae.training.train")
    parser.add_argument("--config", default=None, help="the run's YAML config, as `vae train --config`")
    parser.add_argument("rest", nargs="*", help="key=value overrides (with --config), else the launcher's JSON")
    args = parser.parse_args(argv)
    if args.config is not None:
        return load_config(args.config, args.rest)
    if len(args.rest) != 1:
        raise BadInput("expected --config RUN.yaml [key=value ...] (or the JSON file `vae train` writes)")
    return config_from_dict(json.loads(read_file(args.rest[0], "json")))


def main(argv: list[str] | None = None) -> None:
    """Entry point for `accelerate launch -m vae.training.train --config RUN.yaml [key=value ...]`, and for the
    ranks `vae train --num-processes N` starts (with the JSON config it writes)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rank = os.environ.get("RANK", "?")
    try:
        cfg = launched_config(sys.argv[1:] if argv is None else argv)
    except BadInput as err:  # every rank reads the same config: each says so, none starts a process group
        print(f"vae: error: rank {rank}: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        train(cfg)
    except Preempted as stopped:
        print(f"vae train: {stopped}", file=sys.stderr)
        end_process_group()
        sys.exit(Preempted.exit_code)
    except BadInput as err:
        print(f"vae: error: rank {rank}: {err}", file=sys.stderr, flush=True)
        os._exit(2)  # the other ranks may be waiting in a collective: leave without tearing the group down
    except VaeError as err:
        print(f"vae: failed: rank {rank}: {err}", file=sys.stderr, flush=True)
        os._exit(1)
    except RuntimeError as err:  # a lost peer: gloo and NCCL raise RuntimeError subclasses
        if not lost_peer(err):
            raise
        first = re.sub(r"^(\w+: )\[[^\]]*\]\s*", r"\1", one_line(err))[:160]  # without gloo's [file:line]
        print(f"vae: failed: rank {rank} lost contact with the other processes ({first}); every machine keeps its "
              f"last checkpoint in {cfg.run_dir}: start all of them again to resume", file=sys.stderr, flush=True)
        os._exit(1)
    end_process_group()


def lost_peer(err: BaseException) -> bool:
    """Whether an error is the process group failing (a peer died, hung past the timeout, or the network broke)."""
    import torch.distributed  # the launched entry point's own

    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err)
    return any(marker in text for marker in ("Connection closed by peer", "Connection reset", "Broken pipe",
                                             "gloo", "NCCL", "Timed out", "timed out", "TCPStore"))


if __name__ == "__main__":
    main()
