"""Worker processes that end with the process that started them: no orphans, and nothing printed.

A pool worker whose parent was killed (SIGKILL) would otherwise finish the tasks already sent to it, fail to send
each result back (BrokenPipeError) and print a traceback onto the terminal it shares with its dead parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal this process gets when its parent dies


def end_with_parent(parent: int) -> None:
    """Make the calling process end the moment `parent` (the pid of its parent) dies: killed by the kernel where
    it can (Linux), else by a thread that watches the parent; already an orphan, it ends now."""
    if not _kernel_kills_on_parent_death():
        threading.Thread(target=_watch, args=(parent,), name="end-with-parent", daemon=True).start()
    if os.getppid() != parent:  # the parent died before it was watched
        os._exit(0)


def _kernel_kills_on_parent_death() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError, TypeError):  # no prctl: not Linux
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.05)
    os._exit(0)  # quietly: no exit handlers, no traceback
