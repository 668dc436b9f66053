"""Several processes: `accelerate launch` command lines for training and evaluation, and the process group's
teardown.

On CPU the launched script creates `Accelerator(cpu=True)`, which makes a real gloo process group (STACK.md:
`accelerate launch --cpu` would start one process, and without cpu=True each process trains alone); on GPUs
the same command gives NCCL. Several machines add --num_machines, --machine_rank and --main_process_ip.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from common.net import free_port


def launch_command(module: str, args: list[str], num_processes: int, num_machines: int = 1,
                   machine_rank: int = 0, main_process_ip: str | None = None,
                   main_process_port: int | None = None, accelerate_config: str | None = None) -> list[str]:
    """`accelerate launch` running `python -m module args` on `num_processes` processes per machine.

    With `accelerate_config` (e.g. deploy/accelerate/8gpu.yaml) the file sets processes and machines."""
    if accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
        if num_machines > 1 or machine_rank:  # the file may set the machine count; a rank given is never dropped
            cmd += ["--machine_rank", str(machine_rank)]
        if main_process_ip:
            cmd += ["--main_process_ip", main_process_ip]
        return cmd + ["-m", module, *args]
    port = main_process_port or (free_port() if num_machines == 1 else 29500)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(num_processes * num_machines), "--num_machines", str(num_machines),
           "--machine_rank", str(machine_rank), "--main_process_port", str(port),
           # precision is the script's own config (Accelerator(mixed_precision=...)); say so to the launcher
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if main_process_ip:
        cmd += ["--main_process_ip", main_process_ip]
    return cmd + ["-m", module, *args]


def run_launched(module: str, args: list[str], num_processes: int, log: str | os.PathLike | None = None,
                 env: dict | None = None, pass_fds: tuple = (), **kwargs) -> int:
    """Run the launcher and wait; SIGTERM and SIGINT sent to this process are passed on to it (and by it to
    every rank), so a preempted `vae train` stops all ranks with a checkpoint rather than orphaning them.

    With `log`, everything the launcher and the ranks write to stderr also goes to that file, and the console
    gets it up to the first traceback: after that only the ranks' one-line messages (`vae: ...`) and a pointer
    to the file, so a failure reads as one line rather than the launcher's report.
    `env` adds to the launcher's environment and `pass_fds` are descriptors it keeps open (a folder lock held for
    the ranks: `common.folder_lock`, so that a launcher outliving this process still holds it).
    Returns the launcher's exit code, or 143 when it ended after a forwarded SIGTERM."""
    proc = subprocess.Popen(launch_command(module, args, num_processes, **kwargs),
                            stderr=subprocess.PIPE if log else None, env=dict(os.environ, **env) if env else None,
                            pass_fds=pass_fds)
    pump = threading.Thread(target=_pump, args=(proc.stderr, Path(log)), daemon=True) if log else None
    if pump is not None:
        pump.start()
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        proc.send_signal(signum)

    try:
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: signals stay where they are
        previous = {}
    try:
        code = proc.wait()
        if pump is not None:
            pump.join(timeout=10)
        # the launcher reports its own SIGTERM as a failure even when every rank stopped cleanly
        return 143 if code != 0 and signal.SIGTERM in forwarded else code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _pump(stream, log: Path) -> None:
    """Copy the launcher's stderr to `log` and to the console, the console only until the first traceback."""
    log.parent.mkdir(parents=True, exist_ok=True)
    quiet, pending = False, b""
    with open(log, "ab") as out:
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            out.write(chunk)
            out.flush()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                quiet = quiet or line.lstrip(b"\r").startswith((b"Traceback (most recent call last)", b"[rank")) \
                    or re.match(rb"[EWF]\d{4} ", line) is not None  # torch.distributed.elastic's error log
                if not quiet or line.startswith((b"vae: ", b"vae train: ")):
                    sys.stderr.buffer.write(line + b"\n")
            if pending.startswith(b"\r") and not quiet:  # a progress bar redrawing its line
                sys.stderr.buffer.write(pending)
                pending = b""
            sys.stderr.buffer.flush()
        if quiet:
            sys.stderr.write(f"(the launcher's full report is in {log})\n")
            sys.stderr.flush()


def end_process_group() -> None:
    """Tear the process group down before exit: a gloo group left alive can abort the interpreter at exit
    ('terminate called without an active exception')."""
    import torch  # lazy: the launcher side of this module runs without torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
