"""A throw-away PostgreSQL server on a Unix socket, for several search workers on one machine,
for the tests and for the benchmarks (a shared, long-lived server is the database admin's job).

Needs PostgreSQL's server binaries (Debian: ``apt-get install postgresql``). ``initdb`` refuses
to run as root: as root the cluster is created and run as the ``postgres`` system user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError


def postgres_bindir() -> str | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    return str(Path(found[-1]).parent) if found else None


def _version(path: str) -> tuple[int, ...]:
    part = Path(path).parent.parent.name
    return tuple(int(x) for x in part.split(".") if x.isdigit())


@contextmanager
def local_postgres(root: str | Path, database: str = "bnnkit") -> Iterator[str]:
    """Create a cluster in ``root`` (a fresh directory), start it on a socket there, create
    ``database`` and yield its SQLAlchemy URL (``postgresql+psycopg://...``); stop the server
    and delete ``root`` afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        raise ConfigError(
            "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb); "
            "on Debian: apt-get install postgresql"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=False)
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o755)
        for parent in root.resolve().parents:  # the socket must be reachable for the server
            if parent == parent.parent:
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
        prefix = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        r = subprocess.run([*prefix, *cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise ConfigError(f"{Path(cmd[0]).name} failed: {(r.stderr or r.stdout).strip()}")

    run(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    opts = f"-k {sock} -c listen_addresses='' -c fsync=off -c max_connections=100"
    log = str(root / "log")
    run(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", log, "-o", opts, "start")
    try:
        run(f"{bindir}/createdb", "-h", str(sock), "-U", "postgres", database)
        yield f"postgresql+psycopg://postgres@/{database}?host={sock}"
    finally:
        run(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
