"""The placement search as an Optuna study: NSGA-II over placement plans, three objectives
(validation NLL down, search-time OOD AUROC up, predict latency down), a storage URL so that a
stopped search continues and several workers can share one study.

Each trial samples a plan from the :class:`~bnnkit.search.space.SearchSpace` through
``trial.suggest_categorical`` and trains it with the ``placement`` method into a run directory
named by the plan's hash (``OUT/candidates/<hash>``): a plan already evaluated by any trial (the
sampler proposes duplicates in small spaces) is read back, not trained again, and a candidate
whose worker was killed resumes from its last epoch. The objective is a plain function of a
trial; orchestration (study, storage, budget) stays outside it.

Default sampler: NSGA-II, Optuna's default for several objectives; TPE (``sampler='tpe'``) is
the alternative. Multi-objective trials cannot be pruned: every candidate trains to the end.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io as stdio
import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.storages._heartbeat import get_heartbeat_thread
from tqdm.auto import tqdm

from .. import io
from ..data import load_bundle
from ..errors import ConfigError
from ..plan import PlacementPlan
from ..report.figures import pareto_plot
from ..train import DataConfig, RunConfig, TrainConfig, train_run
from ..train.config import check_extras
from .objectives import OOD_FAMILIES, evaluate_candidate, search_ood_set
from .space import DEFAULT_KINDS, SearchSpace

DIRECTIONS = ("minimize", "maximize", "minimize")  # val NLL, OOD AUROC, latency
OBJECTIVES = ("val_nll", "ood_auroc", "latency_ms")


@dataclass
class SearchConfig:
    out: str = "runs/search"
    dataset: str = "fashion_mnist"
    model: str = "lenet5"
    #: the proxy: 3 epochs on 8,000 images ranks plans by validation NLL about as well as a
    #: second seed of the bench's 5 epochs on 16,000 (BENCHMARKS.md, Kendall tau)
    epochs: int = 3
    subset: int | None = 8000
    val_size: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    trials: int = 20  # completed trials in the study, across workers
    storage: str | None = None  # default: sqlite in OUT
    study: str = "bnnkit-search"
    sampler: str = "nsga2"
    #: NSGA-II's generation size: its first generation is random, so a small budget needs a
    #: small population to evolve at all (Optuna's default, 50, would make 40 trials random)
    population: int = 16
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    members: list[int] = field(default_factory=lambda: [2, 4])
    samples: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    n_ood: int = 1000
    #: search-time OOD images (never test data), see objectives.search_ood_set: "mixed" agrees
    #: best with the test OOD sets; noise images alone are unstable across seeds (BENCHMARKS.md)
    ood_family: str = "mixed"
    latency_batch: int = 128
    heartbeat: int = 30  # seconds; a trial silent for 2 heartbeats is failed and retried
    #: optional constraints: plans above them are infeasible (NSGA-II's constrained domination)
    max_latency_ms: float | None = None
    max_parameters: int | None = None
    #: methods trained and scored with the same proxy, marked on the Pareto plot
    baselines: list[str] = field(
        default_factory=lambda: ["deterministic", "mc_dropout", "deep_ensemble"]
    )
    #: further train config fields for every candidate and baseline (optimizer, loader,
    #: precision, channels_last, ...: the GPU recipe); the fields above win
    train_options: dict = field(default_factory=dict)
    #: architecture options (e.g. ``{"width": 16}``)
    model_options: dict = field(default_factory=dict)
    progress: bool = True

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        Path(self.out).mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{Path(self.out).resolve() / 'search.sqlite3'}"


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose random draws for a trial are seeded by ``(seed, trial number)``.

    One sampler seeded once per worker would make every worker started with the same seed
    propose the same plans (each then trained once, but the trial budget spent twice); seeding
    per trial number, which the database hands out uniquely, keeps workers apart and a run
    reproducible. NSGA-II and TPE read their history from the storage, so a fresh inner sampler
    per trial loses nothing."""

    def __init__(self, make, seed: int) -> None:
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study, trial) -> None:
        digest = hashlib.sha256(f"{self._seed}:{trial.number}".encode()).digest()
        self._inner = self._make(int.from_bytes(digest[:4], "big"))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def _sampler(cfg: SearchConfig):
    if cfg.sampler == "nsga2":
        if cfg.population < 2:
            raise ConfigError(f"population must be >= 2, got {cfg.population}")
        return TrialSeededSampler(
            lambda s: optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=s),
            cfg.seed,
        )
    if cfg.sampler == "tpe":
        return TrialSeededSampler(lambda s: optuna.samplers.TPESampler(seed=s), cfg.seed)
    raise ConfigError(f"unknown sampler {cfg.sampler!r}; use nsga2 or tpe")


#: the advisory-lock key that serialises schema and study creation on PostgreSQL
_SCHEMA_LOCK_KEY = int.from_bytes(hashlib.sha256(b"bnnkit.search schema").digest()[:7], "big")


@contextmanager
def _schema_lock(url: str):
    """Hold a PostgreSQL session-level advisory lock while the schema and the study are created:
    workers started together on a fresh database otherwise race in ``CREATE TABLE`` and a loser
    sees DuplicateTable / DuplicateObject or a unique violation in the catalogue. Other databases
    get no lock (SQLite serialises writers itself; the retries below cover the rest)."""
    import sqlalchemy

    if not url.startswith("postgresql"):
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(
                    sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _SCHEMA_LOCK_KEY}
                )
    finally:
        engine.dispose()


def _open_study(cfg: SearchConfig, attempts: int = 10) -> optuna.Study:
    """Create or load the study. Workers started together on a fresh database would race to
    create its schema and the study: on PostgreSQL an advisory lock serialises them; elsewhere
    the loser of such a race retries."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            with _schema_lock(cfg.storage_url()):
                return _create_or_load(cfg)
        except (
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.OperationalError,
            sqlalchemy.exc.ProgrammingError,
            optuna.exceptions.DuplicatedStudyError,
            optuna.exceptions.StorageInternalError,
        ) as e:
            # PostgreSQL reports a lost CREATE TABLE race as DuplicateTable / DuplicateObject
            # (SQLSTATE 42P07 / 42710, a ProgrammingError); any other ProgrammingError (no
            # permission, wrong database) is not a race and is not retried.
            sqlstate = getattr(getattr(e, "orig", None), "sqlstate", None)
            racing = not isinstance(e, sqlalchemy.exc.ProgrammingError) or sqlstate in (
                "42P07",
                "42710",
            )
            if not racing or attempt == attempts - 1:
                raise ConfigError(
                    f"cannot open the Optuna study {cfg.study!r} at {cfg.storage_url()}: "
                    f"{str(e).splitlines()[0]}; check the storage URL and that the database runs"
                ) from e
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _create_or_load(cfg: SearchConfig) -> optuna.Study:
    storage = optuna.storages.RDBStorage(
        cfg.storage_url(),
        heartbeat_interval=cfg.heartbeat,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=3
        ),
    )
    return optuna.create_study(
        storage=storage,
        study_name=cfg.study,
        directions=list(DIRECTIONS),
        sampler=_sampler(cfg),
        load_if_exists=True,
    )


#: the settings that decide a candidate's objectives: a study (and an output directory, which
#: caches candidates by plan) holds evaluations of one value of them only
SETTINGS = ("dataset", "model", "epochs", "subset", "val_size", "batch_size", "lr", "seed",
            "kinds", "members", "samples", "n_ood", "ood_family", "latency_batch",
            "train_options", "model_options")  # fmt: skip
#: settings added after studies were first stored: a stored study without them had these
_SETTING_DEFAULTS = {"train_options": {}, "model_options": {}}


def _settings(cfg: SearchConfig) -> dict:
    return {k: getattr(cfg, k) for k in SETTINGS}


def _differences(old: dict, new: dict) -> str:
    def was(k):
        return old.get(k, _SETTING_DEFAULTS.get(k))

    return "; ".join(f"{k}: {was(k)!r} -> {v!r}" for k, v in new.items() if was(k) != v)


def _check_out_settings(cfg: SearchConfig) -> None:
    path = Path(cfg.out) / "search_settings.json"
    if path.is_file():
        diff = _differences(json.loads(path.read_text()), _settings(cfg))
        if diff:
            raise ConfigError(
                f"{cfg.out} holds candidates evaluated with other settings ({diff}); their "
                "objectives are not comparable: use another --out, or the same settings"
            )
    else:
        io.atomic_write_text(path, json.dumps(_settings(cfg), indent=2))


def _check_study_settings(study: optuna.Study, cfg: SearchConfig) -> None:
    old = study.user_attrs.get("settings")
    if old is None:
        study.set_user_attr("settings", _settings(cfg))
        return
    diff = _differences(old, _settings(cfg))
    if diff:
        raise ConfigError(
            f"the study {cfg.study!r} holds trials evaluated with other settings ({diff}); "
            "continue it with the same settings, or start another with --study NAME"
        )


def plan_hash(plan: PlacementPlan) -> str:
    return hashlib.sha256(plan.key().encode()).hexdigest()[:16]


class PlacementSearch:
    """One worker of a placement search (start several on one storage URL for more)."""

    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg
        if cfg.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {cfg.trials}")
        check_extras("search", cfg.train_options, cfg.model, cfg.model_options,
                     reserved=("epochs", "batch_size", "lr", "progress"),
                     fixed={"epochs": cfg.epochs, "batch_size": cfg.batch_size,
                            "lr": cfg.lr})  # fmt: skip
        self.bundle = load_bundle(
            cfg.dataset, val_size=cfg.val_size, subset=cfg.subset, split_seed=cfg.seed, ood=[]
        )
        from ..models import build_model

        backbone = build_model(
            cfg.model, self.bundle.input_shape, self.bundle.num_classes, **cfg.model_options
        )
        self.space = SearchSpace(
            backbone, kinds=cfg.kinds, members=cfg.members, samples=cfg.samples
        )
        if cfg.ood_family not in OOD_FAMILIES:
            raise ConfigError(
                f"unknown search OOD family {cfg.ood_family!r}; use one of "
                + ", ".join(OOD_FAMILIES)
            )
        self.val = (self.bundle.val.float(), self.bundle.val.y)
        self.ood = search_ood_set(cfg.ood_family, self.val[0], cfg.n_ood, seed=cfg.seed)
        _check_out_settings(cfg)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = _open_study(cfg)
        _check_study_settings(self.study, cfg)

    # ------------------------------------------------------------------ one trial
    def run_config(self, plan: PlacementPlan) -> RunConfig:
        c = self.cfg
        return RunConfig(
            method="placement",
            method_options={"plan": plan.to_dict()},
            model=c.model,
            model_options=dict(c.model_options),
            seed=c.seed,
            data=DataConfig(c.dataset, c.val_size, c.subset, c.seed),
            train=TrainConfig(**c.train_options, epochs=c.epochs, batch_size=c.batch_size,
                              lr=c.lr, progress=False),
        )  # fmt: skip

    def evaluate(self, plan: PlacementPlan) -> dict[str, float]:
        """Train (or resume, or reuse) the candidate and measure its objectives. A lock file
        per candidate makes a second worker that drew the same plan wait and read it back."""
        run = Path(self.cfg.out) / "candidates" / plan_hash(plan)
        return self._evaluate_run(self.run_config(plan), run)

    def evaluate_baseline(self, method: str) -> dict[str, float]:
        cfg = self.run_config(PlacementPlan({self.space.units[0]: "deterministic"}))
        cfg.method, cfg.method_options = method, {}
        return self._evaluate_run(cfg, Path(self.cfg.out) / "baselines" / method)

    def _evaluate_run(self, cfg: RunConfig, run: Path) -> dict[str, float]:
        run.mkdir(parents=True, exist_ok=True)
        done = run / "objectives.json"
        with open(run / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if done.is_file():
                return json.loads(done.read_text())
            model = train_run(cfg, run, resume=True, bundle=self.bundle)
            obj = evaluate_candidate(
                model, self.val, self.ood, self.cfg.latency_batch, seed=self.cfg.seed
            )
            io.atomic_write_text(done, json.dumps(obj.as_dict(), indent=1))
            return obj.as_dict()

    def objective(self, trial: optuna.Trial) -> tuple[float, float, float]:
        plan = self.space.sample(lambda name, choices: trial.suggest_categorical(name, choices))
        trial.set_user_attr("plan", plan.key())
        obj = self.evaluate(plan)
        trial.set_user_attr("objectives", obj)
        # feasible when every value is <= 0: the samplers then prefer feasible plans
        latency, params = self.violations(obj)
        trial.set_constraint("latency_ms", latency)
        trial.set_constraint("parameters", params)
        return tuple(obj[k] for k in OBJECTIVES)

    def violations(self, obj: dict[str, float]) -> list[float]:
        """Amounts by which ``obj`` exceeds the constraints (<= 0: satisfied)."""
        c = self.cfg
        return [
            obj["latency_ms"] - c.max_latency_ms if c.max_latency_ms is not None else 0.0,
            obj["parameters"] - c.max_parameters if c.max_parameters is not None else 0.0,
        ]

    # ------------------------------------------------------------------ the loop
    def completed(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    def _over_budget(self, trial: optuna.Trial) -> bool:
        """Whether ``cfg.trials`` live trials (complete, running or waiting) were created
        before this one: trial numbers are assigned in the database, so workers racing for
        the last slots agree on who is over budget."""
        live = (
            optuna.trial.TrialState.COMPLETE,
            optuna.trial.TrialState.RUNNING,
            optuna.trial.TrialState.WAITING,
        )
        before = [t for t in self.study.get_trials(deepcopy=False, states=live)
                  if t.number < trial.number]  # fmt: skip
        return len(before) >= self.cfg.trials

    def run(self) -> Path:
        """Ask, evaluate and tell until the study holds ``cfg.trials`` completed trials."""
        bar = tqdm(total=self.cfg.trials, disable=not self.cfg.progress, desc="search")
        while True:
            done = len(self.completed())
            bar.n = min(done, self.cfg.trials)
            bar.refresh()
            if done >= self.cfg.trials:
                break
            optuna.storages.fail_stale_trials(self.study)  # trials of killed workers: retried
            with warnings.catch_warnings():  # heartbeats are run below, around the trial
                warnings.filterwarnings("ignore", ".*Heartbeat of storage.*")
                trial = self.study.ask()
            if self._over_budget(trial):
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                if len(self.completed()) >= self.cfg.trials:
                    break
                time.sleep(1.0)  # other workers hold the last slots; wait for them
                continue
            try:
                # heartbeats while the trial runs: if this worker dies, another fails the
                # trial after the grace period and the retry callback re-queues its plan
                with get_heartbeat_thread(trial._trial_id, self.study._storage):
                    values = self.objective(trial)
            except BaseException:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            self.study.tell(trial, values)
        bar.close()
        return self.write_outputs()

    def write_outputs(self) -> Path:
        out = Path(self.cfg.out)
        front = [t for t in self.study.best_trials
                 if all(v <= 0 for v in self.violations(t.user_attrs["objectives"]))]  # fmt: skip
        if not front:
            raise ConfigError(
                "no completed trial satisfies the constraints (max_latency_ms="
                f"{self.cfg.max_latency_ms}, max_parameters={self.cfg.max_parameters}); relax "
                "them or run more trials"
            )
        rows, seen = [], set()
        for t in sorted(front, key=lambda t: (t.values[2], t.number)):
            if t.user_attrs["plan"] in seen:  # a plan drawn twice is one point of the front
                continue
            seen.add(t.user_attrs["plan"])
            rows.append(
                {"trial": t.number, **t.user_attrs["objectives"], "plan": t.user_attrs["plan"]}
            )
        _write_csv(out / "pareto.csv", rows)
        base = [{"name": m, **self.evaluate_baseline(m)} for m in self.cfg.baselines]
        if base:
            _write_csv(out / "baselines.csv", base)
        trials = [t.user_attrs["objectives"] for t in self.completed()]
        pareto_plot(trials, rows, base, out / "pareto.png")
        chosen = choose(rows)
        PlacementPlan.from_dict(json.loads(chosen["plan"])).save(out / "plan.json")
        io.atomic_write_text(out / "search_config.json", json.dumps(asdict(self.cfg), indent=2))
        return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    io.atomic_write_text(path, buf.getvalue())


def choose(rows: list[dict], nll_tolerance: float = 0.02) -> dict:
    """The Pareto plan to deploy: the fastest whose validation NLL is within ``nll_tolerance``
    (relative) of the front's best."""
    best = min(r["val_nll"] for r in rows)
    ok = [r for r in rows if r["val_nll"] <= best * (1 + nll_tolerance)]
    return min(ok, key=lambda r: r["latency_ms"])
