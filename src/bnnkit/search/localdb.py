"""A throw-away PostgreSQL server on a Unix socket, for several search workers on one machine,
for the tests and for the benchmarks (a shared, long-lived server is the database admin's job).

Needs PostgreSQL's server binaries (Debian: ``apt-get install postgresql``). ``initdb`` refuses
to run as root: as root the cluster is created and run as the ``postgres`` system user, in a
directory of its own that user owns; no other directory's permissions are changed.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
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
def local_postgres(root: str | Path | None = None, database: str = "bnnkit") -> Iterator[str]:
    """Create a cluster in ``root`` (a fresh directory; default: a new temporary directory),
    start it on a socket there, create ``database`` and yield its SQLAlchemy URL
    (``postgresql+psycopg://...``); stop the server and delete ``root`` afterwards, also when
    the block or the start fails.

    As root, ``root`` is handed to the ``postgres`` user, which must be able to reach it: a
    ``root`` under a directory closed to other users is refused (leave it unset: the default
    temporary directory is reachable)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise ConfigError(
            "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb); "
            "on Debian: apt-get install postgresql"
        )
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="bnnkit-pg-"))
    else:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=False)
    prefix: list[str] = []
    started = False
    data, sock = root / "data", root / "sock"

    def run(*cmd: str) -> None:
        r = subprocess.run([*prefix, *cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise ConfigError(f"{Path(cmd[0]).name} failed: {(r.stderr or r.stdout).strip()}")

    try:
        sock.mkdir()
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            for p in (root, sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
                os.chmod(p, 0o700)
            prefix = ["runuser", "-u", "postgres", "--"]
            reach = subprocess.run([*prefix, "test", "-w", str(sock)], capture_output=True)
            if reach.returncode != 0:
                raise ConfigError(
                    f"the postgres user cannot reach {root} (a directory above it is closed to "
                    "other users); leave root unset for a temporary directory it can reach, "
                    f"or choose one under such a directory (e.g. {tempfile.gettempdir()})"
                )
        run(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        opts = f"-k {sock} -c listen_addresses='' -c fsync=off -c max_connections=100"
        started = True  # from here on a server may run, even if the start reports a failure
        run(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(root / "log"), "-o", opts,
            "start")  # fmt: skip
        run(f"{bindir}/createdb", "-h", str(sock), "-U", "postgres", database)
        yield f"postgresql+psycopg://postgres@/{database}?host={sock}"
    finally:
        try:
            status = [*prefix, f"{bindir}/pg_ctl", "-D", str(data), "status"]
            if started and subprocess.run(status, capture_output=True).returncode == 0:
                run(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-m", "immediate", "stop")
        finally:
            shutil.rmtree(root, ignore_errors=True)
