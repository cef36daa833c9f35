import os

import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def ood_root(tmp_path_factory, monkeypatch):
    """$BNNKIT_DATA holding only a small synthetic mnist.npz, so that the OOD partner of
    Fashion-MNIST is present whatever the machine has (Fashion-MNIST itself is still found in
    the standard locations)."""
    import numpy as np

    from bnnkit.data import sources

    root = tmp_path_factory.mktemp("ood_data")
    rng = np.random.default_rng(0)
    np.savez(
        root / "mnist.npz",
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=np.arange(20, dtype=np.uint8) % 10,
        x_test=rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
        y_test=np.arange(200, dtype=np.uint8) % 10,
    )
    monkeypatch.setenv("BNNKIT_DATA", str(root))
    monkeypatch.setattr(sources, "_CACHE", {})
    return root


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A throw-away PostgreSQL cluster on a Unix socket (Debian's postgresql package; initdb
    runs as the postgres user when the tests run as root), stopped and removed afterwards."""
    import glob
    import os
    import pwd
    import shutil
    import subprocess

    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    bindir = bindirs[-1]
    root = tmp_path_factory.mktemp("postgres")
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    prefix = []
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in (root, sock):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o755)
        for parent in root.parents:  # the socket path must be reachable for the server user
            if parent == parent.parent:
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
        prefix = ["runuser", "-u", "postgres", "--"]

    def run(*cmd):
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True)

    run(f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    opts = f"-k {sock} -c listen_addresses='' -c fsync=off -c max_connections=50"
    run(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(root / "log"), "-o", opts, "start")
    try:
        run(f"{bindir}/createdb", "-h", str(sock), "-U", "postgres", "bnnkit")
        yield f"postgresql+psycopg://postgres@/bnnkit?host={sock}"
    finally:
        run(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
