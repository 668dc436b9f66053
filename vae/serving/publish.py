"""Publishing a model folder whole: `OUT` is a symbolic link to a hidden sibling that holds one complete export.

    OUT -> .OUT.export-XXXXXXXX/     encoder.onnx decoder.onnx ... model.json metrics.json

A new export is built in a fresh sibling (`.OUT.export-*`), then a new link is renamed over `OUT` in one step,
so a reader that opens `OUT/decoder.onnx` sees the old export or the new one, never a mix; a rename cannot
replace a non-empty folder, a link can. The export a switch replaces stays until the next export into `OUT`
begins, so a reader that resolved the link just before the switch still loads the files it resolved. Exports
into one `OUT` take turns (a lock file beside it), and each one first removes the folders and links that
earlier exports (finished or killed) left behind. A real, non-empty folder at `OUT` (not a link) is refused
rather than overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from vae_runtime.atomic import UMASK, fsync_dir, fsync_tree, naming
from vae_runtime.errors import BadInput


def _stage_prefix(out: Path) -> str:
    return f".{out.name}.export-"


def _link_prefix(out: Path) -> str:
    return f".{out.name}.link-"


def check_out(out: Path) -> None:
    """Refuse an `OUT` that cannot be switched whole, before any work."""
    if out.is_symlink():
        return
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: is a file, not a model folder")
    if out.is_dir() and any(out.iterdir()):
        raise BadInput(f"--out {out}: a non-empty folder, not a link from an earlier export; exports are switched "
                       "in whole through a link, so remove it or choose a new --out")


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the exports `out` no longer links to (the one the last switch replaced, staging folders of killed
    exports) and stray links (never the folder `out` links to)."""
    live = os.readlink(out) if out.is_symlink() else None
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        if entry.name.startswith(_link_prefix(out)) and entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
        elif entry.name.startswith(_stage_prefix(out)) and entry.name != live and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def publishing(out: Path):
    """Yield an empty staging folder; when the block ends without an error, switch `out` to it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.export.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # exports into one OUT take turns; released if this process dies
        check_out(out)
        remove_leftovers(out)
        staging = Path(tempfile.mkdtemp(prefix=_stage_prefix(out), dir=out.parent))
        os.chmod(staging, 0o777 & ~UMASK)  # mkdtemp makes 0700; readers (apps) may be other users
        try:
            with naming(staging):  # an error on a file descriptor (a full disk) names at least the folder written
                yield staging
                fsync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if out.is_dir() and not out.is_symlink():
            out.rmdir()  # empty (check_out): a folder made for this export, e.g. by an earlier tool
        link = out.parent / f"{_link_prefix(out)}{uuid.uuid4().hex[:8]}"
        os.symlink(staging.name, link)  # relative: the pair can move together
        os.replace(link, out)
        fsync_dir(out.parent)  # the replaced export stays for readers that resolved it: removed by the next one
