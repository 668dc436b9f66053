"""Exponential moving average of a model's weights (float32), used for evaluation and export."""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early in training
        for k, v in model.state_dict().items():
            if self.shadow[k].device != v.device:  # the model moved to its device after the EMA was made
                self.shadow[k] = self.shadow[k].to(v.device)
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
