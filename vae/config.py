"""The one typed configuration tree: defaults, YAML differences, `key=value` overrides, validation.

A run's configuration is `Config`; each component owns its section. YAML files hold only what differs
from the defaults. Unknown keys, wrong types and impossible values raise `ConfigError` naming the full
key (`train.lr`) before any work starts. `config_hash` identifies what was trained (not where).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

LIKELIHOODS = ("discretized_logistic", "logistic_mixture", "bernoulli", "gaussian")
PRECISIONS = ("no", "bf16", "fp16")
MODEL_KINDS = ("conv", "hierarchical")
MAX_GROUPS_PER_SIDE = 64  # model.layout: latent groups at one resolution (VDVAE's deepest use about 20)
OPTIMIZERS = ("adamw", "adamax")
MAX_K = 100_000  # importance samples: the cap on eval.k, `vae eval --k`, `vae score --k` and the flow's k
MAX_SAMPLE_IMAGES = 10_000  # images per sample-quality figure: nearest-neighbour matrices grow with its square
MAX_TEMPERATURE = 100.0


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def check_temperatures(values, key: str) -> list[float]:
    """A non-empty list of finite temperatures in (0, MAX_TEMPERATURE]; raises ConfigError naming `key`."""
    _check(isinstance(values, (list, tuple)) and len(values) > 0, key,
           f"must be a non-empty list of temperatures, got {values!r}")
    for i, t in enumerate(values):
        ok = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0 < t <= MAX_TEMPERATURE
        _check(ok, key, f"temperature {i} must be a finite number in (0, {MAX_TEMPERATURE:g}], got {t!r}")
    _check(len(set(values)) == len(values), key, f"temperatures repeat: {values!r}")
    return [float(t) for t in values]


def _at_least(section, name: str, low: float) -> None:
    value = getattr(section, name)
    _check(value >= low, name, f"must be >= {low}, got {value}")


@dataclass
class DataConfig:
    shards: str = "data/shards"  # local folder or fsspec URL holding manifest.json
    batch_size: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 2000
    in_memory: bool = False  # load the rank's train split onto the training device once (data that fits)
    flip: bool = False  # mirror training images left-right at random (drawn from the run's seed; never in eval)

    def __post_init__(self) -> None:
        _at_least(self, "batch_size", 1)
        _at_least(self, "num_workers", 0)
        _at_least(self, "shuffle_buffer", 1)


@dataclass
class ModelConfig:
    image_size: int = 64
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    latent_dim: int = 128
    res_blocks: int = 1  # residual blocks after each resolution change (with a layout: encoder cells per side)
    likelihood: str = "discretized_logistic"
    mixtures: int = 1  # logistic_mixture: components per pixel (docs/model.md: one is the best at a CPU budget)
    kind: str = "conv"  # conv: one latent vector; hierarchical: top-down latent groups (vae/models/hierarchical.py)
    groups: int = 2  # hierarchical: latent groups, one per resolution from the coarsest up
    latent_channels: int = 8  # hierarchical: channels of each group's spatial latent
    # hierarchical, VDVAE-style (vae/models/vdvae.py): "SIDExGROUPS,..." top-down from the coarsest, e.g.
    # "4x2,8x3,16x3,32x2"; replaces `groups` ("": one group per resolution, vae/models/hierarchical.py)
    layout: str = ""

    def level_sides(self) -> list[int]:
        """The side of each resolution model.channels gives a width for: image_size / 2, / 4, ... (finest first)."""
        return [self.image_size // 2 ** (k + 1) for k in range(len(self.channels))]

    def layout_groups(self) -> list[tuple[int, int]]:
        """`layout` as (side, groups at that side) pairs, coarsest first ([] without a layout). Raises ConfigError
        naming the key when it does not fit the image size and widths."""
        if not self.layout.strip():
            return []
        sides = self.level_sides()
        usage = (f"write SIDExGROUPS items from the coarsest side up, each side once, sides among "
                 f"{sorted(sides)} (image_size halved once per model.channels width) starting at {sides[-1]}, "
                 f"e.g. model.layout={','.join(f'{r}x2' for r in reversed(sides))}")
        pairs: list[tuple[int, int]] = []
        for i, item in enumerate(self.layout.split(",")):
            where = f"item {i + 1} {item.strip()!r}"
            _check(item.strip() != "", "layout", f"item {i + 1} is empty in {self.layout!r}; {usage}")
            side, sep, count = item.strip().lower().partition("x")
            _check(sep == "x" and side.strip().isdigit() and count.strip().isdigit(), "layout",
                   f"{where} is not SIDExGROUPS; {usage}")
            side, count = int(side), int(count)
            _check(1 <= count <= MAX_GROUPS_PER_SIDE, "layout",
                   f"{where}: groups at a side must be in [1, {MAX_GROUPS_PER_SIDE}]; {usage}")
            _check(side in sides, "layout", f"{where}: side {side} is not a resolution of this model; {usage}")
            _check(not pairs or side > pairs[-1][0], "layout",
                   f"{where}: sides must grow from the coarsest, {side} comes after {pairs[-1][0] if pairs else 0}; "
                   f"{usage}")
            pairs.append((side, count))
        _check(pairs[0][0] == sides[-1], "layout",
               f"starts at side {pairs[0][0]}, but model.channels has {len(sides)} widths, down to side "
               f"{sides[-1]}: start the layout at {sides[-1]} or give model.channels "
               f"{sides.index(pairs[0][0]) + 1} widths")
        return pairs

    def group_resolutions(self) -> list[int]:
        """Hierarchical: each latent group's side, top (coarsest) group first."""
        if self.layout.strip():
            return [side for side, count in self.layout_groups() for _ in range(count)]
        depth = len(self.channels)
        return [self.image_size // 2 ** (s + 1) for s in range(depth - 1, depth - 1 - self.groups, -1)]

    def latent_group_sizes(self) -> list[int]:
        """The flat latent's groups, top first (their KL is balanced by objective.kl_balance); one for kind=conv."""
        if self.kind != "hierarchical":
            return [self.latent_dim]
        return [self.latent_channels * r * r for r in self.group_resolutions()]

    def hierarchical_latent_dim(self) -> int:
        """Hierarchical: the flat latent size, latent_channels * side^2 summed over the groups."""
        return sum(self.latent_channels * r * r for r in self.group_resolutions())

    def __post_init__(self) -> None:
        _at_least(self, "latent_dim", 1)
        _check(len(self.channels) >= 1, "channels", "needs at least one layer")
        _check(all(c >= 1 for c in self.channels), "channels", f"widths must be >= 1, got {self.channels}")
        _at_least(self, "res_blocks", 0)
        _at_least(self, "mixtures", 1)
        _check(self.likelihood in LIKELIHOODS, "likelihood",
               f"must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")
        stride = 2 ** len(self.channels)
        _check(self.image_size >= stride and self.image_size % stride == 0, "image_size",
               f"must be a multiple of 2**len(channels) = {stride}, got {self.image_size}")
        _check(self.kind in MODEL_KINDS, "kind", f"must be one of {', '.join(MODEL_KINDS)}, got {self.kind!r}")
        _at_least(self, "groups", 1)
        _at_least(self, "latent_channels", 1)
        _check(not self.layout.strip() or self.kind == "hierarchical", "layout",
               f"a layout is for kind=hierarchical, got kind={self.kind}: set model.kind=hierarchical or "
               f"model.layout=''")
        if self.kind == "hierarchical" and self.layout.strip():
            pairs = self.layout_groups()
            want = self.hierarchical_latent_dim()
            _check(self.latent_dim == want, "latent_dim",
                   f"kind=hierarchical with layout {self.layout!r} ({sum(c for _, c in pairs)} groups of "
                   f"{self.latent_channels} channels) has {want} latent dimensions; set latent_dim={want}, "
                   f"got {self.latent_dim}")
        elif self.kind == "hierarchical":
            _check(self.groups <= len(self.channels), "groups",
                   f"one group per resolution: at most len(channels) = {len(self.channels)}, got {self.groups}")
            want = self.hierarchical_latent_dim()
            _check(self.latent_dim == want, "latent_dim",
                   f"kind=hierarchical with {self.groups} groups of {self.latent_channels} channels at sides "
                   f"{self.group_resolutions()} has {want} latent dimensions; set latent_dim={want}, "
                   f"got {self.latent_dim}")


@dataclass
class ObjectiveConfig:
    beta: float = 1.0
    kl_warmup_steps: int = 0  # beta ramps linearly from 0 over these steps (training only)
    free_bits: float = 0.0  # nats per latent dimension, training only
    loss_per_dim: bool = False  # the optimiser sees the loss divided by 3*H*W (VDVAE); logs stay per image
    # NVAE's KL balancing while beta warms up (kl_warmup_steps > 0): each latent group's KL weighted by its
    # share (KL per dimension against the others'), so no group collapses early; training loss only
    kl_balance: bool = False

    def __post_init__(self) -> None:
        _check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        _at_least(self, "kl_warmup_steps", 0)
        _at_least(self, "free_bits", 0)
        _check(not self.kl_balance or self.kl_warmup_steps > 0, "kl_balance",
               "balances the groups' KL during the KL warm-up: set objective.kl_warmup_steps > 0 as well")


@dataclass
class TrainConfig:
    steps: int = 20000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 200.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    max_nonfinite: int = 10  # consecutive non-finite steps before training stops
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grids_every: int = 0  # steps between sample/reconstruction grids (0: at each checkpoint)
    tensorboard: bool = True  # log through Accelerate's TensorBoard tracker as well as train_log.jsonl
    channels_last: bool = False  # GPU memory layout option
    compile: bool = False  # torch.compile the model (GPU option)
    max_seconds: float = 0.0  # stop after this much training time (benchmarks at equal compute); 0: off
    init_from: str = ""  # a run folder: a new run starts from its latest EMA weights (same model section only)
    collective_timeout_s: float = 300.0  # how long a rank waits for the others (a lost machine) before failing
    optimizer: str = "adamw"  # adamw, or adamax (torch.optim.Adamax: weight_decay is L2 there, not decoupled)
    skip_threshold: float = 0.0  # skip updates whose pre-clip gradient norm exceeds this (counted); 0: off

    def __post_init__(self) -> None:
        _at_least(self, "steps", 1)
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _at_least(self, "weight_decay", 0)
        _at_least(self, "warmup_steps", 0)
        _check(self.grad_clip > 0, "grad_clip", f"must be > 0, got {self.grad_clip}")
        _check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.mixed_precision in PRECISIONS, "mixed_precision",
               f"must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
        _at_least(self, "checkpoint_every", 1)
        _at_least(self, "keep_checkpoints", 1)
        _at_least(self, "log_every", 1)
        _at_least(self, "max_nonfinite", 1)
        _at_least(self, "grad_accum_steps", 1)
        _at_least(self, "grids_every", 0)
        _at_least(self, "max_seconds", 0)
        _check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32 - 1] (numpy and torch seeds), got {self.seed}")
        _check(self.collective_timeout_s > 0, "collective_timeout_s", f"must be > 0, got {self.collective_timeout_s}")
        _check(self.optimizer in OPTIMIZERS, "optimizer",
               f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _check(self.skip_threshold >= 0, "skip_threshold",
               f"must be >= 0 (a gradient norm; 0: off), got {self.skip_threshold}")


@dataclass
class EvalConfig:
    k: int = 100
    k_chunk: int = 50  # importance samples decoded at once: memory does not grow with k
    batch_size: int = 64
    split: str = "test"
    # sample quality (vae/evaluation/sample_quality.py): prior draws scaled by each temperature, and how many
    # images each figure compares (held-out, training and generated alike; fewer when the split has fewer)
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    sample_images: int = 1000
    inception_weights: str = ""  # pt_inception-2015-12-05-6726825d.pth for FID (a path; no download)

    def __post_init__(self) -> None:
        _check(1 <= self.k <= MAX_K, "k", f"must be in [1, {MAX_K}], got {self.k}")
        _at_least(self, "k_chunk", 1)
        _at_least(self, "batch_size", 1)
        _check(self.split in ("train", "valid", "test"), "split",
               f"must be train, valid or test, got {self.split!r}")
        check_temperatures(self.temperatures, "temperatures")
        _check(2 <= self.sample_images <= MAX_SAMPLE_IMAGES, "sample_images",
               f"must be in [2, {MAX_SAMPLE_IMAGES}] (each figure compares at least two images), got "
               f"{self.sample_images}")


@dataclass
class Config:
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field's type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        _check(math.isfinite(value), key, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` (mixed_precision=no) as false
            value = "yes" if value else "no"
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        _check(name in names, key, f"unknown key (known: {', '.join(sorted(names))})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
            kwargs[name] = _build(hint, value, f"{key}.")
        else:
            kwargs[name] = _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # Sections validate their own fields; name the full key here.
        message = str(err)
        if prefix and message.startswith("config key '"):
            message = message.replace("config key '", f"config key '{prefix}", 1)
        raise ConfigError(message) from None


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `['train.lr=3e-4', 'model.channels=[32,64]']` into a nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}': '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file's differences, then `key=value` overrides; validated."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {err.start})") from None
        except OSError as err:
            raise ConfigError(f"config file {path}: cannot be read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        values = loaded
    values = _merge(values, parse_overrides(overrides or []))
    return _build(Config, values)


def config_from_dict(values: dict) -> Config:
    return _build(Config, values)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Keys added after configs were shipped: left out of `config_hash` while at their default, so the hash of a
# config written before them does not move; set otherwise, they enter it like any other key.
LATER_KEYS = ("eval.temperatures", "eval.sample_images", "objective.loss_per_dim", "train.optimizer",
              "train.skip_threshold", "data.flip", "model.layout", "objective.kl_balance")
# Locations and waits, never part of what was trained: a path (`eval.inception_weights`) names a file, whose
# identity the metrics record by its sha256.
NOT_HASHED = ("run_dir", "data.shards", "data.num_workers", "train.init_from", "train.collective_timeout_s",
              "eval.inception_weights")


def _drop(values: dict, key: str) -> tuple[dict, str, object]:
    *sections, name = key.split(".")
    for section in sections:
        values = values[section]
    return values, name, values.get(name)


def config_hash(cfg: Config) -> str:
    """Hash of what defines the model and its training (not where files live)."""
    values = config_to_dict(cfg)
    defaults = config_to_dict(Config())
    for key in NOT_HASHED:
        section, name, _ = _drop(values, key)
        section.pop(name)
    for key in LATER_KEYS:
        section, name, value = _drop(values, key)
        if value == _drop(defaults, key)[2]:
            section.pop(name)
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
