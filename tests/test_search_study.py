"""The placement search end to end on tiny real data: a resumable Optuna study on SQLite that
reports a Pareto front and a plan, evaluating no plan twice."""

import csv
import json
import random
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

import optuna
import pytest

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


def test_choice_is_the_cheapest_plan_near_the_best_nll_whatever_the_timing():
    rows = [
        {"trial": 0, "val_nll": 0.50, "flops_per_image": 9e4, "latency_ms": 1.0, "plan": "a"},
        {"trial": 1, "val_nll": 0.505, "flops_per_image": 3e4, "latency_ms": 9.0, "plan": "b"},
        {"trial": 2, "val_nll": 0.504, "flops_per_image": 3e4, "latency_ms": 2.0, "plan": "d"},
        {"trial": 3, "val_nll": 0.60, "flops_per_image": 1e4, "latency_ms": 0.5, "plan": "c"},
    ]
    assert choose(rows)["plan"] == "b"  # equal cost: the earlier trial, not the luckier timing


def _worker(out, storage, study, trials, *extra):
    import sys

    return [sys.executable, "-m", "bnnkit.cli", "search", "--out", str(out), "--storage", storage,
            "--study", study, "--trials", str(trials), "--model", "mlp", "--epochs", "1",
            "--subset", "256", "--batch-size", "64", "--quiet", "--no-baselines",
            *extra]  # fmt: skip


@contextmanager
def _workers(*cmds):
    """Worker processes, killed (and reaped) however the test ends."""
    procs = []
    try:
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_two_workers_on_postgresql_share_one_study(tmp_path, postgres_url):
    out = tmp_path / "shared"
    with _workers(*[_worker(out, postgres_url, "two", 5) for _ in range(2)]) as procs:
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = optuna.load_study(study_name="two", storage=postgres_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 5  # the budget is global, not per worker
    # a worker waiting for the other's last trials creates none: at most one lost race
    assert len(study.trials) <= 6
    assert not (out / "baselines").exists() and (out / "pareto.csv").is_file()  # --no-baselines
    # the workers did not propose the same plans: draws are seeded by trial number, not worker
    assert len({t.user_attrs["plan"] for t in done}) == 5
    for cand in (out / "candidates").iterdir():  # each plan trained once, by one worker
        assert (cand / "objectives.json").is_file()
        assert [p.name for p in (cand / "logs").iterdir()] == ["version_0"]


def test_a_killed_workers_trial_is_retried(tmp_path, postgres_url):
    out = tmp_path / "killed"
    slow = ["--heartbeat", "1", "--epochs", "3", "--subset", "4096"]
    with _workers(_worker(out, postgres_url, "kill", 3, *slow)) as (a,):
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
    with _workers(_worker(out, postgres_url, "kill", 3, *slow)) as (b,):
        assert b.wait(timeout=300) == 0
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


def _run_within(search, seconds):
    """``search.run()`` that must end within ``seconds`` (a stuck worker fails the test)."""
    errors = []

    def target():
        try:
            search.run()
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"the search did not finish within {seconds} s"
    if errors:
        raise errors[0]


def _states(cfg):
    study = optuna.load_study(study_name=cfg.study, storage=cfg.storage_url())
    return [t.state for t in study.trials]


def test_a_trial_orphaned_before_its_first_heartbeat_is_failed_and_the_search_goes_on(tmp_path):
    from bnnkit.search.study import OBJECTIVES

    for budget in (1, 2):  # the orphan holds the only slot, or one of two
        cfg = _cfg(tmp_path / str(budget), trials=budget)
        cfg.baselines, cfg.heartbeat = [], 1
        search = PlacementSearch(cfg)
        # a worker killed between creating its trial and its first heartbeat
        orphan = optuna.load_study(study_name=cfg.study, storage=cfg.storage_url()).ask()
        _run_within(search, 60)
        states = _states(cfg)
        assert states[orphan.number] == optuna.trial.TrialState.FAIL
        assert states.count(optuna.trial.TrialState.COMPLETE) == budget
        assert states.count(optuna.trial.TrialState.FAIL) == 1  # the orphan only
        done = search.completed()
        assert all(len(t.values) == len(OBJECTIVES) for t in done)


def test_a_worker_over_budget_waits_without_creating_trials(tmp_path, capsys):
    from bnnkit.search.study import OBJECTIVES

    cfg = _cfg(tmp_path, trials=1)
    cfg.baselines, cfg.heartbeat = [], 1
    search = PlacementSearch(cfg)
    plan = search.space.sample(lambda name, choices: choices[-1])
    obj = search.evaluate(plan)
    # another worker, alive, holds the only slot for about 3 s, then completes its trial
    storage = optuna.storages.RDBStorage(cfg.storage_url(), heartbeat_interval=1)
    other = optuna.load_study(study_name=cfg.study, storage=storage)
    with pytest.warns(UserWarning, match="Heartbeat"):
        trial = other.ask()
    tid = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(cfg.study), trial.number
    )
    storage.record_heartbeat(tid)
    trial.set_user_attr("worker", "other")
    stop = threading.Event()

    def other_worker():
        t0 = time.time()
        while not stop.wait(0.2):
            storage.record_heartbeat(tid)
            if time.time() - t0 > 3:
                trial.set_user_attr("plan", plan.key())
                trial.set_user_attr("objectives", obj)
                other.tell(trial, [obj[k] for k in OBJECTIVES])
                return

    beating = threading.Thread(target=other_worker, daemon=True)
    beating.start()
    try:
        _run_within(search, 60)
    finally:
        stop.set()
        beating.join()
    assert _states(cfg) == [optuna.trial.TrialState.COMPLETE]  # no trial made while waiting
    err = capsys.readouterr().err  # and says so, once, naming the trial and its worker
    assert err.count(f"waiting for trial {trial.number} of worker other") == 1
    assert "its heartbeat is 2 s old" in err


def test_a_search_proposes_the_same_plans_from_its_seed_whatever_the_timing(tmp_path, monkeypatch):
    """More trials than one NSGA-II population, and latencies that differ between the runs:
    the plans proposed after the random first generation must not depend on them."""
    from bnnkit.search import objectives

    measure = objectives.measure_cost
    runs = []
    for run in ("a", "b"):
        noise = random.Random(run)  # timing noise: other latencies in each run

        def noisy(*args, noise=noise, **kwargs):
            return {**measure(*args, **kwargs), "latency_ms": noise.uniform(0.1, 100.0)}

        monkeypatch.setattr(objectives, "measure_cost", noisy)
        cfg = _cfg(tmp_path / run, trials=6)
        cfg.baselines, cfg.population = [], 3
        search = PlacementSearch(cfg)
        search.run()
        done = sorted(search.completed(), key=lambda t: t.number)
        runs.append(
            (
                [t.user_attrs["plan"] for t in done],
                [t.user_attrs["objectives"]["latency_ms"] for t in done],
                (tmp_path / run / "search" / "plan.json").read_text(),
            )
        )
    (plans_a, lat_a, chosen_a), (plans_b, lat_b, chosen_b) = runs
    assert lat_a != lat_b  # the noise reached the measurements
    assert plans_a == plans_b and len(set(plans_a)) > 2
    assert chosen_a == chosen_b


def _search_args(out, *extra):
    return ["search", "--out", str(out), "--model", "mlp", "--epochs", "1", "--subset", "256",
            "--batch-size", "64", "--trials", "1", "--no-baselines", "--quiet",
            *extra]  # fmt: skip


def test_refused_searches_leave_nothing_behind_and_the_corrected_one_runs(tmp_path, capsys):
    from bnnkit.cli import main

    def refused(args, match):
        start = time.time()
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and match in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert time.time() - start < 8  # no retries of what is not a race

    shared = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_search_args(a, "--storage", shared, "--study", "s")) == 0
    # other settings on a pinned study, from a fresh --out: refused, the directory not made
    refused(_search_args(b, "--storage", shared, "--study", "s", "--epochs", "2"),
            "holds trials evaluated with other settings (epochs: 1 -> 2)")  # fmt: skip
    assert not b.exists()
    assert main(_search_args(b, "--storage", shared, "--study", "s", "--trials", "2")) == 0
    # other settings in a used --out: refused before any storage is opened or study made
    fresh = tmp_path / "fresh.sqlite3"
    refused(_search_args(a, "--storage", f"sqlite:///{fresh}", "--epochs", "2"),
            "holds candidates evaluated with other settings")  # fmt: skip
    assert not fresh.exists()
    # a URL nothing can open, a server that is not there, more examples than the data set
    c = tmp_path / "c"
    refused(_search_args(c, "--storage", "notadb://x"), "'notadb://x' is not a database URL")
    nowhere = f"postgresql+psycopg://postgres@/db?host={tmp_path / 'no-server'}"
    refused(_search_args(c, "--storage", nowhere), "cannot reach the database")
    refused(_search_args(c, "--subset", "100000"), "--subset 100000 is more than the 58,000")
    assert not c.exists()
    assert main(_search_args(c, "--storage", f"sqlite:///{fresh}")) == 0
    settings = json.loads((c / "search_settings.json").read_text())
    assert settings["subset"] == 256


def test_a_study_from_before_the_deterministic_cost_is_not_continued(tmp_path):
    from bnnkit import ConfigError
    from bnnkit.search.study import _settings

    cfg = _cfg(tmp_path, trials=1)
    cfg.storage = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    old = optuna.create_study(storage=cfg.storage, study_name=cfg.study,
                              directions=["minimize", "maximize", "minimize"])  # fmt: skip
    old.set_user_attr("settings", _settings(cfg))  # pinned before the objectives were
    with pytest.raises(ConfigError, match=r"objectives: \['val_nll', 'ood_auroc', 'latency_ms'\]"):
        PlacementSearch(cfg)
    assert not (tmp_path / "search").exists()


def test_a_local_server_changes_no_other_directory_and_is_gone_after_a_failure(tmp_path):
    import os
    import tempfile
    from pathlib import Path
    from urllib.parse import parse_qs, urlparse

    import sqlalchemy

    from bnnkit import ConfigError
    from bnnkit.search.localdb import local_postgres, postgres_bindir

    if postgres_bindir() is None:
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql)")
    watched = [tmp_path, *tmp_path.parents, Path(tempfile.gettempdir())]
    modes = {p: p.stat().st_mode for p in watched}
    if os.geteuid() == 0:  # a directory the postgres user cannot reach: refused, not opened up
        closed = tmp_path / "closed"
        closed.mkdir(mode=0o700)
        with pytest.raises(ConfigError, match="the postgres user cannot reach"):
            with local_postgres(closed / "cluster"):
                pass
        assert list(closed.iterdir()) == []
    with pytest.raises(RuntimeError, match="a failing test"):
        with local_postgres() as url:
            sock = Path(parse_qs(urlparse(url).query)["host"][0])
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect() as conn:
                assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
            raise RuntimeError("a failing test")
    assert not sock.parent.exists()  # stopped and removed
    with pytest.raises(sqlalchemy.exc.OperationalError):
        engine.connect()
    assert {p: p.stat().st_mode for p in watched} == modes
