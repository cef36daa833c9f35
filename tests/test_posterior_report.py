"""bnnkit posterior align | modes | report on tiny real data: alignment keeps every function and
moves members towards the target, the report's numbers are the library's, bad input is refused."""

import json
import math
import subprocess
import sys

import pytest
import torch

from bnnkit import ConfigError
from bnnkit.posterior import Collection, collect_reference
from bnnkit.posterior.collect import build_from
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
    # another target: it is only rescaled (positive per-unit factors, no permutation: every
    # weight keeps its sign and every first-layer row stays parallel to its source row), the
    # others keep their functions and move towards it
    again = aligned_collection(collections / "ref", tmp_path / "al2", to="ref-0002")
    torch.testing.assert_close(function_vectors(again, probe), function_vectors(src, probe),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    s_t, a_t = src.load("ref-0002"), again.load("ref-0002")
    for key, w in s_t.items():
        if w.is_floating_point() and w.dim() >= 1:
            assert torch.equal(torch.sign(a_t[key]), torch.sign(w)), key
    rows_src = torch.cat([s_t["features.1.weight"], s_t["features.1.bias"][:, None]], 1)
    rows_al = torch.cat([a_t["features.1.weight"], a_t["features.1.bias"][:, None]], 1)
    cos = torch.nn.functional.cosine_similarity(rows_src.double(), rows_al.double(), dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-6)
    v_again = again.vectors()
    others = [i for i in range(len(v_src)) if i != 2]
    assert torch.all((v_again[others] - v_again[2]).norm(dim=1)
                     < (v_src[others] - v_src[2]).norm(dim=1))  # fmt: skip
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
    # the unbiased MMD^2 with a Gaussian kernel, written out pair by pair
    k = lambda u, v: math.exp(-float(((u - v) ** 2).sum()) / bw**2)  # noqa: E731
    n, m = len(a), len(b)
    kxx = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    assert row["mmd2 weight"] == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-6, abs=1e-12)
    assert 1 <= row["modes"] <= 3 and row["mi in"] >= 0
    # the collection's averaged prediction on the probe images, each member run as a plain
    # network; accuracy, NLL and the entropy AUROC against MNIST computed by hand
    import numpy as np

    from bnnkit.data import load_bundle

    test = load_bundle("fashion_mnist", ood=[], test_size=40).test
    with np.load(ood_root / "mnist.npz") as d:
        x_ood = torch.from_numpy(d["x_test"][:40, None].astype(np.float32) / 255)

    def mean_probs(x):
        net = build_from(oth.arch).eval()
        out = []
        for member in oth.members:
            net.load_state_dict(oth.load(member.id))
            with torch.no_grad():
                out.append(net(x).double().softmax(-1))
        return sum(out) / len(out)

    p_in, p_out = mean_probs(test.float()), mean_probs(x_ood)
    assert row["accuracy"] == pytest.approx((p_in.argmax(1) == test.y).double().mean().item())
    picked = p_in[torch.arange(40), test.y]
    assert row["nll"] == pytest.approx(-picked.log().mean().item(), rel=1e-4)
    h_in = -(p_in * p_in.clamp_min(1e-300).log()).sum(1)
    h_out = -(p_out * p_out.clamp_min(1e-300).log()).sum(1)
    pairs = (h_out[None, :] > h_in[:, None]).double() + 0.5 * (h_out[None, :] == h_in[:, None])
    assert row["auroc mnist"] == pytest.approx(pairs.mean().item(), abs=2.5e-3)  # float32
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
