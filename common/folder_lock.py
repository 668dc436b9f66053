"""One writer at a time in a folder: a run folder (`vae train`) or a shard folder (`vae data shard`).

`hold(folder, what, wait_s)` takes the folder's lock before anything in it is read or written, and returns it
held; a second process is refused with one line (`FolderBusy`, exit 2) naming the folder and the holder's pid and
host, or waits up to `wait_s` seconds for it first. The holder writes its pid, host and start time into the lock
so that a refused process can name it.

- A local folder: an exclusive `fcntl.flock` on `FOLDER/.lock`. The kernel drops it when the holder's last file
  descriptor closes, so a process killed in any way (SIGKILL included) leaves no stale lock; the file itself
  stays (deleting it would let two processes lock two different files). Child processes started with the
  descriptor passed on (`pass_fds`) keep it held until they end too. On NFS, Linux emulates flock with NFS
  byte-range locks (NFSv4, or NFSv3 with lockd), so it holds across clients; a `nolock` mount keeps it local to
  one client.
- Object storage (an fsspec URL): a lease object `FOLDER/.lock` with an expiry, created only where absent
  (`storage.create_if_absent`: `If-None-Match: *` on S3) and renewed by a daemon thread with compare-and-swap
  (`If-Match` on its ETag). A lease past its expiry, by this machine's clock (a killed holder's), is taken over
  the same compare-and-swap way, so two takers cannot both win. A holder whose lease was taken over (it stalled
  past the expiry) finds out at its next renewal: `check()` then raises before it writes more.

A process started by a holder for the same work (the ranks of `vae train --num-processes N`) is told so through
`HELD_ENV` (`for_children`) and does not take the lock again.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

from vae_runtime import storage
from vae_runtime.errors import BadInput, VaeError

LOCK_NAME = ".lock"
HELD_ENV = "VAE_HELD_LOCK"  # "PID:LOCK" of a lock a parent holds for its child processes
LEASE_S = 60.0  # an object-store lease lives this long unless renewed (every LEASE_S / 4)
POLL_S = 0.2  # how often a waiting process tries again (object stores: at most every LEASE_S / 10)


class FolderBusy(BadInput):
    """The folder is held by another process (exit 2: wait for it, or use another folder)."""


class LeaseLost(VaeError):
    """This process's lease on an object-store folder expired and another process took it over."""


def hold(folder: str | os.PathLike, what: str, wait_s: float = 0.0, lease_s: float = LEASE_S):
    """The lock on `folder` (a local path or an fsspec URL), held by this process until `release()` (or the
    `with` block's end, or the process's end); `what` names the folder in messages ("run folder"). Refused with
    `FolderBusy` when another process holds it, after waiting up to `wait_s` seconds for it."""
    folder = str(folder)
    lock = _Lease(folder, what, lease_s) if storage.is_url(folder) else _FileLock(folder, what)
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        holder = lock.try_take()
        if holder is None:
            return lock
        if holder is INHERITED:
            return _Inherited()
        if time.monotonic() >= deadline:
            waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
            hint = "" if wait_s > 0 else "; wait for it to end, or pass --wait SECONDS to wait for it"
            raise FolderBusy(f"{what} {folder}: in use by {_describe(holder)}{waited}{hint}")
        time.sleep(min(lock.poll_s, max(0.0, deadline - time.monotonic())) or 0.01)


INHERITED = object()  # try_take's answer when a parent holds the lock for this process


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (it has not written its pid yet)"
    text = f"pid {holder.get('pid')} on {holder.get('host')}"
    return text + (f" (since {holder['started']})" if holder.get("started") else "")


def _parse(data: bytes) -> dict | None:
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


class _Held:
    """What every held lock offers: `release()`, `check()` and use as a context manager."""

    def release(self) -> None:
        pass

    def check(self) -> None:
        """Raise if this process no longer holds the lock (a lease taken over); a local lock always holds."""

    def for_children(self) -> tuple[dict, tuple]:
        """(environment, file descriptors) to start child processes that work under this lock with: they keep it
        held while they run, and do not take it again (`HELD_ENV`)."""
        return {}, ()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Inherited(_Held):
    """A lock a parent process holds for this one: nothing to take or release here."""


class _FileLock(_Held):
    """`flock` on FOLDER/.lock (see the module's docstring)."""

    poll_s = POLL_S

    def __init__(self, folder: str, what: str):
        self.folder, self.what = folder, what
        self.path = os.path.realpath(os.path.join(storage.local_path(folder), LOCK_NAME))
        self.fd: int | None = None
        self.created = False  # this process made the folder: removed again on release if nothing else came in

    def try_take(self):
        """None when taken; else the holder's record (or INHERITED)."""
        if not os.path.isdir(os.path.dirname(self.path)):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.created = True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._holder()
        except OSError as err:
            os.close(fd)
            raise VaeError(f"{self.what} {self.folder}: cannot lock {self.path} ({err.strerror or err}); on NFS "
                           "the lock needs NFSv4 or lockd (a mount without 'nolock')") from None
        if not _same_file(fd, self.path):  # the holder we waited for removed the folder it had made: again
            os.close(fd)
            return self.try_take()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record()).encode(), 0)
        os.fsync(fd)  # visible to a refused process on another NFS client
        self.fd = fd
        return None

    def _holder(self):
        inherited_pid, _, inherited_path = os.environ.get(HELD_ENV, "").partition(":")
        holder = None
        for _ in range(10):  # the holder writes its record right after locking: give it a moment
            try:
                with open(self.path, "rb") as f:
                    holder = _parse(f.read())
            except FileNotFoundError:
                holder = None
            if holder:
                break
            time.sleep(0.05)
        if holder and inherited_path == self.path and str(holder.get("pid")) == inherited_pid \
                and holder.get("host") == socket.gethostname():
            return INHERITED
        return holder or {}

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # no record of a holder that is gone
        folder = os.path.dirname(self.path)
        if self.created and os.listdir(folder) == [LOCK_NAME]:  # refused before any work: leave no folder behind
            os.unlink(self.path)  # (a process waiting on this file sees it gone once it locks it, and looks again)
            os.rmdir(folder)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def for_children(self) -> tuple[dict, tuple]:
        return {HELD_ENV: f"{os.getpid()}:{self.path}"}, (self.fd,)


def _same_file(fd: int, path: str) -> bool:
    """Whether the open file `fd` is still the file at `path` (not unlinked meanwhile)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


class _Lease(_Held):
    """A lease object FOLDER/.lock on object storage (see the module's docstring)."""

    def __init__(self, folder: str, what: str, lease_s: float):
        self.folder, self.what, self.lease_s = folder, what, float(lease_s)
        self.url = storage.join(folder, LOCK_NAME)
        self.poll_s = max(POLL_S, min(2.0, self.lease_s / 10))
        self.token = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._mutex = threading.Lock()  # a renewal and the release never overlap
        self._nonce = uuid.uuid4().hex
        self._started = _record()

    def _lease_bytes(self) -> bytes:
        # wall-clock time: the expiry is read by other machines
        return json.dumps({**self._started, "lease": self._nonce, "lease_s": self.lease_s,
                           "expires": time.time() + self.lease_s}).encode()

    def try_take(self):
        """None when taken; else the holder's record."""
        for _ in range(10):  # the object may change between our steps: look again
            if storage.create_if_absent(self.url, self._lease_bytes()):
                return self._taken()
            data, token = storage.read_versioned(self.url)
            if data is None:
                continue  # released meanwhile
            holder = _parse(data)
            if holder is None or not isinstance(holder.get("expires"), (int, float)):
                raise BadInput(f"{self.what} {self.folder}: {self.url} is not a lease this project writes; "
                               "remove it if no process is writing the folder")
            if holder["expires"] > time.time():
                return holder
            if storage.replace_if_unchanged(self.url, token, self._lease_bytes()):  # an expired lease: ours now
                print(f"{self.what} {self.folder}: took over the expired lease of {_describe(holder)}",
                      file=sys.stderr)
                return self._taken()
        return {}

    def _taken(self):
        """After our write won: the token to renew with, and the renewing thread. None (taken), or {} when
        another process took it over in the instant since (it found ours expired: a clock far off)."""
        data, token = storage.read_versioned(self.url)
        if (_parse(data or b"null") or {}).get("lease") != self._nonce:
            return {}
        self.token = token
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease {self.url}")
        self._renewer.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._mutex:
                if self._stop.is_set():
                    return
                try:
                    renewed = storage.replace_if_unchanged(self.url, self.token, self._lease_bytes())
                    if renewed:
                        self.token = storage.read_versioned(self.url)[1]
                except OSError as err:  # the store did not answer: try again; the lease holds until it expires
                    print(f"{self.what} {self.folder}: lease not renewed ({err}); trying again", file=sys.stderr)
                    continue
                if not renewed:
                    self.lost = (f"{self.what} {self.folder}: this process's lease {self.url} expired and was "
                                 "taken over by another process; stopped before writing more")
                    print(self.lost, file=sys.stderr)
                    return

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        with self._mutex:
            if self.token is not None and not self.lost:
                try:
                    storage.remove_if_unchanged(self.url, self.token)
                except OSError:  # left to expire
                    pass
            self.token = None
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=5)
