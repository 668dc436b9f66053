"""A run folder, read in one place: `Run(path)`.

    RUN_DIR/config.json                      the config the run was last launched with, its hash, the format version
    RUN_DIR/checkpoints/step-NNNNNNNN.pt     checkpoints (`vae.core.checkpoint` writes and loads one file)
    RUN_DIR/eval/metrics.json                the evaluation of its weights (`vae.evaluation.evaluate`)

`Run` gives the run's config record, its latest complete checkpoint (picked once and named by its step, or the
step asked for), the trained model with its EMA weights, the preprocessing its images had, the crop images given
to it take, its metrics and its format version. A run being trained may rotate the checkpoint picked away before
it is read: the newest is then picked again (a step asked for is not: it is gone, in one line). What reads a run
reports the step it read. The listing and the config record need no torch (`vae info` reads them); the checkpoint
is loaded with torch on first use.

Formats. `FORMAT_VERSION` is what this code writes (config.json names it). Older run folders (format 1: no
`format_version`) load as they are; what their files may lack is read here as follows:
- a checkpoint without `preprocessing` (written before checkpoints recorded it): the preprocessing of the shards
  it names (`data.shards`' manifest.json) where they can be read here, else unknown (None);
- a checkpoint without its `.sha256` (written before digests, or a kill between the two writes): loaded
  unverified (`vae.core.checkpoint.load_checkpoint`);
- a checkpoint config without a key added later: the key's default (`vae.core.checkpoint.resume_differences`,
  `vae.core.keys.ADDED_LATER`); progress fields it lacks: their defaults (`vae.training.progress.Progress`);
- a run folder without config.json: its checkpoints alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vae_runtime import limits, schemas, storage
from vae_runtime.atomic import atomic_write_json
from vae_runtime.errors import BadInput
from vae.core.config import config_hash, config_to_dict

FORMAT_VERSION = 2  # 2: config.json names it; 1: run folders written before it did
CHECKPOINT = re.compile(r"^step-(\d{8})\.pt$")
SHARD_MANIFEST = "manifest.json"  # pipeline.manifest.MANIFEST: read here only for format 1 checkpoints
PICKS = 10  # how often the newest checkpoint is picked again when rotation removed it before it was read


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def checkpoint_step(path: str | Path) -> int:
    return int(CHECKPOINT.match(Path(path).name).group(1))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first (complete files only: a write in progress has a temporary name)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class Run:
    """A run folder. `step`: read that checkpoint rather than the newest (every rank of one evaluation reads the
    checkpoint its launcher picked)."""

    def __init__(self, path: str | Path, step: int | None = None):
        self.path = Path(path)
        self._asked = step
        self._state: dict | None = None
        self._checkpoint: Path | None = None
        self._models: dict = {}

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # -- the folder (no torch) ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def metrics_path(self) -> Path:
        return self.eval_dir / "metrics.json"

    def checkpoints(self) -> list[Path]:
        return list_checkpoints(self.path)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    @staticmethod
    def _record(path: Path, schema: dict, what: str) -> dict | None:
        """A JSON record of the folder, its fields' types checked (one line naming the file), or None if absent."""
        try:
            data = limits.read_file(path, "json")
        except FileNotFoundError:
            return None
        return schemas.load(data, schema, str(path), what)

    @property
    def config_record(self) -> dict | None:
        """config.json, or None where there is none."""
        return self._record(self.config_path, schemas.RUN_CONFIG, "a run's config record")

    @property
    def format_version(self) -> int:
        """The format the run folder was written in: config.json's, 1 for folders from before it named one."""
        return (self.config_record or {}).get("format_version") or 1

    @property
    def metrics(self) -> dict | None:
        """eval/metrics.json, or None where the run has not been evaluated."""
        return self._record(self.metrics_path, schemas.METRICS, "a metrics record")

    def write_config(self, cfg) -> Path:
        """config.json for a launch of the run with `cfg` (a `Config`), in this code's format."""
        return atomic_write_json(self.config_path, {"format_version": FORMAT_VERSION,
                                                    "config": config_to_dict(cfg), "config_hash": config_hash(cfg)})

    def remove_torn_writes(self) -> int:
        """Delete temporary files left by a checkpoint write that was killed; returns how many."""
        folder = checkpoint_dir(self.path)
        torn = list(folder.glob(".step-*.pt.*.tmp")) if folder.is_dir() else []
        for path in torn:
            path.unlink(missing_ok=True)
        return len(torn)

    # -- the checkpoint read (torch) ---------------------------------------------------------------------------

    @property
    def state(self) -> dict:
        """The checkpoint read, loaded once: the step asked for, else the newest complete one."""
        return self._read()[1]

    @property
    def checkpoint(self) -> Path:
        """The file of the checkpoint read."""
        return self._read()[0]

    def _read(self) -> tuple[Path, dict]:
        if self._state is None:
            self._checkpoint, self._state = self._pick()
        return self._checkpoint, self._state

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def _pick(self) -> tuple[Path, dict]:
        from vae.core.checkpoint import load_checkpoint  # lazy: torch, and checkpoint imports this module

        if self._asked is not None:
            path = checkpoint_dir(self.path) / checkpoint_name(self._asked)
            try:
                return path, load_checkpoint(path)
            except FileNotFoundError:
                raise BadInput(f"run {self.path}: no checkpoint at step {self._asked} (rotated away by training, "
                               "or never written); read it again for its newest") from None
        for _ in range(PICKS):
            path = self.latest_checkpoint()
            if path is None:
                raise BadInput(f"run {self.path}: no checkpoint found (train it first)")
            try:
                return path, load_checkpoint(path)
            except FileNotFoundError:  # rotated away by the trainer between listing and reading: pick again
                continue
        raise BadInput(f"run {self.path}: its newest checkpoint was deleted before it could be read, {PICKS} times "
                       "over; is a process removing them?")

    @property
    def config(self):
        """The `Config` the checkpoint read was trained with (config.json holds the latest launch's)."""
        from vae.core.checkpoint import config_of

        return config_of(self.state)

    def model(self, ema: bool = True):
        """The trained model of the checkpoint read, on the CPU in eval mode: its EMA weights (what evaluation
        measures and export ships), or the raw training weights with `ema=False`. One object per kind: a caller
        that moves or changes it changes it for the next."""
        if ema not in self._models:
            from vae.core.checkpoint import trained_model

            self._models[ema] = trained_model(self.state, ema)[0]
        return self._models[ema]

    @property
    def preprocessing(self) -> dict | None:
        """The preprocessing of the images the run trained on: its checkpoint's record, else (format 1) that of
        its shards' manifest where it can be read here, else None (unknown here)."""
        recorded = self.state.get("preprocessing")
        if recorded is not None:
            return recorded
        try:
            manifest = json.loads(storage.read_capped(storage.join(self.config.data.shards, SHARD_MANIFEST),
                                                      "manifest"))
        except Exception:  # gone, damaged, s3:// without credentials here, gs:// without gcsfs: unknown here
            return None
        found = manifest.get("preprocessing") if isinstance(manifest, dict) else None
        return found if isinstance(found, dict) else None

    @property
    def crop(self) -> int:
        """The crop images given to the model take: its training images' (`preprocessing`), else the default."""
        return schemas.recorded_crop(self.preprocessing)
