"""One optimizer step, split as torchtitan splits it: `train_step` (skip or step, scheduler, EMA, progress)
hands the math to `forward_backward_step` (the micro-batches: forward, loss, backward). `Window` keeps the
running sums between two log lines.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from vae_runtime.errors import TrainingError
from vae.core.config import Config
from vae.core.objectives import beta_at, bits_per_dim, elbo_terms, image_dims, kl_balance_groups, training_loss
from vae.training.state import TrainState

SCALE_HALVINGS = 40  # fp16 overflows in a row the loss scale may take to calibrate; past that, it is divergence


class Window:
    """Running sums between two log lines."""

    def __init__(self):
        self.sums = {"loss": 0.0, "elbo": 0.0, "recon": 0.0, "kl": 0.0}
        self.kl_dims = None
        self.n, self.images, self.start = 0, 0, time.monotonic()

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
        speed = {"images_per_s": self.images / max(1e-9, time.monotonic() - self.start)}
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
    skipped: bool  # no update: a non-finite loss or gradient, or a gradient norm past train.skip_threshold
    first_images: torch.Tensor | None  # the step's first micro-batch (uint8, on the device)


def micro_batch_draws(noise: torch.Generator, n: int, cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A micro-batch's random draws from the step stream's generator, in the one order that training and the replay
    on resume (`open_stream`) both use: the posterior noise [n, latent_dim], then, with data.flip, which of the n
    images to mirror left-right ([n] bool, each with probability 1/2)."""
    eps = torch.randn((n, cfg.model.latent_dim), generator=noise)
    flips = torch.rand(n, generator=noise) < 0.5 if cfg.data.flip else None
    return eps, flips


def flip_images(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """x [N, C, H, W] with the images where `flips` is true mirrored left-right."""
    return torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)


def forward_backward_step(state: TrainState, batches, noise: torch.Generator, beta: float, window: Window,
                          seen: set[str]) -> tuple[bool, torch.Tensor | None, dict | None, torch.Tensor | None]:
    """The step's micro-batches: draw noise, forward, loss, backward (gradients summed across micro-batches,
    synchronised across ranks once). Returns (finite, loss, terms, first images); every rank agrees on
    `finite`, or DDP would wait forever for the others' gradients. The loss returned (and logged) is in nats per
    image; with objective.loss_per_dim the backward pass takes it divided by the image's dimensions."""
    cfg, accelerator = state.cfg, state.accelerator
    accum = cfg.train.grad_accum_steps
    scale = accum * (image_dims(cfg.model.image_size) if cfg.objective.loss_per_dim else 1)
    finite, loss, terms, first = True, None, None, None
    for micro in range(accum):
        keys, batch = next(batches)
        seen.update(keys)
        x = batch.to(accelerator.device, non_blocking=True)
        eps, flips = micro_batch_draws(noise, x.shape[0], cfg)
        eps = eps.to(accelerator.device)
        if flips is not None:
            x = flip_images(x, flips)
        first = x if first is None else first
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            terms = elbo_terms(state.forward, x, eps, state.raw_model.likelihood)
        loss = training_loss(terms, beta, cfg.objective.free_bits, kl_balance_groups(cfg, beta))
        finite = accelerator.gather(torch.isfinite(loss).float().reshape(1)).min().item() > 0
        if not finite:  # the step's other micro-batches and their noise are used up all the same: a resumed run
            for _ in range(micro + 1, accum):  # replays grad_accum_steps of each per step
                keys, batch = next(batches)
                seen.update(keys)
                micro_batch_draws(noise, batch.shape[0], cfg)
            break
        if micro < accum - 1 and state.world > 1:
            with accelerator.no_sync(state.model):
                accelerator.backward(loss / scale)
        else:
            accelerator.backward(loss / scale)
        window.images += x.shape[0] * state.world
    return finite, loss, terms, first


def train_step(state: TrainState, batches, noise: torch.Generator, window: Window, seen: set[str]) -> StepResult:
    """One optimizer step, or a skipped one when the loss or the gradients are not finite (counted; too many in
    a row stop training with the last good checkpoint kept), or when the gradient norm before clipping passes
    train.skip_threshold (an outlier, counted apart; its finite loss is logged). The scheduler, the EMA and the
    progress advance either way, so a skipped step keeps the run's schedule."""
    cfg, progress = state.cfg, state.progress
    step = progress.step
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
    # The norm is the same on every rank (DDP has averaged the gradients), so every rank skips together.
    outlier = finite and bool(cfg.train.skip_threshold) and grad_norm > cfg.train.skip_threshold
    if (finite or overflow) and not outlier:
        state.optimizer.step()
    elif outlier and getattr(state.accelerator, "scaler", None) is not None:
        state.accelerator.scaler.update()  # fp16: close the unscale clipping made, as the scaler's step would
    if outlier:
        progress.skipped_outliers += 1
    if finite:
        state.nonfinite_in_a_row = state.overflows_in_a_row = 0
        window.add(loss, terms)
    else:
        progress.skipped += 1
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
    progress.step = step + 1
    progress.images += cfg.data.batch_size * cfg.train.grad_accum_steps * state.world
    return StepResult(beta, grad_norm, not finite or outlier, first)
