"""Argument types the `vae` subcommands share: each checks one flag's value and says in one line what it expected
(argparse turns `ArgumentTypeError` into the usage error `vae CMD: error: ...`, exit 2)."""

from __future__ import annotations

import argparse

from vae.core.config import MAX_K


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def bounded(low: int, high: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}] ({what}), got {text}")
        return value
    return parse


SEED = bounded(0, 2**63 - 1, "a non-negative seed")
K = bounded(1, MAX_K, "importance samples; the config caps eval.k the same way")


def wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    return value


WAIT_HELP = "seconds to wait while another process holds the {} (default 0: refuse at once, naming it)"
