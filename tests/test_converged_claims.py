"""benchmarks/converged_claims.py on a small fake bench written through the results store:
paired differences, Student-t intervals, verdicts, seed matching, skipped claims, errors."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bnnkit.report import ResultStore

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "converged_claims.py"
T_2 = 4.302653  # t(0.975) with 2 degrees of freedom (tables)
T_1 = 12.706205  # with 1
HEADERS = ["A", "B", "Metric", "Better", "A mean", "B mean", "A − B", "95% CI", "n", "Verdict"]


def _module():
    spec = importlib.util.spec_from_file_location("converged_claims", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


claims = _module()

METHODS = [
    "deep_ensemble",
    "rank1",
    "laplace_diag",
    "laplace_subnetwork",
    "subnet-lv-600",
    "subnet-random-600",
]


def _values(seed: int = 0) -> dict[tuple[str, int], dict[tuple[str, str], float]]:
    """Random filler for every (method, seed, split, metric), with chosen differences where the
    test checks them. subnet-random-600 has no seed 0."""
    rng = np.random.default_rng(seed)
    vals = {}
    for m in METHODS:
        for s in range(3):
            if m == "subnet-random-600" and s == 0:
                continue
            v = {("test", "nll"): 0.3 + 0.05 * rng.random()}
            v[("test", "ece")] = 0.03 + 0.01 * rng.random()
            v[("test", "accuracy")] = 0.85 + 0.02 * rng.random()
            v[("corrupt:mean", "nll")] = 0.6 + 0.1 * rng.random()
            v[("ood:mnist", "auroc_entropy")] = 0.8 + 0.1 * rng.random()
            for angle in (0, 90, 180):
                v[(f"rotate:{angle}", "nll")] = 3.0 + rng.random()
            vals[(m, s)] = v
    for s, (d_nll, d_ece, d_acc) in enumerate([(0.1, -0.030, -0.020),
                                              (-0.2, -0.032, -0.021),
                                              (0.15, -0.029, -0.018)]):  # fmt: skip
        de = vals[("deep_ensemble", s)]
        r1 = vals[("rank1", s)]
        r1[("test", "nll")] = de[("test", "nll")] + d_nll  # not resolved
        r1[("test", "ece")] = de[("test", "ece")] + d_ece  # lower is better: A better
        r1[("test", "accuracy")] = de[("test", "accuracy")] + d_acc  # higher: B better
        sub, diag = vals[("laplace_subnetwork", s)], vals[("laplace_diag", s)]
        sub[("test", "nll")] = diag[("test", "nll")] - 0.1 - 0.01 * s  # A better
        for angle in (90, 180):  # B better; angle 0 goes the other way, far
            sub[(f"rotate:{angle}", "nll")] = diag[(f"rotate:{angle}", "nll")] + 1.0 + 0.1 * s
        sub[("rotate:0", "nll")] = diag[("rotate:0", "nll")] - 50.0
    return vals


def _write_bench(path: Path, vals, dataset="fashion_mnist", methods=METHODS) -> None:
    path.mkdir(parents=True)
    with ResultStore(path / "results.sqlite") as store:
        for (m, s), v in vals.items():
            rows = [{"split": sp, "metric": me, "value": x} for (sp, me), x in v.items()]
            store.add_run(m, dataset, "lenet5", s, path / "runs" / f"{m}-seed{s}", "{}", rows)
    cfg = {"dataset": dataset, "model": "lenet5", "seeds": 3, "methods": list(methods)}
    (path / "bench_config.json").write_text(json.dumps(cfg))


def _rows(text: str) -> list[dict[str, str]]:
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(HEADERS) and cells[0] != "A":
            out.append(dict(zip(HEADERS, cells)))
    return out


def _find(rows, a, b, metric):
    hits = [r for r in rows if r["A"] == a and r["B"] == b and r["Metric"].startswith(metric)]
    assert len(hits) == 1, (a, b, metric, hits)
    return hits[0]


def _ci(cell: str) -> tuple[float, float]:
    lo, hi = cell.strip("[]").split(",")
    return float(lo), float(hi)


def _hand(a: list[float], b: list[float], t: float):
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    vals = _values()
    path = tmp_path_factory.mktemp("claims") / "fmnist_converged"
    _write_bench(path, vals)
    return path, vals


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    path, _ = bench
    out = tmp_path_factory.mktemp("out") / "claims.md"
    assert claims.main([str(path), "--out", str(out)]) == 0
    return out.read_text()


def test_t_quantile_matches_tables():
    assert claims.t_quantile(2) == pytest.approx(T_2, abs=1e-6)
    assert claims.t_quantile(1) == pytest.approx(T_1, abs=1e-6)
    assert claims.t_quantile(30) == pytest.approx(2.042272, abs=1e-6)


def test_paired_difference_interval_and_verdicts(bench, report):
    _, vals = bench
    rows = _rows(report)

    def series(m, key, seeds=range(3)):
        return [vals[(m, s)][key] for s in seeds]

    cases = [  # (A, B, metric label, key, scale, decimals, expected verdict)
        ("rank1", "deep_ensemble", "test NLL", ("test", "nll"), 1.0, 4, "not resolved (3 seeds)"),
        ("rank1", "deep_ensemble", "test ECE", ("test", "ece"), 100.0, 2, "A better"),
        ("rank1", "deep_ensemble", "test accuracy", ("test", "accuracy"), 100.0, 2, "B better"),
        ("laplace_subnetwork", "laplace_diag", "test NLL", ("test", "nll"), 1.0, 4, "A better"),
    ]
    for a, b, label, key, scale, dec, want in cases:
        row = _find(rows, a, b, label)
        mean, lo, hi = _hand(series(a, key), series(b, key), T_2)
        tol = 0.6 * 10**-dec
        assert float(row["A − B"]) == pytest.approx(scale * mean, abs=tol), (a, b, label)
        got_lo, got_hi = _ci(row["95% CI"])
        assert got_lo == pytest.approx(scale * lo, abs=tol), (a, b, label)
        assert got_hi == pytest.approx(scale * hi, abs=tol), (a, b, label)
        assert row["n"] == "3"
        assert row["Verdict"] == want, (a, b, label, row)
    assert _find(rows, "rank1", "deep_ensemble", "test ECE")["Better"] == "lower"
    assert _find(rows, "rank1", "deep_ensemble", "test accuracy")["Better"] == "higher"


def test_rotation_is_the_mean_over_positive_angles(bench, report):
    _, vals = bench
    row = _find(_rows(report), "laplace_subnetwork", "laplace_diag", "rotation NLL")
    assert row["Metric"] == "rotation NLL (mean over 90°, 180°)"

    def rot(m):
        return [(vals[(m, s)][("rotate:90", "nll")] + vals[(m, s)][("rotate:180", "nll")]) / 2
                for s in range(3)]  # fmt: skip

    mean, lo, hi = _hand(rot("laplace_subnetwork"), rot("laplace_diag"), T_2)
    assert float(row["A − B"]) == pytest.approx(mean, abs=6e-5)
    assert _ci(row["95% CI"]) == pytest.approx((lo, hi), abs=6e-5)
    assert row["Verdict"] == "B better"  # lower is better and A is higher


def test_pairs_match_by_seed(bench, report):
    _, vals = bench
    row = _find(_rows(report), "subnet-lv-600", "subnet-random-600", "corrupt:mean NLL")
    key = ("corrupt:mean", "nll")
    a = [vals[("subnet-lv-600", s)][key] for s in (1, 2)]
    b = [vals[("subnet-random-600", s)][key] for s in (1, 2)]
    mean, lo, hi = _hand(a, b, T_1)
    assert row["n"] == "2"
    selection = report.split("### Subnetwork selection")[1].split("###")[0]
    assert "data set fashion_mnist, seeds 1, 2 (" in selection
    assert float(row["A mean"]) == pytest.approx(sum(a) / 2, abs=6e-5)
    assert float(row["A − B"]) == pytest.approx(mean, abs=6e-5)
    assert _ci(row["95% CI"]) == pytest.approx((lo, hi), abs=6e-5)


def test_absent_claims_and_methods_are_named(report):
    assert "Skipped: this bench has no lpbnn." in report
    assert "Not in this bench, so not compared: batch_ensemble." in report
    assert "Not in this bench, so not compared: laplace_last_layer." in report
    metrics = {r["Metric"] for r in _rows(report)}
    assert not [m for m in metrics if m.startswith("mnist_c")]  # not in the bench: no rows
    assert "corrupt:mean NLL" in metrics
    assert "Bench `" in report and "data set fashion_mnist, seeds 0, 1, 2" in report


def test_papers_numbers_beside_ours(bench, report):
    _, vals = bench
    x = np.array([vals[("laplace_subnetwork", s)][("test", "nll")] for s in range(3)])
    line = next(
        ln
        for ln in report.splitlines()
        if ln.startswith("| Fashion-MNIST test NLL | 0.286 |") and "| laplace_subnetwork |" in ln
    )
    assert f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" in line


def test_prints_what_it_writes(bench, report, capsys):
    path, _ = bench
    assert claims.main([str(path)]) == 0
    assert capsys.readouterr().out == report


def test_clear_errors(tmp_path, capsys):
    cases = [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty", "holds no results.sqlite"),
        (tmp_path / "camvid", "is a bench of camvid"),
    ]
    (tmp_path / "empty").mkdir()
    _write_bench(tmp_path / "camvid", {("deep_ensemble", 0): {("test", "nll"): 0.1}}, "camvid",
                 ["deep_ensemble"])  # fmt: skip
    for path, words in cases:
        assert claims.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_mnist_bench_ood_sets_mnist_c_and_lpbnn(tmp_path, capsys):
    rng = np.random.default_rng(1)
    methods = ["batch_ensemble", "lpbnn", "laplace_subnetwork", "subnet-swag-3k",
               "subnet-random-3k"]  # fmt: skip
    vals = {}
    for m in methods:
        for s in range(3):
            v = {("test", "nll"): 0.05 + 0.01 * rng.random()}
            for sp in ("mnist_c:brightness", "mnist_c:mean"):
                v[(sp, "nll")] = 0.1 + 0.1 * rng.random()
            for ood in ("fashion_mnist", "kmnist"):
                for score in ("entropy", "mutual_info"):
                    v[(f"ood:{ood}", f"auroc_{score}")] = 0.9 + 0.05 * rng.random()
            vals[(m, s)] = v
    path = tmp_path / "mnist_converged"
    _write_bench(path, vals, "mnist", methods)
    assert claims.main([str(path)]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)

    def ood_mean(m, s, score):
        v = vals[(m, s)]
        return (v[("ood:fashion_mnist", score)] + v[("ood:kmnist", score)]) / 2

    for score, name in (("auroc_entropy", "entropy"), ("auroc_mutual_info", "mutual information")):
        row = _find(rows, "lpbnn", "batch_ensemble", f"OOD AUROC % ({name}, mean over")
        assert row["Metric"].endswith("mean over fashion_mnist, kmnist)")
        a = [ood_mean("lpbnn", s, score) for s in range(3)]
        b = [ood_mean("batch_ensemble", s, score) for s in range(3)]
        mean, lo, hi = _hand(a, b, T_2)
        assert float(row["A − B"]) == pytest.approx(100 * mean, abs=0.006)
        assert _ci(row["95% CI"]) == pytest.approx((100 * lo, 100 * hi), abs=0.006)
        _find(rows, "lpbnn", "batch_ensemble", f"OOD AUROC % ({name}) vs kmnist")
    key = ("mnist_c:brightness", "nll")
    row = _find(rows, "subnet-swag-3k", "subnet-random-3k", "mnist_c:brightness NLL")
    mean, _, _ = _hand(*([vals[(m, s)][key] for s in range(3)] for m in methods[3:]), T_2)
    assert float(row["A − B"]) == pytest.approx(mean, abs=6e-5)
    _find(rows, "subnet-swag-3k", "subnet-random-3k", "mnist_c:mean NLL")
    assert "Skipped: this bench has no rank1." in text
    assert "Skipped: this bench has none of laplace_diag, laplace_last_layer" in text
    x = np.array([vals[("laplace_subnetwork", s)][key] for s in range(3)])
    assert any(
        ln.startswith("| MNIST-C brightness NLL | 0.1 |")
        and "| laplace_subnetwork |" in ln
        and f"| {x.mean():.3f} ± {x.std(ddof=1):.3f} | 3 |" in ln
        for ln in text.splitlines()
    )
    assert "Fashion-MNIST test NLL" not in text


def test_search_final_plans_against_the_baselines(tmp_path, capsys):
    """A search's final bench: every searched plan against each baseline on NLL, AUROC per OOD
    set (and their mean) and ECE, paired by seed; a bench without plans skips the claim."""
    rng = np.random.default_rng(3)
    methods = ["deterministic", "mc_dropout", "deep_ensemble", "searched", "searched_fast"]
    vals = {}
    for m in methods:
        for s in range(3):
            vals[(m, s)] = {
                ("test", "nll"): 0.25 + 0.02 * rng.random(),
                ("test", "ece"): 0.01 + 0.01 * rng.random(),
                ("ood:mnist", "auroc_entropy"): 0.85 + 0.05 * rng.random(),
                ("ood:cifar10_grey", "auroc_entropy"): 0.9 + 0.05 * rng.random(),
            }
    for s in range(3):  # searched_fast: NLL 0.05 worse than the ensemble's, clearly
        de, fast = vals[("deep_ensemble", s)], vals[("searched_fast", s)]
        fast[("test", "nll")] = de[("test", "nll")] + 0.05 + 0.001 * s
    path = tmp_path / "final"
    _write_bench(path, vals, methods=methods)
    assert claims.main([str(path)]) == 0
    text = capsys.readouterr().out
    part = text.split("### Placement search")[1].split("###")[0]
    rows = _rows(part)
    # 2 plans x 2 baselines present (mc_dropout_full absent) x (NLL, mean AUROC, 2 sets, ECE)
    assert len(rows) == 2 * 2 * 5
    assert {r["B"] for r in rows} == {"deep_ensemble", "mc_dropout"}
    r = _find(rows, "searched_fast", "deep_ensemble", "test NLL")
    a = [vals[("searched_fast", s)][("test", "nll")] for s in range(3)]
    b = [vals[("deep_ensemble", s)][("test", "nll")] for s in range(3)]
    mean, lo, hi = _hand(a, b, T_2)
    assert float(r["A − B"]) == pytest.approx(mean, abs=1e-4)
    assert _ci(r["95% CI"]) == pytest.approx((lo, hi), abs=1e-4)
    assert r["Verdict"] == "B better"
    r = _find(rows, "searched", "mc_dropout", "OOD AUROC % (entropy) vs mnist")
    a = [vals[("searched", s)][("ood:mnist", "auroc_entropy")] for s in range(3)]
    b = [vals[("mc_dropout", s)][("ood:mnist", "auroc_entropy")] for s in range(3)]
    assert float(r["A − B"]) == pytest.approx(100 * _hand(a, b, T_2)[0], abs=1e-2)


def test_search_claim_skipped_without_plans(report):
    part = report.split("### Placement search")[1]
    assert "Skipped: this bench has no searched plan" in part


def test_an_unfinished_bench_is_named_as_such(tmp_path, capsys):
    vals = {k: v for k, v in _values().items() if not (k[0] == "rank1" and k[1] == 2)}
    vals = {k: v for k, v in vals.items() if k[0] != "laplace_diag"}
    _write_bench(tmp_path / "b", vals)
    assert claims.main([str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    head = next(ln for ln in text.splitlines() if ln.startswith("**Unfinished bench**"))
    assert "rank1 (2 of 3 seeds)" in head and "laplace_diag (0 of 3 seeds)" in head
    assert "subnet-random-600 (2 of 3 seeds)" in head  # the fixture's missing seed 0
    assert "deep_ensemble" not in head
