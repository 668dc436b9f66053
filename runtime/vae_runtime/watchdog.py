"""Deadlines for onnxruntime runs: one timer thread that ends a run past its deadline (torch-free).

onnxruntime checks a run's `RunOptions.terminate` flag between the nodes it executes, subgraphs included (each
iteration of a `Loop`), and the run then fails with "Exiting due to terminate flag being set to true"; the flag may
be set from any thread while `session.run` (which releases the GIL) is in progress. A graph that would loop for
ever, or a decode far slower than it should be, thus ends at its deadline instead of hanging the caller.

One daemon thread serves every run of the process: starting a `threading.Timer` per call would cost a thread
start on each decode, a noticeable part of a batch-1 call.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from contextlib import contextmanager

import onnxruntime as ort


class _Watchdog:
    def __init__(self):
        self._cond = threading.Condition()
        self._deadlines: list[tuple[float, int]] = []  # a heap of (deadline, ticket)
        self._armed: dict[int, ort.RunOptions] = {}
        self._tickets = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, options: ort.RunOptions, seconds: float) -> int:
        with self._cond:
            ticket = next(self._tickets)
            self._armed[ticket] = options
            heapq.heappush(self._deadlines, (time.monotonic() + seconds, ticket))
            if self._thread is None or not self._thread.is_alive():  # also after a fork, where threads are gone
                self._thread = threading.Thread(target=self._watch, name="onnxruntime-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
            return ticket

    def disarm(self, ticket: int) -> None:
        with self._cond:
            self._armed.pop(ticket, None)  # its heap entry is dropped when it comes up

    def _watch(self) -> None:
        with self._cond:
            while True:
                while self._deadlines and self._deadlines[0][1] not in self._armed:
                    heapq.heappop(self._deadlines)
                if not self._deadlines:
                    self._cond.wait()
                    continue
                deadline, ticket = self._deadlines[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._deadlines)
                self._armed.pop(ticket).terminate = True


_WATCHDOG = _Watchdog()


@contextmanager
def deadline(seconds: float | None):
    """RunOptions for one `session.run`, terminated when the run lasts longer than `seconds` (None: never).
    The caller tells a terminated run by `options.terminate` being set when the run failed."""
    options = ort.RunOptions()
    options.log_severity_level = 4  # onnxruntime would also print the failure: the caller reports it, once
    if seconds is None:
        yield options
        return
    ticket = _WATCHDOG.arm(options, seconds)
    try:
        yield options
    finally:
        _WATCHDOG.disarm(ticket)
