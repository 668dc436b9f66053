"""Where a training run is: one record of its steps, images seen, skipped steps, noise position and training time,
passed to each step and checkpointed as it is.

Training time (`train_s`, the quantity `train.max_seconds` bounds) is measured with the monotonic clock within a
launch and summed across launches through the checkpoint, so a wall clock stepped forward or back changes
nothing. Checkpoints hold these fields as top-level keys; a field a checkpoint lacks (written before it existed)
reads as its default.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from vae_runtime.errors import BadInput

# The checkpoint keys this record owns (the rest of a checkpoint is weights and optimizer states).
INT_FIELDS = ("step", "images", "skipped", "skipped_outliers", "stream_start")


@dataclass
class Progress:
    step: int = 0  # optimizer steps done (skipped ones included: the schedule advances either way)
    images: int = 0  # images seen, over every process
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    skipped_outliers: int = 0  # finite steps skipped for a gradient norm past train.skip_threshold
    stream_start: int = 0  # the noise position: the step at which the current data stream and noise were seeded
    earlier_s: float = 0.0  # training time of the launches before this one
    launched: float = field(default_factory=time.monotonic, repr=False)  # this launch's start, monotonic clock

    def start_launch(self) -> None:
        """This launch's training starts now (after setup, which is not training time)."""
        self.launched = time.monotonic()

    def train_s(self) -> float:
        """Training time of the whole run so far: earlier launches' and this one's."""
        return self.earlier_s + (time.monotonic() - self.launched)

    def to_checkpoint(self) -> dict:
        return {**{name: getattr(self, name) for name in INT_FIELDS}, "train_s": self.train_s()}

    @classmethod
    def from_checkpoint(cls, saved: dict, where: str) -> "Progress":
        """The record a checkpoint holds; `where` names the checkpoint in errors."""
        values = {}
        for name in INT_FIELDS:
            value = saved.get(name, saved.get("step", 0) if name == "stream_start" else 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadInput(f"{where}: {name} is {str(value)[:40]!r}, expected a non-negative integer")
            values[name] = value
        spent = saved.get("train_s", 0.0)
        if isinstance(spent, bool) or not isinstance(spent, (int, float)) or not math.isfinite(spent) or spent < 0:
            raise BadInput(f"{where}: train_s is {str(spent)[:40]!r}, expected a non-negative number of seconds")
        return cls(**values, earlier_s=float(spent))

