"""The one typed configuration tree: defaults, YAML differences, `key=value` overrides, validation.

A run's configuration is `Config`; each component owns its section. YAML files hold only what differs
from the defaults. Unknown keys, wrong types and impossible values raise `ConfigError` naming the full
key (`train.lr`) before any work starts. `config_hash` identifies what was trained (not where).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vae_runtime.errors import ConfigError, one_line, shown
from vae_runtime.limits import read_file
from vae_runtime.schemas import finite
from vae.core.keys import identity

LIKELIHOODS = ("discretized_logistic", "logistic_mixture", "bernoulli", "gaussian")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # train.mixed_precision, Accelerate's (a graph's: vae_runtime.vocabulary)
MODEL_KINDS = ("conv", "hierarchical")
MAX_GROUPS_PER_SIDE = 64  # model.layout: latent groups at one resolution (VDVAE's deepest use about 20)
OPTIMIZERS = ("adamw", "adamax")
# train.trackers: Accelerate's tracker names (`log_with`), run by vae/training/trackers.py
TRACKERS = ("tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
MAX_K = 100_000  # importance samples: the cap on eval.k, `vae eval --k`, `vae score --k` and the flow's k
MAX_SAMPLE_IMAGES = 10_000  # images per sample-quality figure: nearest-neighbour matrices grow with its square
MAX_TEMPERATURE = 100.0
MAX_TEMPERATURES = 32  # eval.temperatures: each one is a full set of sample figures and grids
# Sane ranges for every other number: generous beyond any run this project makes, tight enough that what is sized
# from a value (tensors, buffers, checkpoint names, timedeltas, int conversions) cannot overflow or exhaust memory.
MAX_STEPS = 10**8 - 1  # steps and step counts: checkpoint names hold eight digits (step-NNNNNNNN.pt)
MAX_BATCH = 1 << 14  # images in one batch (data and eval)
MAX_WIDTH = 1 << 12  # channels of one layer
MAX_LEVELS = 10  # model.channels entries: resolutions halved this often (image_size <= 2**10)
MAX_IMAGE_SIZE = 1 << 10
MAX_LATENT_DIM = 1 << 22
MAX_SECONDS = 365 * 86400.0  # train.max_seconds: a year
MAX_TIMEOUT_S = 7 * 86400.0  # train.collective_timeout_s: a week (torch's timedelta in milliseconds stays exact)
MAX_LR = 10.0
MAX_NORM = 1e12  # gradient norms: train.grad_clip, train.skip_threshold
MAX_WEIGHT = 1e6  # objective.beta, train.weight_decay, objective.free_bits (nats per dimension)
MAX_TEXT = 4096  # characters of a string value (paths, the layout)
# YAML: nesting and the nodes a file expands to once its aliases are followed (the configuration nests three
# deep; a 700-byte "billion laughs" file of nested aliases expands to 10**9 nodes)
MAX_DEPTH = 16
MAX_NODES = 100_000


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _short(key: str) -> str:
    """A key as an error names it: a key of a few thousand characters (a typo, an attack) cut to its start."""
    return key if len(key) <= 80 else key[:60] + "..."


def _within(section, name: str, low: float, high: float, why: str = "") -> None:
    """`section.name` in [low, high]: below is "must be >= low", above "must be <= high (why)", naming the key."""
    value = getattr(section, name)
    _check(value >= low, name, f"must be >= {low}, got {shown(value)}")
    _check(value <= high, name, f"must be <= {_number(high)}{f' ({why})' if why else ''}, got {shown(value)}")


def _positive(section, name: str, high: float, why: str = "") -> None:
    """`section.name` in (0, high]."""
    value = getattr(section, name)
    _check(0 < value <= high, name,
           f"must be in (0, {_number(high)}]{f' ({why})' if why else ''}, got {shown(value)}")


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_tracker_names(names, key: str) -> None:
    """Known tracker names, each once; raises ConfigError naming `key`."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"config key '{key}': must be a list of tracker names ({', '.join(TRACKERS)})")
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or len(set(names)) != len(names):
        what = f"unknown tracker {shown(unknown[0])}" if unknown else "a tracker named twice"
        raise ConfigError(f"config key '{key}': {what}; known: {', '.join(TRACKERS)}")


def check_temperatures(values, key: str) -> list[float]:
    """A non-empty list of finite temperatures in (0, MAX_TEMPERATURE]; raises ConfigError naming `key`."""
    _check(isinstance(values, (list, tuple)) and 0 < len(values) <= MAX_TEMPERATURES, key,
           f"must be a list of 1 to {MAX_TEMPERATURES} temperatures, got {shown(values)}")
    for i, t in enumerate(values):
        ok = finite(t) and 0 < t <= MAX_TEMPERATURE
        _check(ok, key, f"temperature {i} must be a finite number in (0, {MAX_TEMPERATURE:g}], got {shown(t)}")
    _check(len(set(values)) == len(values), key, f"temperatures repeat: {shown(values)}")
    return [float(t) for t in values]


@dataclass
class DataConfig:
    shards: str = "data/shards"  # local folder or fsspec URL holding manifest.json
    batch_size: int = 64
    num_workers: int = 0
    shuffle_buffer: int = 2000
    in_memory: bool = False  # load the rank's train split onto the training device once (data that fits)
    flip: bool = False  # mirror training images left-right at random (drawn from the run's seed; never in eval)

    def __post_init__(self) -> None:
        _within(self, "batch_size", 1, MAX_BATCH)
        _within(self, "num_workers", 0, 1024)
        _within(self, "shuffle_buffer", 1, 10**6, "images held in memory")


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
            where = f"item {i + 1} {shown(item.strip())}"
            _check(item.strip() != "", "layout", f"item {i + 1} is empty in {shown(self.layout)}; {usage}")
            side, sep, count = item.strip().lower().partition("x")
            _check(sep == "x" and side.strip().isdecimal() and count.strip().isdecimal(), "layout",
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
        _within(self, "latent_dim", 1, MAX_LATENT_DIM)
        _check(1 <= len(self.channels) <= MAX_LEVELS, "channels", f"needs 1 to {MAX_LEVELS} layers, got "
               f"{len(self.channels)}")
        _check(all(1 <= c <= MAX_WIDTH for c in self.channels), "channels",
               f"widths must be in [1, {MAX_WIDTH}], got {shown(self.channels)}")
        _within(self, "res_blocks", 0, 64)
        _within(self, "mixtures", 1, 64)
        _check(self.likelihood in LIKELIHOODS, "likelihood",
               f"must be one of {', '.join(LIKELIHOODS)}, got {shown(self.likelihood)}")
        _within(self, "image_size", 1, MAX_IMAGE_SIZE)
        stride = 2 ** len(self.channels)
        _check(self.image_size >= stride and self.image_size % stride == 0, "image_size",
               f"must be a multiple of 2**len(channels) = {stride}, got {self.image_size}")
        _check(self.kind in MODEL_KINDS, "kind", f"must be one of {', '.join(MODEL_KINDS)}, got {shown(self.kind)}")
        _within(self, "groups", 1, MAX_GROUPS_PER_SIDE * MAX_LEVELS)
        _within(self, "latent_channels", 1, MAX_WIDTH)
        _check(not self.layout.strip() or self.kind == "hierarchical", "layout",
               f"a layout is for kind=hierarchical, got kind={self.kind}: set model.kind=hierarchical or "
               f"model.layout=''")
        if self.kind == "hierarchical" and self.layout.strip():
            pairs = self.layout_groups()
            want = self.hierarchical_latent_dim()
            _check(self.latent_dim == want, "latent_dim",
                   f"kind=hierarchical with layout {shown(self.layout)} ({sum(c for _, c in pairs)} groups of "
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
        _positive(self, "beta", MAX_WEIGHT)
        _within(self, "kl_warmup_steps", 0, MAX_STEPS)
        _within(self, "free_bits", 0, MAX_WEIGHT)
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
    trackers: list[str] = field(default_factory=list)  # more trackers (mlflow, wandb, ...): vae/training/trackers.py
    channels_last: bool = False  # GPU memory layout option
    compile: bool = False  # torch.compile the model (GPU option)
    max_seconds: float = 0.0  # stop after this much training time (benchmarks at equal compute); 0: off
    init_from: str = ""  # a run folder: a new run starts from its latest EMA weights (same model section only)
    collective_timeout_s: float = 300.0  # how long a rank waits for the others (a lost machine) before failing
    optimizer: str = "adamw"  # adamw, or adamax (torch.optim.Adamax: weight_decay is L2 there, not decoupled)
    skip_threshold: float = 0.0  # skip updates whose pre-clip gradient norm exceeds this (counted); 0: off

    def __post_init__(self) -> None:
        _within(self, "steps", 1, MAX_STEPS, "checkpoint names hold eight digits")
        _positive(self, "lr", MAX_LR)
        _within(self, "weight_decay", 0, MAX_WEIGHT)
        _within(self, "warmup_steps", 0, MAX_STEPS)
        _positive(self, "grad_clip", MAX_NORM)
        _check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.mixed_precision in MIXED_PRECISIONS, "mixed_precision",
               f"must be one of {', '.join(MIXED_PRECISIONS)}, got {shown(self.mixed_precision)}")
        _within(self, "checkpoint_every", 1, MAX_STEPS)
        _within(self, "keep_checkpoints", 1, 10**6)
        _within(self, "log_every", 1, MAX_STEPS)
        _within(self, "max_nonfinite", 1, MAX_STEPS)
        _within(self, "grad_accum_steps", 1, MAX_BATCH)
        _within(self, "grids_every", 0, MAX_STEPS)
        _within(self, "max_seconds", 0, MAX_SECONDS, "a year")
        _check(0 <= self.seed < 2**32, "seed",
               f"must be in [0, 2**32 - 1] (numpy and torch seeds), got {shown(self.seed)}")
        _positive(self, "collective_timeout_s", MAX_TIMEOUT_S, "a week")
        _check(self.optimizer in OPTIMIZERS, "optimizer",
               f"must be one of {', '.join(OPTIMIZERS)}, got {shown(self.optimizer)}")
        check_tracker_names(self.trackers, "trackers")
        _check(0 <= self.skip_threshold <= MAX_NORM, "skip_threshold",
               f"must be >= 0 and <= {MAX_NORM:g} (a gradient norm; 0: off), got {shown(self.skip_threshold)}")


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
        _check(1 <= self.k <= MAX_K, "k", f"must be in [1, {MAX_K}], got {shown(self.k)}")
        _within(self, "k_chunk", 1, MAX_K)
        _within(self, "batch_size", 1, MAX_BATCH)
        _check(self.split in ("train", "valid", "test"), "split",
               f"must be train, valid or test, got {shown(self.split)}")
        check_temperatures(self.temperatures, "temperatures")
        _check(2 <= self.sample_images <= MAX_SAMPLE_IMAGES, "sample_images",
               f"must be in [2, {MAX_SAMPLE_IMAGES}] (each figure compares at least two images), got "
               f"{shown(self.sample_images)}")


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
        _check(isinstance(value, list), key, f"expected a list, got {shown(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {shown(value)}")
        _check(finite(value), key, f"expected a finite number, got {shown(value)}")
        return float(value)
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {shown(value)}")
        return value
    if hint is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {shown(value)}")
        return value
    if hint is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` (mixed_precision=no) as false
            value = "yes" if value else "no"
        _check(isinstance(value, str), key, f"expected a string, got {shown(value)}")
        _check(len(value) <= MAX_TEXT, key, f"expected at most {MAX_TEXT} characters, got {len(value)}")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        _check(name in names, _short(key), f"unknown key (known: {', '.join(sorted(names))})")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            _check(isinstance(value, dict), key, f"expected a mapping, got {shown(value)}")
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


def load_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, refused (ConfigError naming `where`) before anything is built when it nests deeper
    than MAX_DEPTH or its aliases expand it past MAX_NODES nodes, counted on the parser's events (no recursion);
    syntax errors and values that cannot be built (an integer past Python's digit limit, a date that does not exist)
    are `yaml.YAMLError`."""
    sizes: dict[str, int] = {}  # anchor -> the nodes it expands to
    opened: list[tuple[str | None, int]] = []  # collections not yet closed: (anchor, nodes before them)
    nodes = 0  # nodes so far, each alias counted at the size of what it repeats
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(opened) >= MAX_DEPTH:
                raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels (the configuration nests three)")
            opened.append((event.anchor, nodes))
            nodes += 1
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, before = opened.pop()
            if anchor is not None:
                sizes[anchor] = nodes - before
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in opened):
                raise ConfigError(f"{where}: alias *{event.anchor} repeats a node that holds it (endless)")
            nodes += sizes.get(event.anchor, 1)  # an unknown anchor: the loader below says so
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        if nodes > MAX_NODES:
            raise ConfigError(f"{where}: more than {MAX_NODES} values once its aliases are expanded (a YAML bomb?)")
    try:
        return yaml.safe_load(text)
    except ValueError as err:
        raise yaml.constructor.ConstructorError(problem=f"a value cannot be read ({one_line(err)[:120]})") from None


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `['train.lr=3e-4', 'model.channels=[32,64]']` into a nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {shown(item)}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {shown(item)}: empty key")
        parts = key.split(".")
        if len(parts) > MAX_DEPTH:
            raise ConfigError(f"override {shown(item)}: the key nests deeper than {MAX_DEPTH} levels")
        try:
            value = load_yaml(raw, f"config key '{_short(key)}'") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
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
            loaded = load_yaml(read_file(path, "yaml", f"config file {path}").decode("utf-8"), f"config file {path}")
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


def config_hash(cfg: Config) -> str:
    """Hash of what defines the model and its training (not where files live): `vae.core.keys.identity`."""
    values = identity(config_to_dict(cfg), config_to_dict(Config()))
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
