"""The JSON records the product reads back, and the type of each of their fields, checked on read (torch-free).

A record is read from disk or a store after any process, person or tool may have edited it: `champion.json` and a
version's `version.json` (the registry), a model folder's `model.json`, a run's `config.json`, `metrics.json` and
`train_log.jsonl` lines. `load(data, schema, where)` parses one and `check(record, schema, where)` checks it, so the
code that uses a field can trust its type: a record whose JSON is damaged, nested past the parser's depth, or whose
field has another type is refused in one line naming the file and the field (`RecordError`, bad input; a reader
passes its own error type where its callers expect one).

A schema maps each field to its kind: `str`, `int`, `NUMBER`, `dict`, `list`, `ListOf(kind)`, `MapOf(kind)` or a
nested schema (a dict). Fields not in the schema are left alone (records written by later versions); a field may
be absent or null unless the schema lists it in `REQUIRED`. `finite(value)` says whether a field is a `NUMBER` that
is finite (what promotion and export ask of a score).
"""

from __future__ import annotations

import json
import math

from vae_runtime.errors import BadInput

NUMBER = "number"  # an int or a float (never a bool: JSON's true is not 1)
REQUIRED = "__required__"  # a schema's key listing the fields that must be present and not null


def finite(value) -> bool:
    """Whether `value` is a `NUMBER` that is finite (an integer too large for a float, 10**400, is not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


class RecordError(BadInput):
    """A record that is not valid JSON, or whose fields do not have the types this project writes."""


class ListOf:
    """A JSON array whose items are all of one kind."""

    def __init__(self, item):
        self.item = item


class MapOf:
    """A JSON object whose values are all of one kind (its keys are any strings)."""

    def __init__(self, item):
        self.item = item


def load(data: bytes | str, schema: dict, where: str, what: str = "a record of this project",
         error: type[Exception] = RecordError) -> dict:
    """The record in `data` (JSON), checked against `schema`; `error` naming `where` when it is not `what`."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise error(f"{where}: not valid JSON ({str(err).splitlines()[0]})") from None
    except RecursionError:  # the parser's own depth limit: no record this project writes nests past a few levels
        raise error(f"{where}: not {what} (JSON nested too deeply)") from None
    return check(record, schema, where, what, error)


def check(record, schema: dict, where: str, what: str = "a record of this project",
          error: type[Exception] = RecordError) -> dict:
    """`record` when it is a JSON object whose fields have the kinds `schema` gives; else `error` naming `where`
    and the first field that does not: "WHERE: not WHAT ('FIELD' is a string, expected a JSON array)"."""
    problem = _problem(record, schema, "")
    if problem is not None:
        raise error(f"{where}: not {what} ({problem})")
    return record


def _problem(value, kind, field: str) -> str | None:
    """What is wrong with `value` as `kind` at `field` (dotted; `[i]` for list items), or None."""
    name = f"'{field}'" if field else "it"
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            return f"{name} is {_a(type(value))}, expected {_a(dict)}"
        for key in kind.get(REQUIRED, ()):
            if value.get(key) is None:
                return f"no '{field + '.' if field else ''}{key}'"
        return _first(_problem(value[key], sub, _at(field, key)) for key, sub in kind.items()
                      if key != REQUIRED and value.get(key) is not None)
    if isinstance(kind, (ListOf, MapOf)):
        container = list if isinstance(kind, ListOf) else dict
        if not isinstance(value, container):
            return f"{name} is {_a(type(value))}, expected {_a(container)}"
        items = enumerate(value) if container is list else value.items()
        return _first(_problem(item, kind.item, f"{field}[{key}]" if container is list else _at(field, key))
                      for key, item in items)
    if kind == NUMBER:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    return None if ok else f"{name} is {_a(type(value))}, expected {_a(kind)}"


def _first(problems) -> str | None:
    return next((problem for problem in problems if problem is not None), None)


def _at(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


KIND_NAMES = {type(None): "null", bool: "true or false", dict: "a JSON object", list: "a JSON array", str: "a string",
              int: "an integer", float: "a number", NUMBER: "a number"}


def _a(kind) -> str:
    return KIND_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


# -- the records ------------------------------------------------------------------------------------------------

# the primary sample figure promotion compares (vae/serving/promotion.py: sample_primary)
SAMPLE_PRIMARY = {"metric": str, "of": str, "temperature": NUMBER, "value": NUMBER, "stderr": NUMBER, "measure": str,
                  "temperatures": ListOf(NUMBER), "n_images": int}
# what a champion was promoted on (vae/serving/promotion.py: evidence_of)
EVIDENCE = {"split": str, "split_fingerprint": str, "k": int, "image_size": int, "nll_bpd": NUMBER,
            "elbo_bpd": NUMBER, "n_images": int, "shards": str, "config_hash": str, "weights_sha256": str,
            "model_step": int, "sample_primary": SAMPLE_PRIMARY}
# REGISTRY/train-vae/champion.json (records from before `evidence` carry nll_bpd, split and k at the top)
CHAMPION = {REQUIRED: ("version",), "version": str, "path": str, "record_sha256": str, "evidence": EVIDENCE,
            "run": str, "promoted_at": str, "nll_bpd": NUMBER, "split": str, "k": int,
            "rollback": {"reason": str, "from": str}, "rolled_back": ListOf(str)}
# REGISTRY/train-vae/aliases/<alias>.json: the version an operator's alias names, its record pinned like the champion's
ALIAS = {REQUIRED: ("version",), "alias": str, "version": str, "record_sha256": str, "set_at": str}
# REGISTRY/train-vae/notes/<version>.json: what is said about a version after it was published (it is immutable)
NOTES = {"version": str, "tags": MapOf(str), "archived": {"reason": str, "at": str}}
# REGISTRY/train-vae/versions/<version>/version.json: every file's sha256
VERSION = {REQUIRED: ("files",), "version": str, "files": MapOf(str)}
# evaluation's metrics.json, as far as `vae info` and the registry read it
METRICS = {"split": str, "k": int, "n_images": int, "nll_bpd": NUMBER, "elbo_bpd": NUMBER, "run": str,
           "samples": {"primary": dict, "prior": MapOf(dict), "floor": dict, "measure": str}}
# a model folder's model.json (vae/serving/export.py writes it; the graphs' metadata_props carry the same card)
PREPROCESSING = {"crop": int, "size": int}
DEFAULT_CROP = 148  # CelebA's aligned faces: the centred square that holds the face (0: the largest square)


def recorded_crop(preprocessing: dict | None) -> int:
    """The crop a preprocessing record (a run's, a model card's) names, else the default crop: what images given
    to that model are cropped to."""
    crop = (preprocessing or {}).get("crop")
    return crop if isinstance(crop, int) and not isinstance(crop, bool) else DEFAULT_CROP


MODEL_CARD = {"contract_version": str, "latent_dim": int, "image_size": int, "channels": int, "likelihood": str,
              "version": str, "created": str, "config_hash": str, "step": int, "weights": str, "weights_sha256": str,
              "temperature": NUMBER, "preprocessing": PREPROCESSING, "metrics": METRICS, "validation": dict,
              "files": ListOf(str), "sha256": MapOf(str)}
# a run's config.json: the config hash and the configuration it trained with, as `vae info` reads them
RUN_CONFIG = {"format_version": int, "config_hash": str, "config": {"train": {"steps": int}}}
# a line of a run's train_log.jsonl
LOG_LINE = {REQUIRED: ("step",), "step": int}
