"""Size caps on what the product reads: one named cap per kind of input, each with a default and an override.

Every file or archive member the product reads and did not write itself in this process goes through these
functions, so a crafted input costs at most its cap in memory before it is refused. The size is checked before
reading where the size is known, and the read itself stops one byte past the cap, so a lying header (a zip
member's declared size, a file growing while read) cannot pass either.

A cap is overridden with the environment variable `VAE_MAX_<NAME>_MB` (mebibytes; `VAE_MAX_YAML_MB=4`).
A cap exceeded is `OverCap`, a `BadInput` (one line, exit 2) naming the input, its cap and the variable that
raises it; a reader that skips what is too large (a source image) catches `OverCap` alone.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from vae_runtime.errors import BadInput

MIB = 1 << 20

# name: (default in MiB, what it caps). The defaults leave room for the full CelebA release
# (list_attr_celeba.txt is 26 MB, a manifest of the full dataset about 10 MB). A list's parsed tables take up
# to about fifteen times its bytes (one short line per entry), so its cap stays close to the real files.
CAPS: dict[str, tuple[float, str]] = {
    "yaml": (1, "a YAML config file"),
    "json": (64, "a JSON record (config.json, metrics.json, model.json, champion.json, version.json, a "
             "line of a run's log)"),
    "manifest": (256, "a shard folder's manifest.json"),
    "list": (32, "a partition, attribute or identity list (a file or a zip member)"),
    "image": (256, "one source image (a file or a zip member)"),
    "onnx": (2048, "an ONNX graph file (protobuf's own limit is 2 GiB)"),
    "onnx_data": (65536, "an ONNX graph's external weights file"),
}


class OverCap(BadInput):
    """An input over its size cap."""


def env_name(name: str) -> str:
    return f"VAE_MAX_{name.upper()}_MB"


def cap_bytes(name: str) -> int:
    """The cap `name` in bytes: its environment override, else its default."""
    default_mb, _ = CAPS[name]
    raw = os.environ.get(env_name(name))
    if raw is None or raw.strip() == "":
        return int(default_mb * MIB)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value <= 1 << 40):  # also refuses nan and inf
        raise BadInput(f"${env_name(name)}: {raw[:40]!r} is not a size in MiB (a number in (0, 2**40])")
    return int(value * MIB)


def _shown(size: int) -> str:
    return f"{size / MIB:.1f} MiB" if size >= MIB else f"{size} bytes"


def _over(what: str, name: str, size: int | None) -> OverCap:
    told = f"{_shown(size)}, " if size is not None else ""
    return OverCap(f"{what}: {told}over the {_shown(cap_bytes(name))} cap for {CAPS[name][1]} "
                   f"(set ${env_name(name)} to raise it)")


def check_size(what: str, size: int, name: str) -> None:
    """Refuse `what` when its known `size` in bytes is over the cap `name`."""
    if size > cap_bytes(name):
        raise _over(what, name, size)


def read_stream(stream: BinaryIO, what: str, name: str, chunk: int = 4 * MIB) -> bytes:
    """All of `stream`, refused as soon as it passes the cap `name` (at most cap + one chunk is ever held)."""
    cap = cap_bytes(name)
    parts, total = [], 0
    while True:
        part = stream.read(min(chunk, cap + 1 - total))
        if not part:
            return b"".join(parts)
        parts.append(part)
        total += len(part)
        if total > cap:
            raise _over(what, name, None)


def read_file(path: str | os.PathLike, name: str, what: str | None = None) -> bytes:
    """The bytes of the local file `path`, checked against the cap `name` before and while reading."""
    what = what or str(path)
    with open(path, "rb") as f:
        check_size(what, os.fstat(f.fileno()).st_size, name)
        return read_stream(f, what, name)


def read_last_line(path: str | os.PathLike, name: str, what: str | None = None, chunk: int = 1 << 16) -> bytes:
    """The last non-blank line of the local file `path` (b"" when it has none), read backwards from its end: a
    file of any length costs one line, and a last line (with the blank ones after it) over the cap `name` is
    refused."""
    what = what or f"{path}: its last line"
    cap = cap_bytes(name)
    parts, held, text_seen = [], 0, False  # chunks from the end backwards; whether one held more than blanks
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            part = f.read(end - start)
            end = start
            parts.append(part)
            held += len(part)
            text = part if text_seen else part.rstrip()
            text_seen = text_seen or bool(text)
            if b"\n" in text:  # the line starts in this chunk
                break
            if held > cap + 1:
                raise _over(what, name, None)
    body = b"".join(reversed(parts)).rstrip()
    line = body[body.rfind(b"\n") + 1:].strip()
    if len(line) > cap:
        raise _over(what, name, None)
    return line


def read_text(path: str | os.PathLike, name: str, what: str | None = None) -> str:
    """`read_file` decoded as UTF-8; undecodable bytes are one line naming the file."""
    what = what or str(path)
    data = read_file(path, name, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInput(f"{what}: not UTF-8 text (byte {err.start})") from None
