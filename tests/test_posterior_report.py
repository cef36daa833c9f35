"""bnnkit posterior align | modes | report on tiny real data: alignment keeps every function and
moves members towards the target, the report's numbers are the library's, bad input is refused."""

import json
import subprocess
import sys

import pytest
import torch

from bnnkit import ConfigError
from bnnkit.posterior import Collection, collect_reference
from bnnkit.posterior.collect import build_from
from bnnkit.posterior.mmd import mmd2
from bnnkit.posterior.tools import aligned_collection, function_vectors, pca

TINY = {"model": "mlp", "epochs": 1, "subset": 300, "chunk": 4}


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    root = tmp_path_factory.mktemp("cols")
    collect_reference(root / "ref", members=5, **TINY)
    collect_reference(root / "other", members=3, first_seed=100, **TINY)
    return root


def _bnnkit(*args):
    return subprocess.run([sys.executable, "-m", "bnnkit.cli", *args], capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_alignment_keeps_functions_and_moves_members_to_the_target(collections, tmp_path):
    src = Collection.open(collections / "ref")
    r = _bnnkit("posterior", "align", str(collections / "ref"), "--out", str(tmp_path / "al"))
    assert r.returncode == 0, r.stderr[-2000:]
    al = Collection.open(tmp_path / "al")
    assert [m.id for m in al.members] == [m.id for m in src.members]
    probe = torch.rand(20, 1, 28, 28)
    torch.testing.assert_close(function_vectors(al, probe), function_vectors(src, probe),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    v_src, v_al = src.vectors(), al.vectors()
    before = (v_src[1:] - v_src[0]).norm(dim=1)
    after = (v_al[1:] - v_al[0]).norm(dim=1)
    assert torch.all(after < before)  # balancing + weight matching bring members closer
    again = aligned_collection(collections / "ref", tmp_path / "al2", to="ref-0002")
    assert torch.equal(again.vectors()[2], aligned_collection(
        collections / "ref", tmp_path / "al3", to="ref-0002").vectors()[2])  # fmt: skip
    with pytest.raises(ConfigError, match="no member"):
        aligned_collection(collections / "ref", tmp_path / "al4", to="nope")


def test_modes_command(collections):
    r = _bnnkit("posterior", "modes", str(collections / "ref"), "--members", "3", "--images",
                "200")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mode(s) among 3 networks" in r.stdout
    r = _bnnkit("posterior", "modes", str(collections / "ref"), "--threshold", "-1")
    assert r.returncode == 2 and r.stderr.startswith("bnnkit: error:")


def test_report_numbers_are_the_librarys(collections, tmp_path, ood_root):
    from bnnkit.report.posterior import PosteriorReportConfig, posterior_report

    cfg = PosteriorReportConfig(reference=str(collections / "ref"),
                                collections={"other": str(collections / "other")},
                                out=str(tmp_path / "rep"), probe=40, modes_members=3,
                                loss_images=100, path_points=3, plane_grid=3)  # fmt: skip
    page = posterior_report(cfg, log=lambda *_: None)
    text = page.read_text()
    assert "| other | 3 |" in text and "mnist" in text
    for fig in ("weights_pca.png", "paths.png", "plane.png"):
        assert (page.parent / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    res = json.loads((page.parent / "report.json").read_text())
    row = next(r for r in res["rows"] if r["collection"] == "other")
    ref, oth = Collection.open(collections / "ref"), Collection.open(collections / "other")
    a, b = ref.vectors(), oth.vectors()
    d = torch.cdist(a, a)
    bw = float(d[~torch.eye(len(a), dtype=torch.bool)].median())
    assert res["bandwidth"]["weight"] == pytest.approx(bw, rel=1e-9)
    assert row["mmd2 weight"] == pytest.approx(mmd2(a, b, "gaussian", bw), rel=1e-9)
    assert 1 <= row["modes"] <= 3 and row["mi in"] >= 0
    # the collection's averaged prediction, scored by bnnkit's metrics
    from bnnkit.data import load_bundle
    from bnnkit.metrics import accuracy
    from bnnkit.posterior.tools import function_vectors

    test = load_bundle("fashion_mnist", ood=[], test_size=40).test
    mean = function_vectors(oth, test.float()).view(3, 40, 10).mean(0)
    assert row["accuracy"] == pytest.approx(accuracy(mean.float(), test.y), abs=1e-9)
    assert 0 <= row["auroc mnist"] <= 1
    assert 0 <= res["symmetry"]["p uniform (raw)"] <= 1
    # a second report reuses the canonical collections and the barriers on disk
    mtime = (page.parent / "canonical" / "other" / "manifest.json").stat().st_mtime_ns
    cached = sorted((page.parent / "barriers").iterdir())
    assert len(cached) == 2  # reference and other
    stamps = [f.stat().st_mtime_ns for f in cached]
    posterior_report(cfg, log=lambda *_: None)
    assert (page.parent / "canonical" / "other" / "manifest.json").stat().st_mtime_ns == mtime
    assert [f.stat().st_mtime_ns for f in sorted((page.parent / "barriers").iterdir())] == stamps
    again = json.loads((page.parent / "report.json").read_text())
    assert again["rows"] == res["rows"]


def test_report_refusals(collections, tmp_path):
    from bnnkit.report.posterior import PosteriorReportConfig, posterior_report

    lenet = tmp_path / "lenet"
    col = Collection.create(lenet, {**Collection.open(collections / "ref").arch,
                                    "model": "lenet5"})  # fmt: skip
    col.add("x", build_from(col.arch).state_dict(), "deterministic")
    bad = PosteriorReportConfig(reference=str(collections / "ref"),
                                collections={"l": str(lenet)}, out=str(tmp_path / "r"))  # fmt: skip
    with pytest.raises(ConfigError, match="holds"):
        posterior_report(bad, log=lambda *_: None)
    with pytest.raises(ConfigError, match="folder name"):
        PosteriorReportConfig(reference="r", collections={"a/b": "x"}).check()
    r = _bnnkit("posterior", "report", "--reference", str(collections / "ref"), "--collection",
                "nameless", "--out", str(tmp_path / "r2"))  # fmt: skip
    assert r.returncode == 2 and "NAME=DIR" in r.stderr


def test_pca_against_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64) * torch.tensor(
        [5.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64
    )
    y = torch.randn(4, 6, generator=g, dtype=torch.float64)
    fit, (proj,), ratio = pca(x, y)
    cov = torch.cov(x.T)
    lam, vec = torch.linalg.eigh(cov)
    top = vec[:, [-1, -2]]
    for got, want in ((fit, (x - x.mean(0)) @ top), (proj, (y - x.mean(0)) @ top)):
        torch.testing.assert_close(got.abs(), want.abs())  # axes up to sign
    torch.testing.assert_close(ratio, lam[[-1, -2]] / lam.sum())
