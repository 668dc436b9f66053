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
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pipeline.loader import train_loader
from vae.atomic import atomic_write_json, atomic_write_text
from vae.checkpoint import config_json, latest_checkpoint, load_checkpoint, save_checkpoint
from vae.config import Config, config_hash, config_to_dict
from vae.errors import ConfigError, TrainingError
from vae.model import build_model
from vae.objectives import beta_at, bits_per_dim, elbo_terms, training_loss


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def stream_seed(seed: int, rank: int, step: int) -> int:
    """A seed for the noise of the segment that starts at `step` on `rank`."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


class EMA:
    """Exponential moving average of the parameters (float32), used for evaluation and export."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early in training
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)


def make_accelerator(cfg: Config) -> Accelerator:
    on_gpu = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not on_gpu:
        raise ConfigError("config key 'train.mixed_precision': fp16 needs a GPU; on CPU use bf16 or no")
    return Accelerator(cpu=not on_gpu, mixed_precision=cfg.train.mixed_precision)


def train(cfg: Config, progress: bool = True) -> Path:
    """Train (or resume) the run in `cfg.run_dir`; returns the run folder."""
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json",
                          {"config": config_to_dict(cfg), "config_hash": config_hash(cfg)})

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.train.warmup_steps, cfg.train.steps))
    ema = EMA(model, cfg.train.ema_decay)
    counters = {"step": 0, "skipped": 0, "images": 0}

    resume = latest_checkpoint(run_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        counters = {k: int(state[k]) for k in counters}
        if main:
            print(f"resuming {run_dir} from {resume.name} (step {counters['step']})", file=sys.stderr)
    # The scheduler is stepped by hand: a prepared one steps once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume is not None and accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    likelihood = accelerator.unwrap_model(model).likelihood
    dims = 3 * cfg.model.image_size ** 2
    log_path = run_dir / "train_log.jsonl"

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if main:
            state = {"model": accelerator.unwrap_model(model).state_dict(), "ema": ema.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "config": config_json(cfg), **counters}
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            save_checkpoint(run_dir, counters["step"], state, cfg.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    bar = tqdm(total=cfg.train.steps, initial=counters["step"], disable=not (main and progress),
               desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
    nonfinite_in_a_row = 0
    seen: set[str] = set()  # keys this rank consumed in this process (audit of the data split)
    window = {"loss": 0.0, "elbo": 0.0, "recon": 0.0, "kl": 0.0, "n": 0, "t": time.time(), "images": 0}
    model.train()
    while counters["step"] < cfg.train.steps:
        segment_start = counters["step"]
        segment_end = min(cfg.train.steps, (segment_start // cfg.train.checkpoint_every + 1)
                          * cfg.train.checkpoint_every)
        noise = torch.Generator(device="cpu").manual_seed(stream_seed(cfg.train.seed, rank, segment_start))
        loader = train_loader(cfg.data.shards, cfg.data.batch_size, cfg.train.seed, rank, world, segment_start,
                              cfg.data.num_workers, cfg.data.shuffle_buffer)
        for keys, batch in loader:
            step = counters["step"]
            seen.update(keys)
            x = batch.to(device, non_blocking=True)
            eps = torch.randn((x.shape[0], cfg.model.latent_dim), generator=noise).to(device)
            with accelerator.autocast():
                terms = elbo_terms(model, x, eps, likelihood)
            beta = beta_at(step, cfg.objective.beta, cfg.objective.kl_warmup_steps)
            loss = training_loss(terms, beta, cfg.objective.free_bits)
            finite = accelerator.gather(torch.isfinite(loss).float().reshape(1)).min().item() > 0
            grad_norm = float("nan")
            if finite:
                accelerator.backward(loss)
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip))
                finite = math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                nonfinite_in_a_row = 0
            else:
                counters["skipped"] += 1
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                    raise TrainingError(
                        f"training stopped at step {step}: {nonfinite_in_a_row} non-finite losses or gradients "
                        f"in a row; the last good checkpoint is kept in {run_dir / 'checkpoints'}")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ema.update(accelerator.unwrap_model(model), step)
            counters["step"] = step + 1
            counters["images"] += x.shape[0] * world
            bar.update(1)
            if finite:
                window["loss"] += loss.item()
                window["elbo"] += terms["elbo"].mean().item()
                window["recon"] += terms["recon"].mean().item()
                window["kl"] += terms["kl"].mean().item()
                window["n"] += 1
            window["images"] += x.shape[0] * world
            if counters["step"] % cfg.train.log_every == 0 or counters["step"] == cfg.train.steps:
                n = max(1, window["n"])
                now = time.time()
                record = {"step": counters["step"], "loss": window["loss"] / n, "elbo_nats": window["elbo"] / n,
                          "recon_nats": window["recon"] / n, "kl_nats": window["kl"] / n,
                          "elbo_bpd": bits_per_dim(window["elbo"] / n, dims), "beta": beta,
                          "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                          "images_per_s": window["images"] / max(1e-9, now - window["t"]),
                          "skipped_steps": counters["skipped"]}
                if main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(bpd=f"{record['elbo_bpd']:.3f}", img_s=f"{record['images_per_s']:.0f}")
                window = {"loss": 0.0, "elbo": 0.0, "recon": 0.0, "kl": 0.0, "n": 0, "t": now, "images": 0}
            if counters["step"] >= segment_end:
                break
        checkpoint()
    bar.close()
    write_rank_record(run_dir, accelerator.unwrap_model(model), rank, world, counters["step"], seen)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


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

    cfg = config_from_dict(json.loads(Path(sys.argv[1]).read_text()))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    train(cfg)


if __name__ == "__main__":
    main()
