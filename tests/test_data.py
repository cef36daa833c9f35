import gzip
import http.server
import struct
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from bnnkit import ConfigError, DataError, InputError
from bnnkit.data import (
    CORRUPTIONS,
    corrupt,
    download,
    load_bundle,
    rotate_by,
    sources,
    train_val_indices,
)
from bnnkit.data.corruptions import _dct_matrix, jpeg_quantize


def write_idx_images(path, arr, compress=True):
    data = struct.pack(">IIII", 2051, *arr.shape) + arr.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def write_idx_labels(path, arr, compress=True):
    data = struct.pack(">II", 2049, len(arr)) + arr.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.fixture
def tiny_root(tmp_path, monkeypatch):
    """A $BNNKIT_DATA with small Fashion-MNIST and MNIST look-alikes (random pixels)."""
    rng = np.random.default_rng(0)
    fm = tmp_path / "fashion-mnist"
    fm.mkdir()
    for split, n in (("train", 300), ("t10k", 100)):
        write_idx_images(fm / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx_labels(fm / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        y_train=np.arange(50, dtype=np.uint8) % 10,
        x_test=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        y_test=np.arange(40, dtype=np.uint8) % 10,
    )
    monkeypatch.setenv("BNNKIT_DATA", str(tmp_path))
    monkeypatch.setattr(sources, "_CACHE", {})
    return tmp_path


def test_bnnkit_data_is_searched_first(tiny_root):
    b = load_bundle("fashion_mnist", val_size=50)
    assert (len(b.train), len(b.val), len(b.test)) == (250, 50, 100)
    assert b.train.x.dtype == torch.uint8 and b.train.x.shape[1:] == (1, 28, 28)
    assert len(b.ood["mnist"]) == 40
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10


def test_grey_cifar10_matches_pillow_and_is_a_fashion_mnist_ood_partner(tiny_root):
    """cifar10_grey = PIL's convert("L") (BT.601 luma) then an antialiased bilinear resize to
    28x28: the independent reference is Pillow itself, within one grey level of rounding."""
    from PIL import Image

    rng = np.random.default_rng(1)
    # smooth-ish images (a random field upsampled) plus noise: both regimes of the resize
    base = rng.integers(0, 256, (30, 8, 8, 3)).repeat(4, 1).repeat(4, 2)
    imgs = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    np.savez(tiny_root / "cifar10_test.npz", x_test=imgs, y_test=np.arange(30) % 10)
    x, y = sources.load_split("cifar10_grey", "test")
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(y, torch.arange(30) % 10)
    for i in range(30):
        ref = np.asarray(Image.fromarray(imgs[i]).convert("L").resize((28, 28), Image.BILINEAR))
        assert np.abs(x[i, 0].numpy().astype(int) - ref.astype(int)).max() <= 1
    b = load_bundle("fashion_mnist", val_size=50)
    assert torch.equal(b.ood["cifar10_grey"].x, x)


def test_grey_resize_refuses_non_rgb_uint8():
    from bnnkit.data.transforms import grey_resize

    with pytest.raises(ValueError, match=r"uint8 \[N, 3, H, W\]"):
        grey_resize(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), (28, 28))
    with pytest.raises(ValueError, match="uint8"):
        grey_resize(torch.zeros(2, 3, 32, 32), (28, 28))


def test_subset_and_split_are_deterministic_and_disjoint():
    tr, va = train_val_indices(1000, 100, seed=3)
    tr2, va2 = train_val_indices(1000, 100, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert len(tr) + len(va) == 1000
    with pytest.raises(ConfigError, match="val_size"):
        train_val_indices(10, 10, 0)


def test_subset_keeps_validation_fixed(tiny_root):
    a = load_bundle("fashion_mnist", val_size=50, subset=20)
    b = load_bundle("fashion_mnist", val_size=50)
    assert len(a.train) == 20
    assert torch.equal(a.val.x, b.val.x)


def test_missing_dataset_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "search_roots", lambda: [tmp_path])
    monkeypatch.setattr(sources, "_CACHE", {})
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_bundle("fashion_mnist")
    with pytest.raises(ConfigError, match="unknown data set 'imagenet'.*cifar10"):
        load_bundle("imagenet")


def test_truncated_and_foreign_idx_files(tmp_path):
    p = tmp_path / "x.idx"
    p.write_bytes(struct.pack(">IIII", 2051, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        sources.read_idx(p)
    p.write_bytes(b"\x00\x00\x08\x99" + b"\0" * 20)
    with pytest.raises(DataError, match="not an idx file"):
        sources.read_idx(p)
    q = tmp_path / "y.npz"
    np.savez(q, a=np.zeros(3))
    with pytest.raises(DataError, match="lacks arrays"):
        sources.read_npz(q, ["x_test"])
    q.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="cannot read"):
        sources.read_npz(q, ["x_test"])


@pytest.fixture
def http_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "blob.bin").write_bytes(b"bnnkit test payload" * 100)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_sha256(http_server, tmp_path):
    import hashlib

    good = hashlib.sha256(b"bnnkit test payload" * 100).hexdigest()
    dest = tmp_path / "out" / "blob.bin"
    download(f"{http_server}/blob.bin", dest, good)
    assert dest.read_bytes() == b"bnnkit test payload" * 100
    bad_dest = tmp_path / "out" / "bad.bin"
    with pytest.raises(DataError, match="checksum mismatch"):
        download(f"{http_server}/blob.bin", bad_dest, "0" * 64)
    assert not bad_dest.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["blob.bin"]  # no partial files
    with pytest.raises(DataError, match="failed"):
        download(f"{http_server}/missing.bin", tmp_path / "m.bin", good)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_are_deterministic_bounded_and_grow_with_severity(name):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g)
    a = corrupt(x, name, 3, seed=5)
    b = corrupt(x, name, 3, seed=5)
    assert torch.equal(a, b)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    d1 = (corrupt(x, name, 1, seed=5) - x).abs().mean()
    d5 = (corrupt(x, name, 5, seed=5) - x).abs().mean()
    assert d5 > d1 > 0
    grey = corrupt(torch.rand(4, 1, 28, 28), name, 2)
    assert grey.shape == (4, 1, 28, 28)


def test_corruption_errors():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        corrupt(x, "fog", 1)
    with pytest.raises(InputError, match="severity"):
        corrupt(x, "contrast", 6)


def test_rotation_by_angle():
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(rotate_by(x, 0.0), x, atol=1e-5, rtol=0)
    r90 = rotate_by(x, 90.0)
    candidates = [torch.rot90(x, k, dims=(2, 3)) for k in (1, -1)]
    assert min((r90 - c).abs().max().item() for c in candidates) < 1e-4
    back = rotate_by(rotate_by(x, 90.0), -90.0)
    torch.testing.assert_close(back, x, atol=1e-4, rtol=0)


def test_jpeg_dct_is_orthonormal_and_high_quality_is_near_identity():
    D = _dct_matrix()
    torch.testing.assert_close(D @ D.T, torch.eye(8), atol=1e-6, rtol=0)
    x = torch.rand(2, 3, 32, 32)
    smooth = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    err100 = (jpeg_quantize(smooth, 100) - smooth).abs().mean()
    err40 = (jpeg_quantize(smooth, 40) - smooth).abs().mean()
    assert err100 < 0.01 < err40 or err100 < err40


def test_empty_dataset_is_an_error(tmp_path, monkeypatch):
    fm = tmp_path / "fashion-mnist"
    fm.mkdir()
    for split in ("train", "t10k"):
        write_idx_images(fm / f"{split}-images-idx3-ubyte.gz", np.zeros((0, 28, 28)))
        write_idx_labels(fm / f"{split}-labels-idx1-ubyte.gz", np.zeros(0))
    monkeypatch.setenv("BNNKIT_DATA", str(tmp_path))
    monkeypatch.setattr(sources, "_CACHE", {})
    with pytest.raises(DataError, match="is empty"):
        sources.load_split("fashion_mnist", "train")


def test_verify_reports_checksums(tiny_root):
    rows = dict((name, status) for name, _, status in sources.verify("fashion_mnist"))
    # the fixture's random pixels are not the real data set: a mismatch, reported, not hidden
    assert all(s.startswith("MISMATCH") for s in rows.values()) and len(rows) == 4


FM_DEB = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FM_DEB.is_dir(), reason="needs Debian's dataset-fashion-mnist files")
def test_download_fashion_mnist_end_to_end_from_a_mirror(tmp_path, monkeypatch, capsys):
    """`bnnkit data --download fashion_mnist` against a local HTTP server serving the real
    gzip idx files (re-gzipped, as mirrors do): verified on content, stored, then found."""
    import gzip
    import shutil

    from bnnkit.cli import main

    served = tmp_path / "served" / "fashion-mnist"
    served.mkdir(parents=True)
    for f in FM_DEB.glob("*.gz"):
        with gzip.open(f, "rb") as src, gzip.open(served / f.name, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst)  # other gzip bytes, same content

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(tmp_path / "served"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = tmp_path / "store"
    monkeypatch.setenv("BNNKIT_DATA", str(store))
    monkeypatch.setenv("BNNKIT_DATA_MIRROR", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(sources, "search_roots", lambda: [store])
    monkeypatch.setattr(sources, "_CACHE", {})
    try:
        assert main(["data", "--download", "fashion_mnist", "--no-verify"]) == 0
        assert "downloaded 4 file(s)" in capsys.readouterr().out
        assert sorted(p.name for p in (store / "fashion-mnist").iterdir()) == sorted(
            p.name for p in FM_DEB.glob("*.gz")
        )
        assert main(["data", "--download", "fashion_mnist", "--no-verify"]) == 0
        assert "already present" in capsys.readouterr().out
        # a damaged file on the mirror: refused, nothing kept
        (store / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
        with gzip.open(served / "t10k-labels-idx1-ubyte.gz", "wb") as dst:
            dst.write(b"\x00\x00\x08\x01" + b"\x00" * 20)
        assert main(["data", "--download", "fashion_mnist", "--no-verify"]) == 2
        err = capsys.readouterr().err
        assert "checksum mismatch" in err and err.count("\n") == 1
        assert not (store / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()
        assert [p.name for p in (store / "fashion-mnist").iterdir() if p.name.startswith(".")] == []
    finally:
        server.shutdown()


# ---------------------------------------------------------------- the split cache


def _write_mnist(path, seed, n=30):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, x_train=x, y_train=y, x_test=x, y_test=y)
    tmp.replace(path)
    return torch.from_numpy(x)[:, None], torch.from_numpy(y).long()


def test_split_cache_follows_the_files_it_read(tmp_path, monkeypatch):
    """A changed $BNNKIT_DATA, a file replaced by another one, or a file rewritten in place
    (same size) is read again; unchanged files are read once."""
    import os

    monkeypatch.setattr(sources, "_CACHE", {})
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    xa, ya = _write_mnist(a / "mnist.npz", 1)
    xb, yb = _write_mnist(b / "mnist.npz", 2)
    reads = []
    real = sources.read_npz
    monkeypatch.setattr(sources, "read_npz", lambda p, k: reads.append(p) or real(p, k))
    for root, (x, y) in ((a, (xa, ya)), (b, (xb, yb)), (a, (xa, ya))):
        monkeypatch.setenv("BNNKIT_DATA", str(root))
        got = sources.load_split("mnist", "test")
        assert torch.equal(got[0], x) and torch.equal(got[1], y), root
    n = len(reads)
    sources.load_split("mnist", "test")
    assert len(reads) == n  # unchanged files: served from the cache
    xc, yc = _write_mnist(a / "mnist.npz", 3)  # replaced (a new file under the same name)
    assert torch.equal(sources.load_split("mnist", "test")[0], xc)
    p = a / "mnist.npz"
    st = p.stat()
    xd, _ = _write_mnist(a / "mnist.npz.new", 4)
    p.write_bytes((a / "mnist.npz.new").read_bytes())  # same size, same inode, new contents
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert p.stat().st_ino == st.st_ino and p.stat().st_size == st.st_size
    assert torch.equal(sources.load_split("mnist", "test")[0], xd)


def test_split_cache_hands_out_no_shared_tensors(tmp_path, monkeypatch):
    """A caller writing into what it got (normalising in place, say) changes nothing for the
    next caller: plain splits, derived sets and bundles."""
    monkeypatch.setattr(sources, "_CACHE", {})
    monkeypatch.setenv("BNNKIT_DATA", str(tmp_path))
    x, y = _write_mnist(tmp_path / "mnist.npz", 5, n=60)
    imgs = np.random.default_rng(6).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10_test.npz", x_test=imgs, y_test=np.arange(12) % 10)
    grey = sources.load_split("cifar10_grey", "test")[0].clone()
    for _ in range(2):
        gx, gy = sources.load_split("mnist", "test")
        assert torch.equal(gx, x) and torch.equal(gy, y)
        gx.zero_(), gy.fill_(3)
        cx, _ = sources.load_split("cifar10", "test")
        cx.fill_(255)
        assert torch.equal(sources.load_split("cifar10_grey", "test")[0], grey)
        b = load_bundle("mnist", val_size=10, ood=[])
        assert torch.equal(b.test.x, x) and torch.equal(b.test.y, y)
        b.test.x.mul_(0), b.train.y.add_(1)


# ---------------------------------------------------------------- `bnnkit data` and mirrors


@pytest.fixture
def fake_fm(tmp_path, monkeypatch):
    """Only ``tmp_path`` is searched; it holds small Fashion-MNIST look-alikes whose recorded
    checksums are patched to theirs, and a random mnist.npz (a mismatch)."""
    monkeypatch.setattr(sources, "search_roots", lambda: [tmp_path])
    monkeypatch.setattr(sources, "_CACHE", {})
    fm = tmp_path / "fashion-mnist"
    fm.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx_images(fm / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx_labels(fm / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    for files in sources.DATASETS["fashion_mnist"].files.values():
        for f in files:
            digest = sources.sha256_file(tmp_path / f.name, decompress=True)
            monkeypatch.setattr(f, "sha256", (digest,))
    _write_mnist(tmp_path / "mnist.npz", 0)
    return tmp_path


def test_data_command_fails_on_a_missing_or_damaged_data_set(fake_fm, capsys):
    from bnnkit.cli import main

    # the default set is fine, but a file present (mnist.npz) fails its check
    assert main(["data"]) == 2
    out, err = capsys.readouterr()
    assert "MISMATCH" in out and err.startswith("bnnkit: error: mnist: ")
    assert "does not match" in err and "bnnkit data --download mnist" in err
    assert main(["data", "--no-verify"]) == 0  # not checked, so not known to be damaged
    capsys.readouterr()
    (fake_fm / "mnist.npz").unlink()
    assert main(["data"]) == 0  # optional sets may be missing: listed with how to get them
    out = capsys.readouterr().out
    assert "svhn" in out and "MISSING" in out and "to get it" in out
    assert main(["data", "fashion_mnist"]) == 0
    capsys.readouterr()
    # named data sets must be there
    assert main(["data", "fashion_mnist", "svhn"]) == 2
    err = capsys.readouterr().err
    assert "svhn is missing; to get it: convert SVHN" in err and "fashion_mnist" not in err
    # a damaged file of a data set without a download source: replace it by hand
    (fake_fm / "cifar100_test.npz").write_bytes(b"PK\x03\x04not an npz")
    assert main(["data", "cifar100"]) == 2
    err = capsys.readouterr().err
    assert "replace it with the original file" in err
    # the default set missing: a failure even with no names, naming the fix
    for p in (fake_fm / "fashion-mnist").iterdir():
        p.unlink()
    assert main(["data", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "fashion_mnist is missing" in err and "apt-get install -y dataset-fashion-mnist" in err
    assert main(["data", "nonesuch"]) == 2
    assert "unknown data set 'nonesuch'" in capsys.readouterr().err


def test_mirror_download_accepts_any_recorded_checksum_and_only_those(
    http_server, tmp_path, monkeypatch, capsys
):
    """A mirror's mnist.npz is checked against every accepted sha256 (not only the first)."""
    import hashlib

    from bnnkit.cli import main

    served = b"bnnkit test payload" * 100  # the fixture's blob, served as mnist.npz below
    good = hashlib.sha256(served).hexdigest()
    store = tmp_path / "store"
    monkeypatch.setenv("BNNKIT_DATA", str(store))
    monkeypatch.setattr(sources, "search_roots", lambda: [store])
    monkeypatch.setattr(sources, "_CACHE", {})
    (tmp_path / "served" / "mnist.npz").write_bytes(served)
    monkeypatch.setenv("BNNKIT_DATA_MIRROR", http_server)
    monkeypatch.setattr(sources._MNIST_FILE, "sha256", ("0" * 64, good))
    assert sources.fetch("mnist") == [store / "mnist.npz"]
    assert (store / "mnist.npz").read_bytes() == served
    (store / "mnist.npz").unlink()
    monkeypatch.setattr(sources._MNIST_FILE, "sha256", ("0" * 64, "1" * 64))
    assert main(["data", "--download", "mnist", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "1" * 64 in err and "0" * 64 in err
    assert list(store.iterdir()) == []


# ------------------------------------------------------------------ corrupt(): input checks


@pytest.mark.timeout(60)
def test_corrupt_refuses_images_outside_0_1_and_non_finite_values():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 1.0, 0.0
    for name in CORRUPTIONS:
        with pytest.raises(InputError, match=r"values in \[0, 255\].*divide by 255"):
            corrupt(x * 255, name, 2)
    with pytest.raises(InputError, match=r"values in \[-1, 1\]"):
        corrupt(x * 2 - 1, "contrast", 2)
    y = x.clone()
    y[2, 1, 5, 5] = float("nan")
    with pytest.raises(InputError, match="non-finite"):
        corrupt(y, "contrast", 2)
    edge = x.clone()
    edge[0, 0, 0, 0] = 1 + 5e-7  # float rounding: accepted
    assert corrupt(edge, "contrast", 2).shape == x.shape


@pytest.mark.timeout(60)
def test_corrupt_on_an_empty_batch_gives_an_empty_result_for_every_name(recwarn):
    for shape, dtype in (((3, 32, 32), torch.float32), ((1, 28, 28), torch.float64)):
        empty = torch.rand(2, *shape, dtype=dtype)[:0]
        for name in CORRUPTIONS:
            for severity in (1, 5):
                out = corrupt(empty, name, severity, seed=2)
                assert out.shape == (0, *shape) and out.dtype == dtype, name
            g = torch.Generator().manual_seed(0)
            assert CORRUPTIONS[name](empty.float(), 3, g).shape == (0, *shape), name
    assert rotate_by(torch.rand(0, 1, 28, 28), 30.0).shape == (0, 1, 28, 28)
    assert not [str(w.message) for w in recwarn.list]


@pytest.mark.timeout(60)
def test_corrupt_takes_int_seeds_and_severities_only():
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for bad in (None, 1.5, "1", True, -1, 2**63, 2**64):
        with pytest.raises(InputError, match=r"seed must be an int in 0\.\.2\*\*63-1, got "):
            corrupt(x, "gaussian_noise", 2, seed=bad)
    top = corrupt(x, "gaussian_noise", 2, seed=2**63 - 1)
    assert not torch.equal(top, corrupt(x, "gaussian_noise", 2, seed=2**63 - 2))
    assert torch.equal(corrupt(x, "rotate", 2, seed=np.int64(4)), corrupt(x, "rotate", 2, 4))
    for bad in (1.5, "2", True, 0, 6):
        with pytest.raises(InputError, match="severity must be an integer in 1..5"):
            corrupt(x, "contrast", bad)


@pytest.mark.timeout(60)
def test_corruption_names_match_in_any_case_and_none_means_none():
    from bnnkit.data.corruptions import corruption_names
    from bnnkit.data.mnist_c import MNIST_C

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    want = corrupt(x, "gaussian_noise", 3, seed=1)
    for spelling in ("Gaussian_Noise", " gaussian_noise ", "GAUSSIAN_NOISE"):
        assert torch.equal(corrupt(x, spelling, 3, seed=1), want)
    assert corruption_names("ALL") == corruption_names(["all"]) == list(CORRUPTIONS)
    for nothing in ("", "none", "None", [], ["NONE"]):
        assert corruption_names(nothing) == []
    assert corruption_names("Contrast, jpeg,contrast") == ["contrast", "jpeg"]
    with pytest.raises(ConfigError, match="'all' cannot be combined"):
        corruption_names("all,contrast")
    with pytest.raises(ConfigError) as e:
        corruption_names("contrast,fog,zoom")
    msg = str(e.value)
    assert "['fog', 'zoom']" in msg and "'fog' is an MNIST-C corruption" in msg
    assert "--mnist-c" in msg and ", ".join(CORRUPTIONS) in msg  # the registry's order
    with pytest.raises(ConfigError) as e:
        corrupt(x, "zigzag", 1)
    assert "MNIST-C" in str(e.value) and ", ".join(CORRUPTIONS) in str(e.value)
    assert set(MNIST_C) & set(CORRUPTIONS)  # names of both families are plain names here
    assert corruption_names("rotate,shot_noise") == ["rotate", "shot_noise"]
    with pytest.raises(InputError, match=r"x\[:, None\]") as e:
        corrupt(x[:, 0], "contrast", 1)
    assert "to_float" not in str(e.value)
    with pytest.raises(InputError, match="to_float"):
        corrupt((x * 255).to(torch.uint8), "contrast", 1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 12, 10)])
def test_corrupt_gives_image_i_the_same_result_whatever_the_batch_size(shape):
    """Image i's corruption depends only on (seed, name, severity, i): a prefix of a batch is
    corrupted as in the whole batch. Before, gaussian_noise and speckle_noise broke this on
    images whose pixel count is not a multiple of 16 (torch's normal sampler redraws a
    tensor's last group of 16), e.g. 1 x 12 x 10. The random draws agree exactly; the two
    blurs may differ in the last float bit for a single image (torch's convolution picks
    another algorithm for a batch of one)."""
    x = torch.rand(20, *shape, generator=torch.Generator().manual_seed(4))
    for name in CORRUPTIONS:
        whole = corrupt(x, name, 4, seed=6)
        for k in (1, 3, 11):
            part = corrupt(x[:k], name, 4, seed=6)
            if name in ("gaussian_blur", "defocus_blur"):
                torch.testing.assert_close(part, whole[:k], atol=1e-6, rtol=0)
            else:
                assert torch.equal(part, whole[:k]), (name, k)
