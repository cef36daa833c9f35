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
    assert len({r["plan"] for r in rows}) == len(rows)  # a plan drawn twice is listed once
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
    assert (out / "pareto.png").stat().st_size > 5000
    base = {r["name"]: r for r in csv.DictReader((out / "baselines.csv").open())}
    assert set(base) == {"deterministic", "mc_dropout", "deep_ensemble"}
    for name in base:  # trained once although both runs wrote the outputs
        assert [p.name for p in (out / "baselines" / name / "logs").iterdir()] == ["version_0"]
    study = optuna.load_study(study_name="bnnkit-search", storage=again.cfg.storage_url())
    assert len(study.trials) >= 6


def test_choice_is_the_fastest_plan_near_the_best_nll():
    rows = [
        {"val_nll": 0.50, "latency_ms": 9.0, "plan": "a"},
        {"val_nll": 0.505, "latency_ms": 3.0, "plan": "b"},
        {"val_nll": 0.60, "latency_ms": 1.0, "plan": "c"},
    ]
    assert choose(rows)["plan"] == "b"


def _worker(out, storage, study, trials, *extra):
    import sys

    return [sys.executable, "-m", "bnnkit.cli", "search", "--out", str(out), "--storage", storage,
            "--study", study, "--trials", str(trials), "--model", "mlp", "--epochs", "1",
            "--subset", "256", "--batch-size", "64", "--quiet", "--no-baselines",
            *extra]  # fmt: skip


def test_two_workers_on_postgresql_share_one_study(tmp_path, postgres_url):
    import subprocess

    out = tmp_path / "shared"
    procs = [subprocess.Popen(_worker(out, postgres_url, "two", 5)) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = optuna.load_study(study_name="two", storage=postgres_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5  # the budget is global, not per worker
    assert not (out / "baselines").exists() and (out / "pareto.csv").is_file()  # --no-baselines
    # the workers did not propose the same plans: draws are seeded by trial number, not worker
    assert len({t.user_attrs["plan"] for t in done}) == 5
    for cand in (out / "candidates").iterdir():  # each plan trained once, by one worker
        assert (cand / "objectives.json").is_file()
        assert [p.name for p in (cand / "logs").iterdir()] == ["version_0"]


def test_a_killed_workers_trial_is_retried(tmp_path, postgres_url):
    import signal
    import subprocess
    import time

    out = tmp_path / "killed"
    slow = ["--heartbeat", "1", "--epochs", "3", "--subset", "4096"]
    a = subprocess.Popen(_worker(out, postgres_url, "kill", 3, *slow))
    deadline = time.time() + 120
    running = []
    while time.time() < deadline and not running:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="kill", storage=postgres_url)
            running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
        except KeyError:  # the study is not created yet
            continue
    assert running, "worker never started a trial"
    time.sleep(1.0)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    b = subprocess.run(_worker(out, postgres_url, "kill", 3, *slow), timeout=300)
    assert b.returncode == 0
    study = optuna.load_study(study_name="kill", storage=postgres_url)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    killed = study.trials[running[0].number]
    assert killed.state == optuna.trial.TrialState.FAIL
    retried = [
        t
        for t in study.trials
        if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number
    ]
    assert retried and retried[0].state == optuna.trial.TrialState.COMPLETE  # fmt: skip
    assert retried[0].params == killed.params


def test_constraints_restrict_the_reported_front(tmp_path):
    cfg = _cfg(tmp_path, trials=5)
    cfg.baselines = []
    search = PlacementSearch(cfg)
    search.run()
    params = sorted(t.user_attrs["objectives"]["parameters"] for t in search.completed())
    cfg.max_parameters = int(params[0])  # only the smallest plan(s) are feasible
    constrained = PlacementSearch(cfg)
    out = constrained.run()
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert rows and all(float(r["parameters"]) <= params[0] for r in rows)
    assert constrained.violations({"latency_ms": 1.0, "parameters": params[0] + 1})[1] == 1
    cfg.max_parameters = 1
    import pytest

    from bnnkit import ConfigError

    with pytest.raises(ConfigError, match="no completed trial satisfies the constraints"):
        PlacementSearch(cfg).run()


def _open_after(barrier, url, study):
    from bnnkit.search.study import SearchConfig, _open_study

    barrier.wait()
    _open_study(SearchConfig(out="unused", storage=url, study=study), attempts=1)


def test_workers_started_together_on_a_fresh_database_all_open_the_study(postgres_url):
    """Many workers creating the schema of a fresh database at the same instant: none may lose
    the CREATE TABLE race (attempts=1 leaves no retry to hide behind)."""
    import multiprocessing as mp

    import sqlalchemy

    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text("CREATE DATABASE fresh_race"))
    admin.dispose()
    url = postgres_url.replace("/bnnkit?", "/fresh_race?")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_open_after, args=(barrier, url, "race")) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 6
    assert len(optuna.get_all_study_names(storage=url)) == 1


def test_a_study_or_output_directory_refuses_other_settings(tmp_path):
    import pytest

    from bnnkit import ConfigError

    cfg = _cfg(tmp_path, trials=1)
    cfg.baselines = []
    PlacementSearch(cfg).run()
    cfg.epochs = 2  # objectives of 2-epoch candidates are not comparable with 1-epoch ones
    with pytest.raises(ConfigError, match=r"other settings \(epochs: 1 -> 2\).*another --out"):
        PlacementSearch(cfg)
    cfg.storage = cfg.storage_url()  # the same study, from a fresh output directory
    cfg.out = str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=r"study 'bnnkit-search' holds trials .*epochs: 1 -> 2"):
        PlacementSearch(cfg)
    cfg.epochs, cfg.trials = 1, 2  # the same settings with a larger budget continue
    cfg.out = str(tmp_path / "search")
    assert len(PlacementSearch(cfg).completed()) == 1
    cfg.ood_family = "nonsense"
    with pytest.raises(ConfigError, match="unknown search OOD family 'nonsense'"):
        PlacementSearch(cfg)


def test_a_search_is_reproducible_from_its_seed(tmp_path):
    plans = []
    for run in ("a", "b"):
        cfg = _cfg(tmp_path / run, trials=3)
        cfg.baselines = []
        search = PlacementSearch(cfg)
        search.run()
        plans.append([t.user_attrs["plan"] for t in sorted(search.completed(),
                                                             key=lambda t: t.number)])  # fmt: skip
    assert plans[0] == plans[1] and len(set(plans[0])) > 1


def test_candidates_train_with_the_searchs_train_and_model_options(tmp_path):
    import pytest

    from bnnkit import ConfigError

    cfg = _cfg(tmp_path, trials=1)
    cfg.baselines = []
    cfg.train_options = {"loader": "tensor", "optimizer": "sgd"}
    cfg.model_options = {"hidden": [16]}
    out = PlacementSearch(cfg).run()
    (run,) = list((out / "candidates").iterdir())
    rc = json.loads((run / "config.json").read_text())
    assert rc["train"]["loader"] == "tensor" and rc["train"]["optimizer"] == "sgd"
    assert rc["model_options"] == {"hidden": [16]}
    cfg.train_options = {"loader": "tensor"}  # other candidates' objectives: refused
    with pytest.raises(ConfigError, match="train_options"):
        PlacementSearch(cfg)
    # an output directory from before these settings existed reads them as empty
    settings = out / "search_settings.json"
    old = json.loads(settings.read_text())
    del old["train_options"], old["model_options"]
    settings.write_text(json.dumps(old))
    cfg.train_options, cfg.model_options, cfg.storage = {}, {}, None
    cfg.study = "another"
    PlacementSearch(cfg)
    for bad, match in (({"epochs": 2}, "search settings"), ({"cutout": -1}, "cutout")):
        cfg.train_options = bad
        with pytest.raises(ConfigError, match=match):
            PlacementSearch(cfg)
