"""CamVid's loader on a small synthetic camvid.npz laid out as the real one: the anomaly protocol
(held-out classes void in train/val, a separate anomaly mask at test), the contiguous
renumbering checked pixel by pixel, `bnnkit data` listing and verifying it, and the refusals."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from bnnkit import ConfigError, DataError, InputError
from bnnkit.data import IGNORE_INDEX, SegSplit, load_camvid, load_split, sources
from bnnkit.data import segmentation as seg

NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
         "Pedestrian", "Bicyclist"]  # fmt: skip
VOID = 11
SIZES = {"train": 6, "val": 3, "test": 4}


def write_camvid(path, rng, sizes=SIZES, h=6, w=7, **override):
    arrays = {"class_names": np.array(NAMES)}
    for split, n in sizes.items():
        arrays[f"x_{split}"] = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        arrays[f"y_{split}"] = rng.integers(0, VOID + 1, (n, h, w)).astype(np.uint8)  # 0..11
        arrays[f"names_{split}"] = np.array([f"{split}_{i:03d}" for i in range(n)])
    arrays.update(override)
    np.savez(path, **arrays)
    return arrays


@pytest.fixture
def camvid_root(tmp_path, monkeypatch):
    """$BNNKIT_DATA holding only a synthetic camvid.npz (random images and labels 0..11)."""
    arrays = write_camvid(tmp_path / "camvid.npz", np.random.default_rng(0))
    monkeypatch.setenv("BNNKIT_DATA", str(tmp_path))
    monkeypatch.setattr(seg, "_CACHE", {})
    return tmp_path, arrays


def brute_mapping(src: np.ndarray, held: list[str]):
    """Pixel by pixel: the new label (kept classes renumbered in order, void / held -> 255) and
    whether the pixel is anomalous."""
    kept = [i for i, c in enumerate(NAMES) if c not in held]
    new = np.empty(src.shape, dtype=np.int64)
    anomalous = np.zeros(src.shape, dtype=bool)
    for idx in np.ndindex(*src.shape):
        v = int(src[idx])
        anomalous[idx] = v < len(NAMES) and NAMES[v] in held
        new[idx] = kept.index(v) if v in kept else 255
    return new, anomalous


@pytest.mark.parametrize("held", [["Bicyclist"], ["Pole", "Car"], []])
def test_anomaly_protocol_and_renumbering_pixel_by_pixel(camvid_root, held):
    _, arrays = camvid_root
    for split, n in SIZES.items():
        d = (
            load_camvid(split, anomaly_classes=held)
            if held != ["Bicyclist"]
            else load_camvid(split)
        )
        new, anomalous = brute_mapping(arrays[f"y_{split}"], held)
        assert d.x.dtype == torch.uint8 and d.x.shape == (n, 3, 6, 7)
        assert torch.equal(d.x, torch.from_numpy(arrays[f"x_{split}"]).permute(0, 3, 1, 2))
        assert d.y.shape == (n, 6, 7) and torch.equal(d.y.long(), torch.from_numpy(new))
        assert d.class_names == [c for c in NAMES if c not in held]
        assert d.num_classes == len(NAMES) - len(held) and d.ignore_index == IGNORE_INDEX == 255
        assert [NAMES[s] for s in d.source_labels] == d.class_names
        assert d.anomaly_classes == tuple(held) and d.names == list(arrays[f"names_{split}"])
        if split == "test":
            assert d.anomaly.dtype == torch.bool
            assert torch.equal(d.anomaly, torch.from_numpy(anomalous))
            assert anomalous.any() == bool(held)
            assert torch.all(d.y[d.anomaly] == 255)  # in-distribution metrics exclude them
        else:
            assert d.anomaly is None  # held-out pixels are plain void in training
        assert len(d) == n


def test_every_call_gets_its_own_tensors_and_a_changed_file_is_read_again(camvid_root):
    root, _ = camvid_root
    a = load_camvid("train")
    before = a.x.clone(), a.y.clone()
    a.x.zero_(), a.y.zero_()
    b = load_camvid("train")
    assert torch.equal(b.x, before[0]) and torch.equal(b.y, before[1])
    arrays = write_camvid(root / "camvid.npz", np.random.default_rng(5))
    c = load_camvid("train", root=root / "camvid.npz")
    assert torch.equal(c.x, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))


def test_from_arrays_takes_channels_first_or_last():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 4, (2, 5, 4))
    last = SegSplit.from_arrays(x, y, ["a", "b", "c"], anomaly_classes=["b"])
    first = SegSplit.from_arrays(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y),
                                 ["a", "b", "c"], anomaly_classes=["b"])  # fmt: skip
    for d in (last, first):
        assert torch.equal(d.x, torch.from_numpy(x).permute(0, 3, 1, 2))
        assert torch.equal(d.anomaly, torch.from_numpy(y == 1))
        assert d.class_names == ["a", "c"] and d.source_labels == (0, 2)
        want = np.select([y == 0, y == 2], [0, 1], 255)
        assert torch.equal(d.y.long(), torch.from_numpy(want))
    # both axes 3: read as [N, 3, H, W]; the split never shares memory with the caller's array
    x3 = torch.from_numpy(rng.integers(0, 256, (2, 3, 5, 3), dtype=np.uint8))
    d = SegSplit.from_arrays(x3, torch.zeros(2, 5, 3, dtype=torch.long), ["a", "b"], split="train")
    assert torch.equal(d.x, x3) and d.anomaly is None
    d.x.zero_()
    assert x3.any()


def test_bad_files_and_arguments_are_refused_naming_the_fix(
    camvid_root, tmp_path_factory, monkeypatch
):
    root, _ = camvid_root
    with pytest.raises(ConfigError, match="unknown anomaly class 'bicyclist'.*Bicyclist"):
        load_camvid("test", anomaly_classes=("bicyclist",))
    with pytest.raises(ConfigError, match="keep at least 2"):
        load_camvid("train", anomaly_classes=NAMES[1:])
    with pytest.raises(DataError, match="no 'validation' split"):
        load_camvid("validation")
    rng = np.random.default_rng(2)
    bad = tmp_path_factory.mktemp("bad")
    write_camvid(bad / "camvid.npz", rng, y_test=np.zeros((4, 6, 6), np.uint8))
    with pytest.raises(DataError, match=r"images \(4, 3, 6, 7\).*masks \(4, 6, 6\) do not match"):
        load_camvid("test", root=bad)
    load_camvid("train", root=bad)  # the other splits are fine
    write_camvid(bad / "camvid.npz", rng, y_val=np.full((3, 6, 7), 12, np.uint8))
    with pytest.raises(DataError, match=r"0\.\.10 .* or be 11 \(void\); found \[12\]"):
        load_camvid("val", root=bad)
    write_camvid(bad / "camvid.npz", rng, x_val=np.zeros((3, 6, 7), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        load_camvid("val", root=bad)
    (bad / "camvid.npz").unlink()
    with pytest.raises(DataError, match="camvid.npz"):
        load_camvid("val", root=bad)
    # not found on the search path: the message says where it looked and how to get it
    empty = tmp_path_factory.mktemp("empty")
    monkeypatch.setattr(sources, "search_roots", lambda: [empty])
    with pytest.raises(DataError, match=r"camvid.npz not found in .*empty.*\n.*put camvid.npz"):
        load_camvid("test")
    # arrays from the user: InputError
    with pytest.raises(InputError, match="do not match"):
        SegSplit.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 5)), ["a", "b"])
    with pytest.raises(InputError, match="integer labels"):
        SegSplit.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 4)), ["a", "b"])


def test_the_classification_reader_refuses_label_maps(camvid_root):
    with pytest.raises(DataError, match="segmentation data set.*load_camvid"):
        load_split("camvid", "train")


# ---------------------------------------------------------------- `bnnkit data`


def _write_idx(path, arr, magic):
    dims = arr.shape if magic == 2051 else (len(arr),)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I" + "I" * len(dims), magic, *dims) + arr.astype(np.uint8).tobytes())


def test_bnnkit_data_lists_and_verifies_camvid_which_is_optional(tmp_path, monkeypatch, capsys):
    from bnnkit.cli import main

    monkeypatch.setattr(sources, "search_roots", lambda: [tmp_path])
    monkeypatch.setattr(sources, "_CACHE", {})
    fm = tmp_path / "fashion-mnist"
    fm.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):  # the default data set, checksums patched
        _write_idx(fm / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        _write_idx(fm / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    for files in sources.DATASETS["fashion_mnist"].files.values():
        for f in files:
            digest = sources.sha256_file(tmp_path / f.name, decompress=True)
            monkeypatch.setattr(f, "sha256", (digest,))
    assert main(["data"]) == 0  # camvid missing: listed with how to get it, not a failure
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("camvid"))
    assert "MISSING" in line and "(3, 180, 240)" in line and "11 classes" in line
    assert main(["data", "camvid"]) == 2  # named: required
    assert "camvid is missing; to get it: put camvid.npz" in capsys.readouterr().err
    write_camvid(tmp_path / "camvid.npz", rng)
    assert main(["data", "camvid"]) == 2  # random bytes: not the recorded sha256
    assert "camvid: " in capsys.readouterr().err
    digest = sources.sha256_file(tmp_path / "camvid.npz")
    for files in sources.DATASETS["camvid"].files.values():  # one file for the three splits
        monkeypatch.setattr(files[0], "sha256", (digest,))
    assert main(["data", "camvid"]) == 0
    out = capsys.readouterr().out
    assert "train 6, val 3, test 4" in out and "camvid.npz" in out and " ok " in out
