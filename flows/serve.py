"""A local Prefect stack for operations (`make serve`), on Prefect's own commands:

    prefect server start --background --host 127.0.0.1 --port PORT --analytics-off
    prefect server status --wait --timeout 120
    prefect work-pool create POOL --type process --overwrite
    prefect --no-prompt deploy --name NAME --pool POOL          # each of prefect.yaml's deployments asked for
    prefect worker start --pool POOL --type process             # in the background: the one part Prefect lacks

    python -m flows.serve start [--port 4200] [--pool local]    # `make serve`
    python -m flows.serve stop                                   # `make serve-stop`
    python -m flows.serve status

The server keeps its own PID file (`PREFECT_HOME/server.pid`) and `prefect server stop` ends it. What stays here is
what Prefect does not do: a worker in the background (Prefect's worker runs in the foreground only), started in a
session of its own with its log in `PREFECT_HOME/worker.log` and its PID in `PREFECT_HOME/serve.json`, and stopped
with the flow runs it started (they run in sessions of their own, so a signal to its group misses them); and a stop
that waits until the server has exited (`prefect server stop` sends SIGTERM and returns). The server runs on SQLite
under PREFECT_HOME, or on the database of PREFECT_SERVER_DATABASE_CONNECTION_URL (e.g. PostgreSQL). The end-to-end
test drives the same functions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.project_dir import ENV as PROJECT_DIR_ENV
from vae_runtime.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 4200
DEFAULT_POOL = "local"
DEPLOYMENTS = ("demo", "celeba-64")  # deployed by default
KNOWN_DEPLOYMENTS = (*DEPLOYMENTS, "watch-celeba")  # watch-celeba: retrain when the source gains images
SERVER_PID_FILE = "server.pid"  # Prefect's own (prefect.cli._server_utils)


def default_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or REPO / ".prefect")


def prefect_cli() -> list[str]:
    """The `prefect` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("prefect")
    if script.exists():
        return [str(script)]
    found = shutil.which("prefect")
    if found is None:
        raise SystemExit("serve: the `prefect` command is not installed in this environment")
    return [found]


@dataclass
class Stack:
    """Where a local stack lives and how to reach it; `procs` holds the processes this interpreter started."""

    home: Path
    port: int = DEFAULT_PORT
    pool: str = DEFAULT_POOL
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. a shorter worker polling interval
    database_url: str | None = None  # e.g. postgresql+asyncpg://...; None: SQLite under PREFECT_HOME

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def pid_file(self) -> Path:
        return self.home / "serve.json"

    def server_pid(self) -> int | None:
        """The PID Prefect recorded for its background server, if any."""
        try:
            return int((self.home / SERVER_PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def env(self) -> dict[str, str]:
        """The environment of every Prefect client and process of this stack."""
        env = dict(os.environ, PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url,
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", ORT_DISABLE_TELEMETRY="1",
                   PYTHONUNBUFFERED="1")
        env[PROJECT_DIR_ENV] = str(REPO)  # the deployments' pull step runs flows from this checkout
        # Flow runs import this checkout's code (flows, vae, pipeline), whatever is installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        if self.database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.database_url
        return {**env, **self.extra_env}

    def recorded(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads(self.pid_file.read_text()).get("pids", {}).items()}
        except (OSError, ValueError):
            return {}

    def record(self, name: str, pid: int) -> None:
        pids = {**self.recorded(), name: pid}
        atomic_write_json(self.pid_file, {"port": self.port, "pool": self.pool, "pids": pids})


def cli(stack: Stack, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run a `prefect` CLI command against the stack; raise with the output's tail when it fails."""
    done = subprocess.run([*prefect_cli(), *args], cwd=REPO, env=stack.env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"prefect {' '.join(args)} exited with code {done.returncode}:\n{tail}")
    return done


def start_server(stack: Stack, timeout: int = 120) -> None:
    """Prefect's background server, then its own wait until the API answers (it refuses a busy port)."""
    stack.home.mkdir(parents=True, exist_ok=True)
    cli(stack, "server", "start", "--background", "--host", "127.0.0.1", "--port", str(stack.port), "--analytics-off")
    try:
        cli(stack, "server", "status", "--wait", "--timeout", str(timeout), timeout=timeout + 60)
    except RuntimeError as err:
        pid = stack.server_pid()
        alive = pid is not None and _alive(pid, None)
        raise RuntimeError(f"{err}\n(the server, pid {pid}, is {'running' if alive else 'not running'}; "
                           f"`prefect server start --port {stack.port}` in the foreground shows its log)") from None


def create_pool(stack: Stack) -> None:
    cli(stack, "work-pool", "create", stack.pool, "--type", "process", "--overwrite")


def deploy(stack: Stack, names: tuple[str, ...] = DEPLOYMENTS) -> None:
    """`prefect deploy` from prefect.yaml. One call per deployment: with several names `prefect deploy` ignores
    `--pool`."""
    for name in names:
        cli(stack, "--no-prompt", "deploy", "--name", name, "--pool", stack.pool)


def start_worker(stack: Stack) -> subprocess.Popen:
    """`prefect worker start` in a session of its own, output to `PREFECT_HOME/worker.log`; the PID is recorded
    at once, so `stop` finds it even after a failed start."""
    with open(stack.home / "worker.log", "ab") as log:
        proc = subprocess.Popen([*prefect_cli(), "worker", "start", "--pool", stack.pool, "--type", "process"],
                                cwd=REPO, env=stack.env(), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    stack.procs["worker"] = proc
    stack.record("worker", proc.pid)
    return proc


def start(stack: Stack, names: tuple[str, ...] = DEPLOYMENTS) -> Stack:
    """Server, pool, deployments, worker; on any failure, stop what was started and re-raise."""
    try:
        start_server(stack)
        create_pool(stack)
        deploy(stack, names)
        start_worker(stack)
    except BaseException:
        stop(stack)
        raise
    return stack


def _descendants(pid: int) -> list[int]:
    """PIDs below `pid` (Linux /proc), so children in other sessions (flow runs) are stopped too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _is_ours(pid: int) -> bool:
    """Guard against a recycled PID: only signal what still looks like the process we started (the worker is
    `prefect worker ...`, Prefect's background server `python -m uvicorn ... prefect.server...`)."""
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc").is_dir()


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: list[int], grace: float, proc: subprocess.Popen | None = None) -> None:
    """Wait up to `grace` seconds for `pids` (and `proc`, when given) to exit."""
    deadline = time.time() + grace
    while time.time() < deadline and ((proc is not None and proc.poll() is None) or any(_alive(p, None) for p in pids)):
        time.sleep(0.2)


def stop_pid(pid: int, proc: subprocess.Popen | None = None, grace: float = 15.0, group: bool = True) -> None:
    """SIGTERM the process (its group, when it leads one) and its descendants; SIGKILL what is left after
    `grace`."""
    if proc is None and not _is_ours(pid):
        return
    below = _descendants(pid)
    _signal(pid, signal.SIGTERM, group=group)
    for child in below:
        _signal(child, signal.SIGTERM, group=False)
    _wait_gone(below if proc is not None else [pid, *below], grace, proc)
    for child in [*below, *_descendants(pid)]:
        _signal(child, signal.SIGKILL, group=False)
    _signal(pid, signal.SIGKILL, group=group)
    if proc is not None:
        proc.wait(timeout=10)


def stop_server(stack: Stack, grace: float = 15.0) -> bool:
    """`prefect server stop`, then wait for the server to exit (SIGKILL after `grace`); True if one was running."""
    pid = stack.server_pid()
    if pid is None:
        return False
    ours = _is_ours(pid)
    below = _descendants(pid) if ours else []
    cli(stack, "server", "stop")  # also clears a stale PID file
    _wait_gone([pid, *below] if ours else [], grace)
    for left in [pid, *below] if ours else []:
        if _alive(left, None):
            _signal(left, signal.SIGKILL, group=False)
    return True


def stop(stack: Stack) -> list[str]:
    """Stop the worker (with its flow runs), then the server; forget them."""
    pids = stack.recorded()
    stopped = []
    for name in sorted(set(pids) | set(stack.procs)):  # the worker (and any other recorded process)
        proc = stack.procs.get(name)
        stop_pid(proc.pid if proc is not None else pids[name], proc)
        stopped.append(name)
    stack.pid_file.unlink(missing_ok=True)
    stack.procs.clear()
    if stop_server(stack):
        stopped.append("server")
    return stopped


def deployment_names(text: str) -> tuple[str, ...]:
    """`demo,celeba-64` as names, each one of prefect.yaml's."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(KNOWN_DEPLOYMENTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(KNOWN_DEPLOYMENTS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)))
    parser.add_argument("--pool", default=os.environ.get("POOL", DEFAULT_POOL))
    parser.add_argument("--home", default=None, help="PREFECT_HOME (default: $PREFECT_HOME or .prefect)")
    parser.add_argument("--deployments", type=deployment_names, default=DEPLOYMENTS,
                        help=f"which of prefect.yaml's deployments, comma-separated (default: "
                             f"{','.join(DEPLOYMENTS)}; also watch-celeba, the retraining on new images); leave out "
                             "celeba-64 on a machine that must not retrain weekly")
    args = parser.parse_args(argv)
    stack = Stack(Path(args.home) if args.home else default_home(), args.port, args.pool)
    if args.command == "stop":
        stopped = stop(stack)
        print(f"stopped {', '.join(stopped)}" if stopped else "nothing recorded to stop")
        return 0
    if args.command == "status":
        server = stack.server_pid()
        pids = {**stack.recorded(), **({"server": server} if server else {})}
        for name, pid in pids.items():
            print(f"{name}: pid {pid} {'running' if _alive(pid, None) else 'not running'}")
        return 0 if pids else 1
    if stack.recorded() or stack.server_pid():
        print(f"serve: a stack is already recorded in {stack.home}; run `make serve-stop` first", file=sys.stderr)
        return 2
    try:
        start(stack, args.deployments)
    except RuntimeError as err:
        print(f"serve: {err}", file=sys.stderr)
        return 1
    print(f"Prefect server  {stack.api_url} (UI http://127.0.0.1:{stack.port}; `prefect server stop` ends it)")
    print(f"work pool       {stack.pool} (process), worker pid {stack.procs['worker'].pid}, log in {stack.home}")
    print(f"deployments     {', '.join('train-vae/' + n for n in args.deployments)}")
    print(f"next            export PREFECT_API_URL={stack.api_url}")
    print("                prefect deployment run train-vae/demo --watch")
    print("stop            make serve-stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
