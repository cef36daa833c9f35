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
    # the final bench with other settings: refused, naming what to delete (not the search)
    (tmp_path / "final.yaml").write_text(yaml.safe_dump({**bench, "epochs": 2}))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert f"delete {out / 'final'} to start the final comparison over" in r.stderr
    assert "epochs: 1 -> 2" in r.stderr
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes


def _search_settings(tmp_path):
    from dataclasses import asdict

    from bnnkit.search.study import SearchConfig

    return asdict(SearchConfig(out=str(tmp_path / "search"), model="mlp"))


def test_a_final_config_is_checked_before_the_search(tmp_path):
    """What the final bench would refuse after an hours-long search is refused before it:
    fields the search sets, invalid values, reuse directories that are no such bench."""
    from dataclasses import asdict, replace

    from bnnkit.bench import BenchConfig
    from bnnkit.search.final import check_final_config

    search = _search_settings(tmp_path)
    ok = BenchConfig(epochs=1, seeds=1)
    assert check_final_config(search, ok, given={"epochs", "seeds"}) == []
    # the search's own data and model may be repeated (a bench config of the same set-up);
    # fields the final comparison sets itself are returned, for a note
    same = replace(ok, dataset="fashion_mnist", model="mlp", methods=["swag"], out="elsewhere")
    given = {"dataset", "model", "methods", "out"}
    assert check_final_config(search, same, given=given) == ["methods", "out"]
    for key, value in (("dataset", "mnist"), ("model", "lenet5"),
                       ("model_options", {"width": 8})):  # fmt: skip
        with pytest.raises(ConfigError, match=f"f.yaml sets {key}: .*the search's"):
            check_final_config(search, replace(ok, **{key: value}), given={key}, source="f.yaml")
    with pytest.raises(ConfigError, match="seeds"):
        check_final_config(search, replace(ok, seeds=0))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile is a file, not a directory"):
        check_final_config(search, replace(ok, reuse=[str(tmp_path / "afile")]))
    with pytest.raises(ConfigError, match="nothere does not exist"):
        check_final_config(search, replace(ok, reuse=[str(tmp_path / "nothere")]))
    # a bench made with the same settings is accepted; one with other epochs refused by name
    src = tmp_path / "src"
    src.mkdir()
    (src / "results.sqlite").write_bytes(b"")
    final = replace(ok, dataset="fashion_mnist", model="mlp", out=str(tmp_path / "search/final"))
    (src / "bench_config.json").write_text(json.dumps({**asdict(final), "ood_sets": []}))
    check_final_config(search, replace(ok, reuse=[str(src)]))
    (src / "bench_config.json").write_text(
        json.dumps({**asdict(replace(final, epochs=3)), "ood_sets": []})
    )
    with pytest.raises(ConfigError, match="was made with other settings .*epochs: 3 -> 1"):
        check_final_config(search, replace(ok, reuse=[str(src)]))


def test_the_cli_refuses_a_bad_final_config_before_searching(tmp_path):
    (tmp_path / "f.yaml").write_text("dataset: mnist\nepochs: 1\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    for name, what in (("f.yaml", "sets dataset: 'mnist'"), ("list.yaml", "holds a YAML list"),
                       ("", "is a directory, not a file")):  # fmt: skip
        out = tmp_path / "search"
        cmd = [sys.executable, "-m", "bnnkit.cli", "search", "--out", str(out), "--trials", "2",
               "--final-config", str(tmp_path / name), "--quiet"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and what in r.stderr, r.stderr[-2000:]
        assert not out.exists()  # nothing made that the corrected command would trip over
