"""Training with Hugging Face Accelerate: one process, several, or several nodes.

The loop reads top to bottom: build, resume, then segments of `checkpoint_every` steps. Each segment starts
its data stream and its noise generator from (seed, rank, segment start), so a run resumed from a
checkpoint replays exactly what an uninterrupted run would have done (same weights on CPU, bitwise).
Launch with several processes through `vae train --num-processes N` (accelerate launch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.loader import train_loader
from pipeline.manifest import require_image_size
from pipeline.memory import MemoryStream, stream_seed
from common.atomic import atomic_write_json, atomic_write_text
from vae.checkpoint import (check_resume, config_json, latest_checkpoint, load_checkpoint, remove_torn_writes,
                            save_checkpoint, warm_start_weights)
from vae.config import Config, config_hash, config_to_dict
from vae.training.ema import EMA
from common.errors import ConfigError, TrainingError, VaeError
from common.grid import make_grid, write_png
from vae.models import build_model
from vae.objectives import beta_at, bits_per_dim, elbo_terms, to_unit, training_loss


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_accelerator(cfg: Config, run_dir: Path) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not on_gpu:
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU; on CPU use bf16 or no")
    if cfg.train.mixed_precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'train.mixed_precision': this GPU has no bf16; use fp16")
    log_with = None
    if cfg.train.tensorboard:
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            print("tensorboard is not installed: logging to train_log.jsonl only", file=sys.stderr)
    # fp16 gets Accelerate's GradScaler; parameters stay float32 under autocast in every mode.
    return Accelerator(cpu=not on_gpu, mixed_precision=cfg.train.mixed_precision, log_with=log_with,
                       project_dir=str(run_dir))


class Window:
    """Running sums between two log lines."""

    def __init__(self):
        self.sums = {"loss": 0.0, "elbo": 0.0, "recon": 0.0, "kl": 0.0}
        self.kl_dims = None
        self.n, self.images, self.start = 0, 0, time.time()

    def add(self, loss: torch.Tensor, terms: dict) -> None:
        self.sums["loss"] += loss.item()
        for key in ("elbo", "recon", "kl"):
            self.sums[key] += terms[key].mean().item()
        kl_dims = terms["kl_dims"].detach().mean(0).cpu()
        self.kl_dims = kl_dims if self.kl_dims is None else self.kl_dims + kl_dims
        self.n += 1

    def record(self, step: int, dims: int, **extra) -> dict:
        n = max(1, self.n)
        mean = {k: v / n for k, v in self.sums.items()}
        kl_dims = self.kl_dims / n if self.kl_dims is not None else torch.zeros(1)
        return {"step": step, "loss": mean["loss"], "elbo_nats": mean["elbo"], "recon_nats": mean["recon"],
                "kl_nats": mean["kl"], "elbo_bpd": bits_per_dim(mean["elbo"], dims),
                "kl_dim_max": float(kl_dims.max()), "kl_dim_median": float(kl_dims.median()),
                "kl_dims_active": int((kl_dims > 0.01).sum()),
                "images_per_s": self.images / max(1e-9, time.time() - self.start), **extra}


def train(cfg: Config, progress: bool = True) -> Path:
    """Train (or resume) the run in `cfg.run_dir`; returns the run folder."""
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(cfg, run_dir)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    require_image_size(cfg.data.shards, cfg.model.image_size)
    resume = latest_checkpoint(run_dir)
    state = load_checkpoint(resume) if resume is not None else None
    if state is not None:
        check_resume(resume, state, cfg)  # before anything is written
    warm = warm_start_weights(cfg) if state is None else None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_torn_writes(run_dir)
        atomic_write_json(run_dir / "config.json",
                          {"config": config_to_dict(cfg), "config_hash": config_hash(cfg)})

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    if warm is not None:  # a new run from another run's EMA weights (e.g. the champion's); the EMA starts there too
        model.load_state_dict(warm["ema"])
        if main:
            print(f"starting {run_dir} from the EMA weights of {warm['checkpoint']} (step {warm['step']})",
                  file=sys.stderr)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.train.warmup_steps, cfg.train.steps))
    ema = EMA(model, cfg.train.ema_decay)
    counters = {"step": 0, "skipped": 0, "images": 0}

    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        counters = {k: int(state[k]) for k in counters}
        if main:
            print(f"resuming {run_dir} from {resume.name} (step {counters['step']})", file=sys.stderr)
            trim_log(run_dir / "train_log.jsonl", counters["step"])
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The scheduler is stepped by hand: a prepared one steps once per process. The data loaders are
    # never prepared: they are already split by rank.
    model, optimizer = accelerator.prepare(model, optimizer)
    if state is not None and accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    raw_model = accelerator.unwrap_model(model)
    forward = torch.compile(model) if cfg.train.compile else model
    likelihood = raw_model.likelihood
    dims = 3 * cfg.model.image_size ** 2
    accum = cfg.train.grad_accum_steps
    if main:
        accelerator.init_trackers("train")
    memory = MemoryStream(cfg.data.shards, cfg.data.batch_size, cfg.train.seed, rank, world, device) \
        if cfg.data.in_memory else None

    def batches_from(start_step: int):
        if memory is not None:
            return memory.batches(start_step)
        return iter(train_loader(cfg.data.shards, cfg.data.batch_size, cfg.train.seed, rank, world, start_step,
                                 cfg.data.num_workers, cfg.data.shuffle_buffer))

    def checkpoint(stream_start: int) -> None:
        accelerator.wait_for_everyone()
        # DDP keeps the weights identical on every rank, so every rank reaches the same verdict
        if not all(bool(torch.isfinite(t).all()) for t in [*raw_model.parameters(), *ema.state_dict().values()]
                   if t.is_floating_point()):
            raise TrainingError(f"training stopped at step {counters['step']}: the weights are no longer finite; the "
                                f"last good checkpoint is kept in {run_dir / 'checkpoints'}")
        if main:
            state = {"model": raw_model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "config": config_json(cfg), "stream_start": stream_start, **counters}
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            save_checkpoint(run_dir, counters["step"], state, cfg.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    bar = tqdm(total=cfg.train.steps, initial=counters["step"], disable=not (main and progress),
               desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
    nonfinite_in_a_row = 0
    seen: set[str] = set()  # keys this rank consumed in this process (audit of the data split)
    window = Window()
    grid_x = None
    started = time.time()
    stop = False  # out of time, or preempted: every rank stops at the same step
    sigterm = SigtermFlag()
    # A stream (data and noise) starts at a segment's first step; a checkpoint written inside a segment (SIGTERM,
    # time budget) records where its stream started, and the resume replays the stream up to the checkpoint.
    stream_start = int(state.get("stream_start", counters["step"])) if state is not None else 0
    model.train()
    while counters["step"] < cfg.train.steps and not stop:
        segment_start = stream_start
        segment_end = min(cfg.train.steps, (segment_start // cfg.train.checkpoint_every + 1)
                          * cfg.train.checkpoint_every)
        noise = torch.Generator(device="cpu").manual_seed(stream_seed(cfg.train.seed, rank, segment_start))
        batches = batches_from(segment_start)
        for _ in range((counters["step"] - segment_start) * accum):  # what the checkpoint's steps consumed
            next(batches)
            torch.randn((cfg.data.batch_size, cfg.model.latent_dim), generator=noise)
        while counters["step"] < segment_end:
            step = counters["step"]
            beta = beta_at(step, cfg.objective.beta, cfg.objective.kl_warmup_steps)
            finite, loss, terms = True, None, None
            for micro in range(accum):
                keys, batch = next(batches)
                seen.update(keys)
                x = batch.to(device, non_blocking=True)
                if grid_x is None:
                    grid_x = x[:8].clone()
                if cfg.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                eps = torch.randn((x.shape[0], cfg.model.latent_dim), generator=noise).to(device)
                with accelerator.autocast():
                    terms = elbo_terms(forward, x, eps, likelihood)
                loss = training_loss(terms, beta, cfg.objective.free_bits)
                # Every rank must agree to skip, or DDP would wait forever for the others' gradients.
                finite = accelerator.gather(torch.isfinite(loss).float().reshape(1)).min().item() > 0
                if not finite:
                    break
                if micro < accum - 1 and world > 1:
                    with accelerator.no_sync(model):
                        accelerator.backward(loss / accum)
                else:
                    accelerator.backward(loss / accum)
                window.images += x.shape[0] * world
            grad_norm = float("nan")
            if finite:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
                finite = math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                nonfinite_in_a_row = 0
                window.add(loss, terms)
            else:
                counters["skipped"] += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    raise TrainingError(
                        f"training stopped at step {step}: {nonfinite_in_a_row} non-finite losses or gradients "
                        f"in a row; the last good checkpoint is kept in {run_dir / 'checkpoints'}")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update(raw_model, step)
            counters["step"] = step + 1
            counters["images"] += cfg.data.batch_size * accum * world
            bar.update(1)
            done = counters["step"]
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                record = window.record(done, dims, beta=beta, grad_norm=grad_norm, lr=scheduler.get_last_lr()[0],
                                       skipped_steps=counters["skipped"])
                if main:
                    with open(run_dir / "train_log.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
                    bar.set_postfix(bpd=f"{record['elbo_bpd']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                window = Window()
            # Every rank must stop at the same step: the main process's clock and any rank's SIGTERM decide for all.
            late = bool(cfg.train.max_seconds) and main and time.time() - started > cfg.train.max_seconds
            stop = 2.0 if sigterm.raised else float(late)  # 2: preempted, 1: out of time
            if world > 1:
                stop = accelerator.gather(torch.tensor([stop], device=device)).max().item()
            if stop:
                break
            grids_every = cfg.train.grids_every or cfg.train.checkpoint_every
            if main and (done % grids_every == 0 or done == cfg.train.steps):
                write_training_grids(run_dir, cfg, ema, grid_x, done)
        stream_start = segment_start if counters["step"] < segment_end else counters["step"]
        checkpoint(stream_start)
    bar.close()
    sigterm.restore()
    write_rank_record(run_dir, raw_model, rank, world, counters["step"], seen)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stop == 2.0:
        raise Preempted(f"stopped by SIGTERM at step {counters['step']} with a checkpoint; run the same command "
                        "again to resume")
    return run_dir


def trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after `step` (logged before a kill, then trained again on resume)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


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


@torch.no_grad()
def write_training_grids(run_dir: Path, cfg: Config, ema: EMA, x: torch.Tensor | None, step: int) -> None:
    """`grids/step-N-samples.png` (fixed prior draws) and `-reconstructions.png`, with the EMA weights."""
    model = build_model(cfg.model)
    model.load_state_dict(ema.state_dict())
    model.eval()
    z = torch.randn((32, cfg.model.latent_dim), generator=torch.Generator().manual_seed(cfg.train.seed))
    write_png(run_dir / "grids" / f"step-{step:08d}-samples.png", make_grid(model.decode_mean(z).numpy(), 8))
    if x is not None:
        x = x.cpu()
        recon = model.decode_mean(model.encode(to_unit(x))[0])
        pairs = torch.stack([to_unit(x), recon], 1).flatten(0, 1)
        write_png(run_dir / "grids" / f"step-{step:08d}-reconstructions.png", make_grid(pairs.numpy(), 8))


def write_rank_record(run_dir: Path, model: torch.nn.Module, rank: int, world: int, step: int,
                      seen: set[str]) -> None:
    """`ranks/rank-R.json` (parameter digest, world size) and `rank-R.keys`: what each rank ended with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    folder = run_dir / "ranks"
    atomic_write_json(folder / f"rank-{rank}.json", {"rank": rank, "world_size": world, "step": step,
                                                     "params_sha256": digest.hexdigest(), "keys_seen": len(seen)})
    atomic_write_text(folder / f"rank-{rank}.keys", "".join(f"{k}\n" for k in sorted(seen)))


def main() -> None:
    """Entry point for `accelerate launch -m vae.train CONFIG_JSON` (used by `vae train` for N > 1)."""
    from vae.config import config_from_dict

    from vae.distributed import end_process_group

    cfg = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        train(cfg)
    except Preempted as stopped:
        print(f"vae train: {stopped}", file=sys.stderr)
        end_process_group()
        sys.exit(Preempted.exit_code)
    end_process_group()


if __name__ == "__main__":
    main()
