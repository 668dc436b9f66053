"""The `vae` command: data synth/shard, train, eval, score, export, sample, encode, info, registry rollback, config
show. Each subcommand group is a module here with its command functions and `add_commands(sub)`, the builder of its
parsers; this module assembles them and maps errors to exit codes.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr), 1 a failed run. Heavy imports happen
inside each subcommand so `vae --help`, `vae sample` and `vae encode` stay fast (they never import torch).
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version

from vae_runtime.errors import BadInput, VaeError
from vae.cli import config, data, export, info, registry, runtime, score, train
from vae.cli import eval as evaluation  # `eval` alone would hide the builtin

COMMANDS = (info, registry, config, data, train, evaluation, score, export, runtime)  # in `vae --help`'s order


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2 (`vae CMD --help` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    try:
        return version("vae-pipeline")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vae", description="Train, evaluate and export VAEs on CelebA.")
    parser.add_argument("--version", action="version", version=f"vae-pipeline {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_commands(sub)
    return parser


def _os_error(err: OSError) -> str:
    """`FILE: reason`; the reason alone where the error names no file (the writers name theirs: vae_runtime.atomic)."""
    reason = err.strerror or str(err)
    return f"{err.filename}: {reason}" if err.filename else reason


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error (2, one line already printed)
        return int(done.code or 0)
    try:
        return args.func(args)
    except BadInput as err:
        print(f"vae: error: {err}", file=sys.stderr)
        return 2
    except (PermissionError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as err:
        print(f"vae: error: {_os_error(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the input: disk full, I/O errors
        print(f"vae: failed: {_os_error(err)}", file=sys.stderr)
        return 1
    except VaeError as err:
        print(f"vae: failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vae: interrupted", file=sys.stderr)
        return 130
