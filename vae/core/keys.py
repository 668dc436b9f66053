"""Config keys by what they mean to a run, side by side: which lie outside the model's identity (`config_hash`
leaves them out) and which may change when a run resumes (the resume check lets them differ from the checkpoint's).

A key is a dotted path (`train.steps`); an entry ending in "." names a whole section (`eval.`). Every other key
defines what is trained: it enters the hash and must stay as it was on resume.
"""

from __future__ import annotations

# Where the run's files live and how long it waits for others: never part of what was trained (a path such as
# `eval.inception_weights` names a file, whose identity the metrics record by its sha256). Outside the identity,
# and free to change on resume.
LOCATIONS = ("run_dir", "data.shards", "data.num_workers", "train.init_from", "train.collective_timeout_s",
             "eval.inception_weights")

# How long the run trains and how often it checkpoints, logs and draws: part of the identity (two runs of other
# lengths are other models), free to change on resume (a run may be extended or its cadence changed).
SCHEDULE = ("train.steps", "train.max_seconds", "train.checkpoint_every", "train.log_every", "train.grids_every",
            "train.keep_checkpoints", "train.tensorboard", "train.trackers", "train.max_nonfinite")

# How a run is evaluated: part of the identity, free to change on resume (evaluation does not change the weights).
EVALUATION = ("eval.",)

# Keys added after configs were shipped: outside the identity while at their default, so the hash of a config
# written before them does not move; set otherwise, they enter it like any other key. A checkpoint written before
# one of them existed reads it as its default (the resume check, `vae.core.checkpoint.resume_differences`).
ADDED_LATER = ("eval.temperatures", "eval.sample_images", "objective.loss_per_dim", "train.optimizer",
               "train.skip_threshold", "data.flip", "model.layout", "objective.kl_balance", "train.trackers")

# The two lists the rest of the project reads.
OUTSIDE_IDENTITY = LOCATIONS
CHANGE_ON_RESUME = LOCATIONS + SCHEDULE + EVALUATION


def names(key: str, entries: tuple[str, ...]) -> bool:
    """Whether `entries` name `key`: the key itself, or a section ("eval.") holding it."""
    return any(key == entry or (entry.endswith(".") and key.startswith(entry)) for entry in entries)


def flat(values: dict, prefix: str = "") -> dict:
    """A nested config dict as {"section.key": value}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def identity(values: dict, defaults: dict) -> dict:
    """The part of a config dict (`config_to_dict`) that identifies the model, nested as given: every key but
    those outside the identity, and those added later while at their default (`defaults`: the defaults' dict)."""
    default = flat(defaults)
    dropped = [key for key, value in flat(values).items() if names(key, OUTSIDE_IDENTITY)
               or (names(key, ADDED_LATER) and value == default.get(key))]
    kept = _copy(values)
    for key in dropped:
        *sections, name = key.split(".")
        section = kept
        for part in sections:
            section = section[part]
        section.pop(name)
    return kept


def _copy(values: dict) -> dict:
    return {key: _copy(value) if isinstance(value, dict) else value for key, value in values.items()}
