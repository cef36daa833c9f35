"""Where real data sets live, how to read them, and an opt-in checksummed download.

Search order for every data set: ``$BNNKIT_DATA``, then ``~/.cache/bnnkit``, then the known
system locations (Debian's ``/usr/share/datasets`` for Fashion-MNIST) and a ``shared/datasets``
folder beside the project checkout. Nothing is ever downloaded unless asked for
(``bnnkit data --download NAME`` or ``download=True``), and every download is verified
against a sha256 before it is moved into place.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, unknown_name
from .transforms import grey_resize

_PROJECT_ROOT = Path(__file__).resolve().parents[3]

#: the data set the commands use when none is named (`bnnkit data` requires it)
DEFAULT_DATASET = "fashion_mnist"


def search_roots() -> list[Path]:
    roots = []
    env = os.environ.get("BNNKIT_DATA")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(Path.home() / ".cache" / "bnnkit")
    roots.append(Path("/usr/share/datasets"))
    roots.append(_PROJECT_ROOT.parent / "shared" / "datasets")
    return roots


def download_root() -> Path:
    env = os.environ.get("BNNKIT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bnnkit"


def sha256_file(path: Path, decompress: bool = False, gzipped: bool | None = None) -> str:
    """sha256 of a file, or of its gzip-decompressed content (``decompress``; a ``.gz`` name
    or ``gzipped=True`` says it is gzip)."""
    h = hashlib.sha256()
    if gzipped is None:
        gzipped = str(path).endswith(".gz")
    opener = gzip.open if decompress and gzipped else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str,
    dest: Path,
    sha256: str | tuple[str, ...] | None = None,
    timeout: float = 60.0,
    decompressed_sha256: tuple[str, ...] | None = None,
) -> Path:
    """Fetch ``url`` to ``dest`` atomically and durably (a temporary file in ``dest``'s folder,
    fsynced, then renamed); raise :class:`DataError` on a checksum mismatch, keeping nothing.

    ``sha256``: digest of the bytes as served, or a tuple of accepted digests.
    ``decompressed_sha256``: accepted digests of the gzip-decompressed bytes instead (mirrors
    re-gzip idx files, so only their content is stable)."""
    from .. import io

    dest = Path(dest)
    accepted = (sha256,) if isinstance(sha256, str) else sha256

    def fetch_into(tmp: str) -> None:
        h = hashlib.sha256()
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if accepted is not None and h.hexdigest() not in accepted:
            raise DataError(
                f"checksum mismatch for {url}: expected sha256 {' or '.join(accepted)}, got "
                f"{h.hexdigest()}; the file was not kept. Retry, or fetch it by hand and check it."
            )
        if decompressed_sha256 is not None:
            try:
                digest = sha256_file(Path(tmp), decompress=True, gzipped=True)
            except (OSError, EOFError) as e:
                raise DataError(f"{url} is not a gzip file ({e}); the file was not kept") from e
            if digest not in decompressed_sha256:
                raise DataError(
                    f"checksum mismatch for {url} (decompressed): got sha256 {digest}, expected "
                    f"{' or '.join(decompressed_sha256)}; the file was not kept"
                )

    try:
        io.atomic_write(dest, fetch_into)
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"download of {url} failed: {e}") from e
    return dest


# ---------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed): images (magic 2051) or labels (2049)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read idx file {path}: {e}; reinstall or re-download it") from e
    if len(data) < 8:
        raise DataError(f"{path} is too short to be an idx file")
    magic = struct.unpack(">I", data[:4])[0]
    if magic == 2051:
        n, h, w = struct.unpack(">III", data[4:16])
        arr = np.frombuffer(data, np.uint8, offset=16)
        if arr.size != n * h * w:
            raise DataError(f"{path} is truncated: header says {n}x{h}x{w}, found {arr.size} bytes")
        return arr.reshape(n, h, w)
    if magic == 2049:
        n = struct.unpack(">I", data[4:8])[0]
        arr = np.frombuffer(data, np.uint8, offset=8)
        if arr.size != n:
            raise DataError(f"{path} is truncated: header says {n} labels, found {arr.size}")
        return arr
    raise DataError(f"{path} is not an idx file (magic {magic}, expected 2049 or 2051)")


def read_npz(path: Path, keys: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in keys if k not in d.files]
            if missing:
                raise DataError(f"{path} lacks arrays {missing}; it has {d.files}")
            return {k: d[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; the file may be truncated") from e


# ---------------------------------------------------------------- data set specs


@dataclass
class FileSpec:
    name: str  # path relative to a search root
    sha256: tuple[str, ...] = ()  # accepted checksums (of the decompressed bytes for .gz idx)
    url: str | None = None
    url_sha256: str | None = None  # checksum of the downloaded file itself


@dataclass
class DatasetSpec:
    name: str
    files: dict[str, list[FileSpec]]  # split -> files
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hint: str
    classes: list[str] = field(default_factory=list)
    #: a data set computed from another one's files: (source name, images -> images)
    derived: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
    #: "classification" (labels [N]) or "segmentation" (label maps [N, H, W], read by
    #: :mod:`bnnkit.data.segmentation`, e.g. ``load_camvid``; :func:`load_split` refuses them)
    task: str = "classification"


_FM = "fashion-mnist/"
_FM_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_KERAS_MNIST = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
_MNIST_FILE = FileSpec(
    "mnist.npz",
    (
        "37ac4434c24aa2360e2a8ddfd357ba4cdcf48919961b2b780a6d3040894d1a02",
        "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    ),
    _KERAS_MNIST,
    "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
)


def _fm(stem: str, sha: str) -> FileSpec:
    return FileSpec(_FM + stem + ".gz", (sha,), _FM_URL + stem + ".gz", None)


_CIFAR10_TRAIN_SHA = [
    "1d8441cf3b199398aa5a4ad873981dd99ee7006267cf5c2c3b5f2c235de82670",
    "de1c2af05ab1a1719cd2c050c1fce4e5a0189e3b559a12a55a3d796451a4bd6e",
    "67c27ceffa7809ee3bd06abfe88604d37b3df34f6f8628c5293423b8ad7d52e7",
    "fd9e12036be24c94f6edfb4e954b546fa153e538f12f3429ed7dfc523cc58d55",
]
_NPZ_HINT = "place the .npz files (x_*/y_* arrays, NHWC uint8) in $BNNKIT_DATA or ~/.cache/bnnkit"

_CAMVID = FileSpec(
    "camvid.npz", ("d461c312cc3413fc785ee780a8d89742f9b65f2e4827b46b8379c0f6e7680240",)
)

_CIFAR10_TEST = FileSpec(
    "cifar10_test.npz", ("84736cdd9e713ddd8fc4a2070e1c726747f370070cdadd5bf276d408e7b090e2",)
)

DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        "fashion_mnist",
        {
            "train": [
                _fm(
                    "train-images-idx3-ubyte",
                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                ),
                _fm(
                    "train-labels-idx1-ubyte",
                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                ),
            ],
            "test": [
                _fm(
                    "t10k-images-idx3-ubyte",
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                ),
                _fm(
                    "t10k-labels-idx1-ubyte",
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                ),
            ],
        },
        (1, 28, 28),
        10,
        (0.2860,),
        (0.3530,),
        "sudo apt-get install -y dataset-fashion-mnist   "
        "(or: bnnkit data --download fashion_mnist, with internet)",
        [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],  # fmt: skip
    ),
    "mnist": DatasetSpec(
        "mnist",
        {"train": [_MNIST_FILE], "test": [_MNIST_FILE]},
        (1, 28, 28),
        10,
        (0.1307,),
        (0.3081,),
        "bnnkit data --download mnist   (or put mnist.npz in $BNNKIT_DATA)",
        [str(i) for i in range(10)],
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        {
            "train": [
                FileSpec(f"cifar10_train_{i}.npz", (s,)) for i, s in enumerate(_CIFAR10_TRAIN_SHA)
            ],
            "test": [_CIFAR10_TEST],
        },
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        _NPZ_HINT,
        [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ],  # fmt: skip
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        {
            "test": [
                FileSpec(
                    "cifar100_test.npz",
                    ("257c38b336aae4f686a4a63ee130cc438fcd64537cac09de48c335913f1c7bda",),
                )
            ]
        },
        (3, 32, 32),
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        _NPZ_HINT,
    ),
    # Fashion-MNIST's second OOD partner: CIFAR-10 test images in grey, resized to 28x28
    "cifar10_grey": DatasetSpec(
        "cifar10_grey",
        {"test": [_CIFAR10_TEST]},
        (1, 28, 28),
        10,
        (0.4838,),
        (0.2313,),
        _NPZ_HINT + " (cifar10_grey is computed from cifar10_test.npz)",
        [],
        derived=("cifar10", lambda x: grey_resize(x, (28, 28))),
    ),
    "svhn": DatasetSpec(
        "svhn",
        {"test": [FileSpec("svhn_test.npz")]},
        (3, 32, 32),
        10,
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        "convert SVHN's test_32x32.mat to svhn_test.npz (x_test NHWC uint8, y_test 0..9) "
        "and put it in $BNNKIT_DATA",
    ),
    # semantic segmentation (SegNet split, half resolution); label 11 (= num_classes) is void
    "camvid": DatasetSpec(
        "camvid",
        {"train": [_CAMVID], "val": [_CAMVID], "test": [_CAMVID]},
        (3, 180, 240),
        11,
        (0.4124, 0.4256, 0.4331),  # of the training images
        (0.3022, 0.3066, 0.3024),
        "put camvid.npz (CamVid, SegNet split at 180x240: x_/y_/names_<split> arrays and "
        "class_names) in $BNNKIT_DATA or ~/.cache/bnnkit",
        [
            "Sky",
            "Building",
            "Pole",
            "Road",
            "Pavement",
            "Tree",
            "SignSymbol",
            "Fence",
            "Car",
            "Pedestrian",
            "Bicyclist",
        ],  # fmt: skip
        task="segmentation",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise unknown_name("data set", name, DATASETS)
    return DATASETS[name]


def locate(spec: FileSpec) -> Path | None:
    for root in search_roots():
        p = root / spec.name
        if p.is_file():
            return p
    return None


def locate_split(name: str, split: str) -> list[Path]:
    ds = get_spec(name)
    if split not in ds.files:
        raise DataError(f"data set {name!r} has no {split!r} split (it has: {', '.join(ds.files)})")
    paths = []
    for f in ds.files[split]:
        p = locate(f)
        if p is None:
            where = ", ".join(str(r) for r in search_roots())
            raise DataError(
                f"data set {name!r} is missing: {f.name} not found in {where}.\n"
                f"To get it: {ds.hint}"
            )
        paths.append(p)
    return paths


#: (name, split) -> (fingerprint of the files read, images, labels). The fingerprint holds each
#: resolved file's path, inode, size and modification time, so a changed ``$BNNKIT_DATA`` or a
#: replaced file is read again; the cached tensors are never handed out (callers get copies).
_CACHE: dict[tuple[str, str], tuple[tuple, torch.Tensor, torch.Tensor]] = {}


def _fingerprint(name: str, split: str) -> tuple:
    """What a split's contents depend on: its files as found now (a derived set: its source's)."""
    ds = get_spec(name)
    files = locate_split(ds.derived[0] if ds.derived is not None else name, split)
    out = []
    for p in files:
        st = p.stat()
        out.append((str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_split(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images uint8 [N, C, H, W], labels int64 [N])`` of a data set split.

    Read once per process while its files stay the same; every call returns its own copy, so a
    caller that writes into the tensors changes nothing for the next one."""
    x, y = _cached(name, split)
    return x.clone(), y.clone()


def _cached(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached tensors themselves: read-only by contract (module-internal)."""
    key = (name, split)
    stamp = _fingerprint(name, split)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1], hit[2]
    xt, yt = _read_split(name, split)
    _CACHE[key] = (stamp, xt, yt)
    return xt, yt


def _read_split(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = get_spec(name)
    if ds.task != "classification":
        raise DataError(
            f"{name!r} is a {ds.task} data set (label maps, not one label per image); read it "
            f"with bnnkit.data.segmentation.load_{name}(split)"
        )
    if ds.derived is not None:
        source, derive = ds.derived
        sx, y = _cached(source, split)
        x = derive(sx).numpy()
        y = y.numpy()
    elif name == "fashion_mnist":
        paths = locate_split(name, split)
        x = read_idx(paths[0])[:, None]
        y = read_idx(paths[1])
    else:
        xs, ys = [], []
        for p in locate_split(name, split):
            d = read_npz(p, [f"x_{split}", f"y_{split}"])
            xs.append(d[f"x_{split}"])
            ys.append(d[f"y_{split}"])
        x, y = np.concatenate(xs), np.concatenate(ys)
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    if len(x) == 0:
        raise DataError(f"data set {name!r} split {split!r} is empty")
    if len(x) != len(y):
        raise DataError(f"{name} {split}: {len(x)} images but {len(y)} labels")
    if tuple(x.shape[1:]) != ds.input_shape:
        raise DataError(f"{name} {split}: images {x.shape[1:]}, expected {ds.input_shape}")
    xt = torch.from_numpy(np.array(x, copy=True))
    yt = torch.from_numpy(y.astype(np.int64))
    if yt.min() < 0 or yt.max() >= ds.num_classes:
        raise DataError(f"{name} {split}: labels outside [0, {ds.num_classes - 1}]")
    return xt, yt


def count(name: str, split: str) -> int:
    """Number of examples in a split, read from the labels alone (no image decoding)."""
    paths = locate_split(name, split)
    if name == "fashion_mnist":
        return len(read_idx(paths[1]))
    return sum(len(read_npz(p, [f"y_{split}"])[f"y_{split}"]) for p in paths)


def verify(name: str) -> list[tuple[str, str, str]]:
    """Check every file of a data set: rows of (file, location or '-', status)."""
    ds = get_spec(name)
    rows, seen = [], set()
    for files in ds.files.values():
        for f in files:
            if f.name in seen:
                continue
            seen.add(f.name)
            p = locate(f)
            if p is None:
                rows.append((f.name, "-", "missing"))
                continue
            if not f.sha256:
                rows.append((f.name, str(p), "present (no known checksum)"))
                continue
            digest = sha256_file(p, decompress=f.name.endswith(".gz"))
            rows.append((f.name, str(p), "ok" if digest in f.sha256 else f"MISMATCH {digest}"))
    return rows


def fetch(name: str) -> list[Path]:
    """Download a data set's files that are missing (needs internet; verified by sha256).

    ``$BNNKIT_DATA_MIRROR``: a base URL laid out like the data folder (``fashion-mnist/...``,
    ``mnist.npz``) to download from instead of the original sources."""
    ds = get_spec(name)
    got = []
    for files in ds.files.values():
        for f in files:
            if locate(f) is not None:
                continue
            if f.url is None:
                raise DataError(f"{name!r} has no download source; {ds.hint}")
            if not f.sha256:
                raise DataError(
                    f"{f.name} has no known sha256, so it is never downloaded; {ds.hint}"
                )
            dest = download_root() / f.name
            mirror = os.environ.get("BNNKIT_DATA_MIRROR")
            url = f"{mirror.rstrip('/')}/{f.name}" if mirror else f.url
            if f.name.endswith(".gz"):
                # idx .gz files: the gzip wrapper varies between mirrors, the content does not
                download(url, dest, decompressed_sha256=tuple(f.sha256))
            elif f.url_sha256 is not None and not mirror:
                download(url, dest, f.url_sha256)
            else:  # a mirror: any of the accepted versions of the file
                download(url, dest, tuple(f.sha256))
            got.append(dest)
    return got
