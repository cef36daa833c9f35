import os

import pytest
import torch

os.environ.setdefault("PL_DISABLE_FORK", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def install_ood_root(root, monkeypatch):
    """Point $BNNKIT_DATA at ``root``, holding only a small synthetic mnist.npz, so that the OOD
    partner of Fashion-MNIST is present whatever the machine has (Fashion-MNIST itself is still
    found in the standard locations)."""
    import numpy as np

    from bnnkit.data import sources

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


@pytest.fixture
def ood_root(tmp_path_factory, monkeypatch):
    """$BNNKIT_DATA with a small synthetic MNIST (:func:`install_ood_root`)."""
    return install_ood_root(tmp_path_factory.mktemp("ood_data"), monkeypatch)


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL cluster on a Unix socket (Debian's postgresql package; initdb
    runs as the postgres user when the tests run as root) in a temporary directory of its own,
    stopped and removed afterwards, also when tests fail."""
    from bnnkit.search.localdb import local_postgres, postgres_bindir

    if postgres_bindir() is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    with local_postgres() as url:
        yield url
