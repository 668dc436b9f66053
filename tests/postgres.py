"""A throwaway PostgreSQL server for tests: Debian's binaries, a fresh cluster in a temporary folder, trust
authentication on 127.0.0.1 and a free port, stopped and removed afterwards. `initdb` refuses to run as root, so
as root the cluster belongs to the `postgres` user the package creates. Skips, saying why, without PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from common.net import free_port


def binaries() -> Path | None:
    """The folder of `initdb` and `pg_ctl`: the newest /usr/lib/postgresql/*/bin, else the PATH's."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_database(name: str = "prefect"):
    """Yield an SQLAlchemy asyncpg URL of a new database `name` on a new PostgreSQL server."""
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql when it can: "
                    "apt-get install postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb refuses root")
    root = Path(tempfile.mkdtemp(prefix="vae-pg-"))
    os.chmod(root, 0o755)
    data, sockets = root / "data", root / "sockets"
    for folder in (data, sockets):
        folder.mkdir()
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
    port = free_port()
    try:
        subprocess.run(_as_owner([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                  "--no-sync", "-E", "UTF8"]), check=True, capture_output=True)
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                                  str(sockets / "server.log"), "-w", "start"]), check=True, capture_output=True)
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name],
                       check=True, capture_output=True)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{name}", port
    finally:
        subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def query(port: int, sql: str, database: str = "prefect") -> str:
    """One value from `psql` (tuples only, unaligned)."""
    psql = (binaries() or Path("/usr/bin")) / "psql"
    done = subprocess.run([str(psql), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", database, "-tA",
                           "-c", sql], check=True, capture_output=True, text=True)
    return done.stdout.strip()
