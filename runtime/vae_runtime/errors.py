"""The product's error types: bad input (exit 2) versus a failed run (exit 1), and the app's runtime errors.

The CLI turns `BadInput` into one line on stderr and exit code 2; any other `VaeError` is a run that
failed for a reason we can name (exit 1). Both carry a message meant for a person, naming the input.
The runtime (`vae_runtime.models` and the modules below it) raises `RuntimeModelError` for a model or an input it
cannot use and `RunTimeout` for a run it ended; apps catch them as ValueError too.
"""

import reprlib


def one_line(err: BaseException) -> str:
    """An error from a library (a store's client, onnxruntime, ...) as one line: its type and first line."""
    text = str(err).splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class VaeError(Exception):
    """A failure with a message fit for one line on stderr."""


class BadInput(VaeError, ValueError):
    """Bad usage, configuration or input data: the caller must fix something (exit code 2)."""


class ConfigError(BadInput):
    """An unknown key, wrong type or impossible value in the configuration."""


class TrainingError(VaeError):
    """Training cannot go on (for example: non-finite losses that persist)."""


class RuntimeModelError(ValueError):
    """The model file or the input given to it is not usable; the message names which."""


class RunTimeout(RuntimeModelError):
    """A run passed its timeout and was ended: a graph that runs too long, or a machine too slow for it."""


def shown(value, limit: int = 60) -> str:
    """`value` as a one-line message shows it: its repr cut to `limit` characters and "...", computed without
    walking all of it (a value expanded from YAML aliases, or nested thousands deep, costs a few items)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict = 3, 4
    short.maxlist = short.maxtuple = short.maxset = 6
    short.maxstring = short.maxlong = short.maxother = limit + 10
    try:
        text = short.repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        text = f"<{type(value).__name__} too large to show>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
