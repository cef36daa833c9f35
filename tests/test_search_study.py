"""The placement search end to end on tiny real data: a resumable Optuna study on SQLite that
reports a Pareto front and a plan, evaluating no plan twice."""

import csv
import json

import optuna

from bnnkit.plan import PlacementPlan
from bnnkit.search.study import PlacementSearch, SearchConfig, choose, plan_hash


def _cfg(tmp_path, trials):
    return SearchConfig(
        out=str(tmp_path / "search"), model="mlp", epochs=1, subset=256, val_size=200,
        batch_size=64, trials=trials, kinds=["deterministic", "mc_dropout", "batch_ensemble"],
        members=[2], samples=[1, 2], n_ood=100, latency_batch=32, progress=False,
    )  # fmt: skip


def test_search_is_resumable_reports_a_front_and_evaluates_each_plan_once(tmp_path):
    first = PlacementSearch(_cfg(tmp_path, trials=3))
    first.run()
    assert len(first.completed()) == 3
    # a restarted search continues the same study up to its new budget
    again = PlacementSearch(_cfg(tmp_path, trials=6))
    out = again.run()
    done = again.completed()
    assert len(done) == 6
    keys = {t.user_attrs["plan"] for t in done}
    candidates = {p.name for p in (out / "candidates").iterdir()}
    assert candidates == {plan_hash(PlacementPlan.from_dict(json.loads(k))) for k in keys}
    for t in done:  # a plan proposed twice reports the same objectives (read back, not retrained)
        twins = [u for u in done if u.user_attrs["plan"] == t.user_attrs["plan"]]
        assert all(u.values == t.values for u in twins)
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert rows and {"val_nll", "ood_auroc", "latency_ms", "flops_per_image", "plan"} <= set(
        rows[0]
    )
    front = {int(r["trial"]) for r in rows}
    for t in done:  # nothing outside the front dominates a front member
        if t.number in front:
            continue
        assert any(
            all(a <= b for a, b in zip((f.values[0], -f.values[1], f.values[2]),
                                       (t.values[0], -t.values[1], t.values[2])))
            for f in done if f.number in front
        )  # fmt: skip
    plan = PlacementPlan.load(out / "plan.json")
    assert plan.key() in keys
    study = optuna.load_study(study_name="bnnkit-search", storage=again.cfg.storage_url())
    assert len(study.trials) >= 6


def test_choice_is_the_fastest_plan_near_the_best_nll():
    rows = [
        {"val_nll": 0.50, "latency_ms": 9.0, "plan": "a"},
        {"val_nll": 0.505, "latency_ms": 3.0, "plan": "b"},
        {"val_nll": 0.60, "latency_ms": 1.0, "plan": "c"},
    ]
    assert choose(rows)["plan"] == "b"
