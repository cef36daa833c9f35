"""The search's final comparison: the searched plans retrained from scratch with the bench's
training beside the baselines, compared on test data the search never saw."""

import json
import subprocess
import sys

import pytest
import yaml

from bnnkit import ConfigError
from bnnkit.plan import PlacementPlan
from bnnkit.report import ResultStore
from bnnkit.search.final import comparison, final_plans


def _row(method, split, metric, value, seed=0):
    return {"method": method, "seed": seed, "split": split, "metric": metric, "value": value}


def test_comparison_ratios_and_relative_differences_from_seed_means():
    rows = [
        _row("s", "cost", "latency_ms", 2.0, 0), _row("s", "cost", "latency_ms", 4.0, 1),
        _row("b", "cost", "latency_ms", 9.0, 0), _row("b", "cost", "latency_ms", 9.0, 1),
        _row("s", "test", "nll", 0.45), _row("b", "test", "nll", 0.50),
        _row("s", "ood:mnist", "auroc_entropy", 0.88),
        _row("b", "ood:mnist", "auroc_entropy", 0.80),
        _row("s", "ood:grey", "auroc_entropy", 0.70),  # the baseline lacks this set: "–"
    ]  # fmt: skip
    headers, lines = comparison(rows, ["s"], ["b", "absent"])
    assert headers == ["searched", "baseline", "speed-up (x)", "NLL vs baseline %",
                       "AUROC grey vs baseline %", "AUROC mnist vs baseline %"]  # fmt: skip
    assert lines == [["s", "b", "3.00", "-10.0", "–", "+10.0"]]  # 9 / mean(2, 4)


def test_final_plans_need_a_finished_search(tmp_path):
    with pytest.raises(ConfigError, match="no finished search .*plan.json missing"):
        final_plans(tmp_path)


def test_search_then_final_retrains_the_searched_plans_beside_the_baselines(tmp_path, ood_root):
    out = tmp_path / "search"
    bench = {"epochs": 1, "seeds": 1, "subset": 256, "val_size": 200, "test_size": 150,
             "batch_size": 64, "corruptions": ["contrast"], "n_corrupt": 20, "n_rotate": 20,
             "angles": [0, 90], "method_options": {"mc_dropout": {"samples": 2}}}  # fmt: skip
    (tmp_path / "final.yaml").write_text(yaml.safe_dump(bench))
    cmd = [sys.executable, "-m", "bnnkit.cli", "search", "--out", str(out), "--trials", "3",
           "--model", "mlp", "--epochs", "1", "--subset", "256", "--batch-size", "64",
           "--final-config", str(tmp_path / "final.yaml"), "--quiet"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    plans = final_plans(out)
    assert list(plans)[0] == "searched"
    assert plans["searched"].key() == PlacementPlan.load(out / "plan.json").key()
    base = ["deterministic", "mc_dropout", "mc_dropout_full", "deep_ensemble"]
    methods = [*base, *plans]
    with ResultStore(out / "final" / "results.sqlite") as store:
        rows = store.rows(dataset="fashion_mnist", model="mlp")
    assert {r["method"] for r in rows} == set(methods)
    full = json.loads(
        (out / "final" / "runs" / "mc_dropout_full-seed0" / "config.json").read_text()
    )
    assert full["method"] == "mc_dropout" and full["method_options"]["prefix_once"] is False
    for label, plan in plans.items():  # trained from scratch with the bench's settings
        cfg = json.loads((out / "final" / "runs" / f"{label}-seed0" / "config.json").read_text())
        assert cfg["method"] == "placement" and cfg["train"]["epochs"] == 1
        assert PlacementPlan.from_dict(cfg["method_options"]["plan"]).key() == plan.key()
    md = (out / "final" / "comparison.md").read_text()
    headers, lines = comparison(rows, list(plans), base)
    assert len(lines) == len(base) * len(plans)
    for line in lines:
        assert "| " + " | ".join(line) + " |" in md
    assert "AUROC mnist vs baseline %" in headers
    # a second run reads everything back: nothing retrained
    mtimes = {p: p.stat().st_mtime for p in (out / "final" / "runs").rglob("model.safetensors")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
