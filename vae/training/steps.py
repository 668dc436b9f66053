"""One optimizer step, split as torchtitan splits it: `train_step` (skip or step, scheduler, EMA, counters)
hands the math to `forward_backward_step` (the micro-batches: forward, loss, backward). `Window` keeps the
running sums between two log lines.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from common.errors import TrainingError
from vae.objectives import beta_at, bits_per_dim, elbo_terms, training_loss
from vae.training.state import TrainState

SCALE_HALVINGS = 40  # fp16 overflows in a row the loss scale may take to calibrate; past that, it is divergence


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
        """One log line: the window's means, null where it has none (every step in it skipped), and no
        non-finite number (strict JSON readers refuse NaN)."""
        speed = {"images_per_s": self.images / max(1e-9, time.time() - self.start)}
        extra = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in extra.items()}
        if self.n == 0:
            return {"step": step, **dict.fromkeys(("loss", "elbo_nats", "recon_nats", "kl_nats", "elbo_bpd",
                                                   "kl_dim_max", "kl_dim_median", "kl_dims_active")),
                    **speed, **extra}
        mean = {k: v / self.n for k, v in self.sums.items()}
        kl_dims = self.kl_dims / self.n
        return {"step": step, "loss": mean["loss"], "elbo_nats": mean["elbo"], "recon_nats": mean["recon"],
                "kl_nats": mean["kl"], "elbo_bpd": bits_per_dim(mean["elbo"], dims),
                "kl_dim_max": float(kl_dims.max()), "kl_dim_median": float(kl_dims.median()),
                "kl_dims_active": int((kl_dims > 0.01).sum()), **speed, **extra}


@dataclass
class StepResult:
    beta: float
    grad_norm: float  # NaN when the step was skipped
    skipped: bool
    first_images: torch.Tensor | None  # the step's first micro-batch (uint8, on the device)


def forward_backward_step(state: TrainState, batches, noise: torch.Generator, beta: float, window: Window,
                          seen: set[str]) -> tuple[bool, torch.Tensor | None, dict | None, torch.Tensor | None]:
    """The step's micro-batches: draw noise, forward, loss, backward (gradients summed across micro-batches,
    synchronised across ranks once). Returns (finite, loss, terms, first images); every rank agrees on
    `finite`, or DDP would wait forever for the others' gradients."""
    cfg, accelerator = state.cfg, state.accelerator
    accum = cfg.train.grad_accum_steps
    finite, loss, terms, first = True, None, None, None
    for micro in range(accum):
        keys, batch = next(batches)
        seen.update(keys)
        x = batch.to(accelerator.device, non_blocking=True)
        first = x if first is None else first
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        eps = torch.randn((x.shape[0], cfg.model.latent_dim), generator=noise).to(accelerator.device)
        with accelerator.autocast():
            terms = elbo_terms(state.forward, x, eps, state.raw_model.likelihood)
        loss = training_loss(terms, beta, cfg.objective.free_bits)
        finite = accelerator.gather(torch.isfinite(loss).float().reshape(1)).min().item() > 0
        if not finite:  # the step's other micro-batches and their noise are used up all the same: a resumed run
            for _ in range(micro + 1, accum):  # replays grad_accum_steps of each per step
                keys, batch = next(batches)
                seen.update(keys)
                torch.randn((batch.shape[0], cfg.model.latent_dim), generator=noise)
            break
        if micro < accum - 1 and state.world > 1:
            with accelerator.no_sync(state.model):
                accelerator.backward(loss / accum)
        else:
            accelerator.backward(loss / accum)
        window.images += x.shape[0] * state.world
    return finite, loss, terms, first


def train_step(state: TrainState, batches, noise: torch.Generator, window: Window, seen: set[str]) -> StepResult:
    """One optimizer step, or a skipped one when the loss or the gradients are not finite (counted; too many in
    a row stop training with the last good checkpoint kept). The scheduler, the EMA and the counters advance
    either way, so a skipped step keeps the run's schedule."""
    cfg, counters = state.cfg, state.counters
    step = counters["step"]
    beta = beta_at(step, cfg.objective.beta, cfg.objective.kl_warmup_steps)
    finite, loss, terms, first = forward_backward_step(state, batches, noise, beta, window, seen)
    grad_norm, overflow = float("nan"), False
    if finite:
        grad_norm = float(state.accelerator.clip_grad_norm_(state.model.parameters(), cfg.train.grad_clip))
        finite = math.isfinite(grad_norm)
        # fp16: gradients past the loss scale are the scaler's to handle. Its step skips the update and lowers the
        # scale (without that step it never updates, and the next unscale fails); calibrating the scale is not a
        # sign of divergence, so up to SCALE_HALVINGS in a row do not count towards max_nonfinite.
        overflow = not finite and getattr(state.accelerator, "scaler", None) is not None
    if finite or overflow:
        state.optimizer.step()
    if finite:
        state.nonfinite_in_a_row = state.overflows_in_a_row = 0
        window.add(loss, terms)
    else:
        counters["skipped"] += 1
        state.overflows_in_a_row += overflow
        if not overflow or state.overflows_in_a_row > SCALE_HALVINGS:
            state.nonfinite_in_a_row += 1
        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite:
            raise TrainingError(
                f"training stopped at step {step}: {state.nonfinite_in_a_row} non-finite losses or gradients in a "
                f"row; the last good checkpoint is kept in {state.run_dir / 'checkpoints'}")
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    state.ema.update(state.raw_model, step)
    counters["step"] = step + 1
    counters["images"] += cfg.data.batch_size * cfg.train.grad_accum_steps * state.world
    return StepResult(beta, grad_norm, not finite, first)
