"""The placement search as an Optuna study: NSGA-II over placement plans, three objectives
(validation NLL down, search-time OOD AUROC up, prediction cost down), a storage URL so that a
stopped search continues and several workers can share one study.

The cost the sampler sees is the counted FLOPs of one prediction per image (placement-aware:
a deterministic prefix once, the stochastic tail once per member and sample), a deterministic
function of the plan: the plans a search proposes depend only on its seed and settings, never
on timing noise. The measured predict latency is recorded beside it (trial user attribute
``objectives``, ``pareto.csv``, ``pareto.png``) and is what ``--max-latency-ms`` constrains
(a search with that constraint depends on timing near the limit).

Each trial samples a plan from the :class:`~bnnkit.search.space.SearchSpace` through
``trial.suggest_categorical`` and trains it with the ``placement`` method into a run directory
named by the plan's hash (``OUT/candidates/<hash>``): a plan already evaluated by any trial (the
sampler proposes duplicates in small spaces) is read back, not trained again, and a candidate
whose worker was killed resumes from its last epoch. The objective is a plain function of a
trial; orchestration (study, storage, budget) stays outside it.

Default sampler: NSGA-II, Optuna's default for several objectives; TPE (``sampler='tpe'``) is
the alternative. Multi-objective trials cannot be pruned: every candidate trains to the end.

On a segmentation data set (label maps, e.g. ``--dataset camvid --model deeplabv3plus``) the
objectives are :data:`~bnnkit.search.objectives.SEG_OBJECTIVES`: the pixel NLL over the
non-void validation pixels (mIoU recorded beside it), the pixel AUPR of the predictive entropy
on validation images with pasted synthetic anomalies (``--ood-family`` chooses what is pasted,
``--n-ood`` caps how many validation images get one; the data's held-out classes are marked in
the test split only, which the search never reads) and the FLOPs per image; the latency
recorded and constrained is per image. ``--units parts`` groups a segmentation network's layers
by its parts (backbone stages, ``aspp.*``, ``decoder.*``, ``classifier``) instead of by block.
What has no segmentation form is refused before any work: a classification model on label
maps (and the reverse), baselines without a segmentation form, held-out classes on a
classification data set.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import io as stdio
import json
import os
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from tqdm.auto import tqdm

from .. import io
from ..data import DataBundle, load_bundle
from ..errors import ConfigError
from ..evaluate import EVAL_OPTIONS
from ..options import Option, OptionTable, declared_by
from ..plan import PlacementPlan
from ..report.figures import pareto_plot
from ..train import RunConfig, train_run
from ..train.config import DATA_OPTIONS, RUN_OPTIONS, TRAIN_OPTIONS, check_extras, run_config
from ..train.run import check_run, check_writable
from .objectives import (
    OOD_FAMILIES,
    SEG_OBJECTIVES,
    evaluate_candidate,
    evaluate_segmentation_candidate,
    search_ood_set,
    synthetic_anomalies,
)
from .space import DEFAULT_KINDS, GROUPINGS, SearchSpace, search_units

DIRECTIONS = ("minimize", "maximize", "minimize")  # val NLL, OOD AUROC, FLOPs per image
#: what the sampler sees: all three are deterministic functions of the plan, the seed and the
#: settings (measured latency is reported beside them, never fed to the sampler)
OBJECTIVES = ("val_nll", "ood_auroc", "flops_per_image")
#: the objectives of studies made before the cost became deterministic
_OLD_OBJECTIVES = ["val_nll", "ood_auroc", "latency_ms"]
#: baselines without a segmentation form (their post-hoc fit refuses segmentation models)
_NO_SEGMENTATION = ("laplace_diag", "laplace_subnetwork")


SEARCH_OPTIONS = OptionTable(
    "search config",
    [
        Option("out", "str", "runs/search", "output directory"),
        DATA_OPTIONS["dataset"],
        DATA_OPTIONS["anomaly_classes"],
        RUN_OPTIONS["model"],
        # the proxy: 3 epochs on 8,000 images ranks plans by validation NLL about as well as a
        # second seed of the bench's 5 epochs on 16,000 (BENCHMARKS.md, Kendall tau)
        dataclasses.replace(TRAIN_OPTIONS["epochs"], default=3,
                            help="training epochs per candidate"),
        dataclasses.replace(DATA_OPTIONS["subset"], default=8000,
                            help="training examples per candidate (null: all)"),
        DATA_OPTIONS["val_size"].with_default(2000),
        TRAIN_OPTIONS["batch_size"],
        TRAIN_OPTIONS["lr"],
        dataclasses.replace(RUN_OPTIONS["seed"], help="seed of the sampler, the candidates' "
                            "training and the train/validation split"),
        Option("trials", "int", 20, "completed trials in the study (all workers)", low=1),
        Option("storage", "str", None, "Optuna storage URL (null: a SQLite file in out)",
               nullable=True),
        Option("study", "str", "bnnkit-search", "study name (workers on one storage share it)"),
        Option("sampler", "choice", "nsga2", "NSGA-II (several objectives) or TPE",
               choices=("nsga2", "tpe")),
        # its first generation is random, so a small budget needs a small population to evolve
        # at all (Optuna's default, 50, would make 40 trials random)
        Option("population", "int", 16, "NSGA-II generation size", low=2),
        Option("members", "int_list", [2, 4], "ensemble sizes a plan may use", low=1),
        Option("samples", "int_list", [1, 2, 4, 8], "posterior samples a plan may use", low=1),
        Option("n_ood", "int", 1000, "search-time OOD images (segmentation: validation images "
               "with a pasted synthetic anomaly, at most all of them)", low=1),
        # "mixed" agrees best with the test OOD sets; noise images alone are unstable across
        # seeds (BENCHMARKS.md)
        Option("ood_family", "choice", "mixed", "search-time OOD images, never test data "
               "(see objectives.search_ood_set; segmentation: what is pasted into validation "
               "images, objectives.synthetic_anomalies)", choices=OOD_FAMILIES),
        Option("units", "choice", "blocks", "searchable units: residual blocks and single "
               "layers, or the network's parts (e.g. DeepLabV3+'s backbone stages, aspp, "
               "decoder, classifier; see space.search_units)", choices=GROUPINGS),
        EVAL_OPTIONS["latency_batch"],
        EVAL_OPTIONS["memory_budget"],
        # a trial silent for 2 heartbeats (or, created by a worker killed before its first
        # heartbeat, unclaimed for 2 heartbeats) is failed and its plan retried
        Option("heartbeat", "int", 30, "seconds between trial heartbeats", low=1),
        Option("max_latency_ms", "float", None, "constraint: predict latency per batch in ms "
               "(segmentation: per image; null: none)", low=0.0, low_open=True, nullable=True),
        Option("max_parameters", "int", None, "constraint: parameter count (null: none)",
               low=1, nullable=True),
        Option("progress", "bool", True, "progress bars"),
    ],
)  # fmt: skip


@dataclass
@declared_by(SEARCH_OPTIONS)
class SearchConfig:
    """A placement search: one field per option of :data:`SEARCH_OPTIONS` (plans above the
    optional constraints are infeasible: NSGA-II's constrained domination), plus the lists and
    mappings below."""

    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))
    #: methods trained and scored with the same proxy, marked on the Pareto plot
    baselines: list[str] = field(
        default_factory=lambda: ["deterministic", "mc_dropout", "deep_ensemble"]
    )
    #: further train config fields for every candidate and baseline (optimizer, loader,
    #: precision, channels_last, ...: the GPU recipe); the fields above win
    train_options: dict = field(default_factory=dict)
    #: architecture options (e.g. ``{"width": 16}``)
    model_options: dict = field(default_factory=dict)

    def validate(self) -> SearchConfig:
        """Every option against :data:`SEARCH_OPTIONS`, the lists' types, and the train and
        model options with the search's own values (ConfigError before any work)."""
        if self.ood_family not in OOD_FAMILIES:
            raise ConfigError(
                f"unknown search OOD family {self.ood_family!r}; use one of "
                + ", ".join(OOD_FAMILIES)
            )
        SEARCH_OPTIONS.resolve({o.name: getattr(self, o.name) for o in SEARCH_OPTIONS})
        for name in ("kinds", "baselines"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of names, got {value!r}")
        check_extras("search", self.train_options, self.model, self.model_options,
                     reserved=("epochs", "batch_size", "lr", "progress"),
                     fixed={"epochs": self.epochs, "batch_size": self.batch_size,
                            "lr": self.lr})  # fmt: skip
        return self

    def run_config(self, method: str, method_options: dict | None = None) -> RunConfig:
        """The config of one candidate or baseline run: the tables' defaults, the search's
        ``train_options``, then its own epochs, batch size and learning rate; the data split
        seeded by the search's seed."""
        return run_config(
            method=method,
            method_options=method_options,
            model=self.model,
            model_options=self.model_options,
            seed=self.seed,
            data={"dataset": self.dataset, "val_size": self.val_size, "subset": self.subset,
                  "split_seed": self.seed, "anomaly_classes": self.anomaly_classes},
            train_options=self.train_options,
            train={"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                   "progress": False},
        )  # fmt: skip

    def storage_url(self) -> str:
        """The storage URL (nothing is created: the default SQLite file is made when the
        study is, after every check passed)."""
        if self.storage:
            return self.storage
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


def _require_optuna() -> None:
    """The Optuna API the search relies on: heartbeats recorded on an ``RDBStorage``, stale
    trials failed by ``optuna.storages.fail_stale_trials`` and re-queued by
    ``RetryHeartbeatStaleTrialCallback`` (pinned to optuna 5 in the package metadata)."""
    needed = (
        hasattr(optuna.storages.RDBStorage, "record_heartbeat"),
        hasattr(optuna.storages, "fail_stale_trials"),
        hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"),
    )
    if not all(needed):
        raise ConfigError(
            f"the placement search needs optuna 5's heartbeat API, found optuna "
            f"{optuna.__version__}; install a supported version: pip install 'optuna>=5,<6'"
        )


def _shown(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: shown as given
        return url


def _engine(url: str):
    """A SQLAlchemy engine for ``url`` (nothing connects yet), or a ConfigError that names what
    is wrong with the URL."""
    import sqlalchemy
    import sqlalchemy.exc

    try:
        parsed = sqlalchemy.engine.make_url(url)
        # an unreachable host fails within seconds instead of the system's TCP timeout
        args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
        return sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=args)
    except sqlalchemy.exc.ArgumentError as e:  # NoSuchModuleError: an unknown dialect
        raise ConfigError(
            f"--storage {url!r} is not a database URL SQLAlchemy can open "
            f"({str(e).splitlines()[0]}); use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DATABASE"
        ) from None
    except ImportError as e:  # the dialect is known, its driver is not installed
        raise ConfigError(
            f"the database driver for --storage {_shown(url)} is not installed ({e}); install "
            "it (postgresql+psycopg:// needs: pip install 'psycopg[binary]') or use "
            "sqlite:///PATH"
        ) from None


def _check_reachable(url: str) -> None:
    """Connect once: a server that is down, a wrong host or database, or a missing socket is
    refused here, at once, rather than retried as if it were a table-creation race."""
    import sqlalchemy
    import sqlalchemy.exc

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as e:
        cause = getattr(e, "orig", None) or e
        first = next((line for line in str(cause).splitlines() if line.strip()), type(e).__name__)
        fix = (
            "check that the file's directory exists and is writable"
            if url.startswith("sqlite")
            else "start the server, or fix the host, socket, user or database in the URL"
        )
        raise ConfigError(
            f"cannot reach the database at --storage {_shown(url)} ({first.strip()}); {fix}"
        ) from None
    finally:
        engine.dispose()


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
    engine = _engine(url)
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


def _is_race(e: BaseException) -> bool:
    """Whether ``e`` is a lost race of workers creating one schema or study (retried), not a
    fault of the database or the URL (refused at once)."""
    import sqlalchemy.exc

    if isinstance(e, optuna.exceptions.StorageInternalError):
        return e.__cause__ is not None and _is_race(e.__cause__)
    if isinstance(e, (sqlalchemy.exc.IntegrityError, optuna.exceptions.DuplicatedStudyError)):
        return True
    if isinstance(e, sqlalchemy.exc.ProgrammingError):
        # PostgreSQL: DuplicateTable / DuplicateObject (SQLSTATE 42P07 / 42710)
        return getattr(getattr(e, "orig", None), "sqlstate", None) in ("42P07", "42710")
    if isinstance(e, sqlalchemy.exc.OperationalError):  # SQLite: a busy file, a created table
        text = str(e).lower()
        return "locked" in text or "already exists" in text
    return False


def _retrying(cfg: SearchConfig, make, attempts: int):
    """``make()`` under the schema lock, retried while it loses creation races."""
    import sqlalchemy.exc

    url = cfg.storage_url()
    for attempt in range(attempts):
        try:
            with _schema_lock(url):
                return make()
        except (
            sqlalchemy.exc.SQLAlchemyError,
            optuna.exceptions.DuplicatedStudyError,
            optuna.exceptions.StorageInternalError,
        ) as e:
            if not _is_race(e) or attempt == attempts - 1:
                raise ConfigError(
                    f"cannot open the Optuna study {cfg.study!r} at {_shown(url)}: "
                    f"{str(e).splitlines()[0]}; check the storage URL, the database's "
                    "permissions and that its server runs"
                ) from e
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _open_storage(cfg: SearchConfig, attempts: int = 10) -> optuna.storages.RDBStorage:
    """The study's storage with heartbeats, its schema created if the database is fresh. The
    URL and the server are checked first (one clear error, no retries)."""
    _require_optuna()
    url = cfg.storage_url()
    _engine(url).dispose()  # the URL names a dialect and driver we have
    if not cfg.storage:  # the default SQLite file lives in --out
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    _check_reachable(url)

    def make():
        with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=cfg.heartbeat,
                grace_period=2 * cfg.heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=3
                ),
            )

    return _retrying(cfg, make, attempts)


def _create_study(cfg: SearchConfig, storage, attempts: int = 10) -> optuna.Study:
    def make():
        return optuna.create_study(
            storage=storage,
            study_name=cfg.study,
            directions=list(DIRECTIONS),
            sampler=_sampler(cfg),
            load_if_exists=True,
        )

    return _retrying(cfg, make, attempts)


def _open_study(cfg: SearchConfig, attempts: int = 10) -> optuna.Study:
    """Create or load the study. Workers started together on a fresh database would race to
    create its schema and the study: on PostgreSQL an advisory lock serialises them; elsewhere
    the loser of such a race retries."""
    return _create_study(cfg, _open_storage(cfg, attempts), attempts)


#: the settings that decide a candidate's objectives: a study (and an output directory, which
#: caches candidates by plan) holds evaluations of one value of them only
SETTINGS = ("dataset", "model", "epochs", "subset", "val_size", "batch_size", "lr", "seed",
            "kinds", "members", "samples", "n_ood", "ood_family", "latency_batch",
            "train_options", "model_options", "anomaly_classes", "units",
            "memory_budget")  # fmt: skip
#: settings added after studies were first stored: a stored study without them had these
_SETTING_DEFAULTS = {"train_options": {}, "model_options": {}, "objectives": _OLD_OBJECTIVES,
                     "anomaly_classes": DATA_OPTIONS["anomaly_classes"].default,
                     "units": "blocks",
                     "memory_budget": EVAL_OPTIONS["memory_budget"].default}  # fmt: skip


def _settings(cfg: SearchConfig) -> dict:
    return {k: getattr(cfg, k) for k in SETTINGS}


def _study_settings(cfg: SearchConfig, objectives=OBJECTIVES) -> dict:
    """What a study pins: the candidates' settings and the objectives its sampler saw."""
    return {**_settings(cfg), "objectives": list(objectives)}


def _differences(old: dict, new: dict) -> str:
    def was(k):
        return old.get(k, _SETTING_DEFAULTS.get(k))

    return "; ".join(f"{k}: {was(k)!r} -> {v!r}" for k, v in new.items() if was(k) != v)


def _check_out_settings(cfg: SearchConfig) -> None:
    """Refuse an output directory whose candidates were evaluated with other settings (reads
    only: the settings are written by :func:`_write_out_settings` once every check passed)."""
    path = Path(cfg.out) / "search_settings.json"
    if path.is_file():
        diff = _differences(json.loads(path.read_text()), _settings(cfg))
        if diff:
            raise ConfigError(
                f"{cfg.out} holds candidates evaluated with other settings ({diff}); their "
                "objectives are not comparable: use another --out, or the same settings"
            )


def _write_out_settings(cfg: SearchConfig) -> None:
    path = Path(cfg.out) / "search_settings.json"
    if not path.is_file():
        io.atomic_write_text(path, json.dumps(_settings(cfg), indent=2))


def _study_refusal(cfg: SearchConfig, old: dict, objectives=OBJECTIVES) -> ConfigError | None:
    diff = _differences(old, _study_settings(cfg, objectives))
    if not diff:
        return None
    fix = "start another with --study NAME"
    if "objectives" in diff:
        fix = "start another with --study NAME (its sampler saw other objectives)"
    return ConfigError(
        f"the study {cfg.study!r} holds trials evaluated with other settings ({diff}); "
        f"continue it with the same settings, or {fix}"
    )


def _check_study_settings(storage, cfg: SearchConfig, objectives=OBJECTIVES) -> None:
    """Refuse a stored study pinned to other settings (reads only; an absent study passes)."""
    try:
        study_id = storage.get_study_id_from_name(cfg.study)
    except KeyError:
        return
    old = storage.get_study_user_attrs(study_id).get("settings")
    if old is not None and (err := _study_refusal(cfg, old, objectives)) is not None:
        raise err


def _pin_study_settings(study: optuna.Study, cfg: SearchConfig, objectives=OBJECTIVES) -> None:
    old = study.user_attrs.get("settings")
    if old is None:
        study.set_user_attr("settings", _study_settings(cfg, objectives))
    elif (err := _study_refusal(cfg, old, objectives)) is not None:  # pinned meanwhile
        raise err


def plan_hash(plan: PlacementPlan) -> str:
    return hashlib.sha256(plan.key().encode()).hexdigest()[:16]


class _Heartbeat:
    """A trial's liveness signal: one heartbeat recorded at once, then one every ``interval``
    seconds from a thread, until :meth:`close`."""

    def __init__(self, storage, trial_id: int, interval: float) -> None:
        storage.record_heartbeat(trial_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(storage, trial_id, interval), daemon=True
        )
        self._thread.start()

    def _beat(self, storage, trial_id: int, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a missed beat; the grace period is two of them
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class PlacementSearch:
    """One worker of a placement search (start several on one storage URL for more)."""

    def __init__(self, cfg: SearchConfig, bundle: DataBundle | None = None) -> None:
        """Check everything, then write: a refused search leaves the output directory and the
        study as it found them, so the corrected command is not refused in turn.

        ``bundle``: the data (default: ``cfg.dataset`` loaded with the search's split), e.g.
        a segmentation bundle of your own arrays (:func:`bnnkit.data.bundle.segmentation_bundle`);
        its name must be ``cfg.dataset``. Only its training and validation splits are read."""
        self.cfg = cfg.validate()
        check_writable(Path(cfg.out), create=False)
        _sampler(cfg)  # the sampler's name and population
        if bundle is None:
            bundle = load_bundle(
                cfg.dataset, val_size=cfg.val_size, subset=cfg.subset, split_seed=cfg.seed,
                ood=[], anomaly_classes=cfg.anomaly_classes,
            )  # fmt: skip
        elif bundle.name != cfg.dataset:
            raise ConfigError(
                f"the bundle is {bundle.name!r} but the search config names dataset "
                f"{cfg.dataset!r}; set dataset={bundle.name!r} so the study records its data"
            )
        self.bundle = bundle
        self.dense = bundle.dense
        #: the objectives the sampler sees, in the order of DIRECTIONS
        self.objectives = SEG_OBJECTIVES if self.dense else OBJECTIVES
        _check_task(cfg, bundle)
        if cfg.subset is not None and len(self.bundle.train) < cfg.subset:
            n = len(self.bundle.train)
            raise ConfigError(
                f"--subset {cfg.subset} is more than the {n:,} training examples of "
                f"{cfg.dataset} (beside its {cfg.val_size:,} validation images); use --subset "
                f"{n} or less, or --subset all"
            )
        from ..models import build_model

        backbone = build_model(
            cfg.model, self.bundle.input_shape, self.bundle.num_classes, **cfg.model_options
        )
        self.space = SearchSpace(
            backbone, kinds=cfg.kinds, members=cfg.members, samples=cfg.samples,
            units=search_units(backbone, cfg.units),
        )  # fmt: skip
        if self.dense:  # label maps: streamed as uint8, synthetic anomalies pasted in
            self.val = (self.bundle.val.x, self.bundle.val.y)
            self.ood = None
            self.anomalies = synthetic_anomalies(
                *self.val, cfg.ood_family, cfg.n_ood, seed=cfg.seed,
                ignore_index=self.bundle.ignore_index,
            )  # fmt: skip
        else:
            self.val = (self.bundle.val.float(), self.bundle.val.y)
            self.ood = search_ood_set(cfg.ood_family, self.val[0], cfg.n_ood, seed=cfg.seed)
            self.anomalies = None
        # a run's own refusals (Lightning's set-up from --train-option) before the first write
        base = cfg.run_config("deterministic")
        check_run(base, Path(cfg.out) / "baselines" / "deterministic", self.bundle)
        _check_out_settings(cfg)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = _open_storage(cfg)
        _check_study_settings(self.storage, cfg, self.objectives)
        # every check passed: from here on the search writes
        self.study = _create_study(cfg, self.storage)
        _pin_study_settings(self.study, cfg, self.objectives)
        _write_out_settings(cfg)
        self._study_id = self.storage.get_study_id_from_name(cfg.study)
        self._adopted: set[int] = set()
        self._said_waiting: set[int] = set()  # running trials announced as waited for

    # ------------------------------------------------------------------ one trial
    def run_config(self, plan: PlacementPlan) -> RunConfig:
        return self.cfg.run_config("placement", {"plan": plan.to_dict()})

    def evaluate(self, plan: PlacementPlan) -> dict[str, float]:
        """Train (or resume, or reuse) the candidate and measure its objectives. A lock file
        per candidate makes a second worker that drew the same plan wait and read it back."""
        run = Path(self.cfg.out) / "candidates" / plan_hash(plan)
        return self._evaluate_run(self.run_config(plan), run)

    def evaluate_baseline(self, method: str) -> dict[str, float]:
        run = Path(self.cfg.out) / "baselines" / method
        return self._evaluate_run(self.cfg.run_config(method), run)

    def _evaluate_run(self, cfg: RunConfig, run: Path) -> dict[str, float]:
        run.mkdir(parents=True, exist_ok=True)
        done = run / "objectives.json"
        with open(run / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if done.is_file():
                return json.loads(done.read_text())
            model = train_run(cfg, run, resume=True, bundle=self.bundle)
            if self.dense:
                obj = evaluate_segmentation_candidate(
                    model, self.val, self.anomalies, self.cfg.latency_batch, seed=self.cfg.seed,
                    memory_budget=self.cfg.memory_budget,
                )  # fmt: skip
            else:
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
        return tuple(obj[k] for k in self.objectives)

    def violations(self, obj: dict[str, float]) -> list[float]:
        """Amounts by which ``obj`` exceeds the constraints (<= 0: satisfied); a segmentation
        search constrains the latency per image (its timed batch depends on the memory
        budget and the plan's members)."""
        c = self.cfg
        latency = obj["latency_ms_per_image"] if self.dense else obj["latency_ms"]
        return [
            latency - c.max_latency_ms if c.max_latency_ms is not None else 0.0,
            obj["parameters"] - c.max_parameters if c.max_parameters is not None else 0.0,
        ]

    # ------------------------------------------------------------------ the loop
    def completed(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    def _trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self._study_id, number)

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

    def reap(self) -> None:
        """Fail the trials of dead workers, so that the budget counts live trials only.

        Trials whose heartbeats stopped are failed by Optuna's stale-trial check, which
        re-queues their plans. A worker killed after creating its trial but before its first
        heartbeat leaves a trial that check never sees (it has no heartbeat to be stale): a live
        worker marks its trial (user attribute ``worker``) right after the first heartbeat, so
        a running trial without the mark gets one heartbeat from here, the first time this
        worker sees it, and is failed like any other when no owner continues it."""
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for t in running:
            if "worker" not in t.user_attrs and t.number not in self._adopted:
                self._adopted.add(t.number)
                self.storage.record_heartbeat(self._trial_id(t.number))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def _counts(self) -> tuple[int, int]:
        """(complete, running) trials of the study."""
        states = [t.state for t in self.study.get_trials(deepcopy=False)]
        return (
            states.count(optuna.trial.TrialState.COMPLETE),
            states.count(optuna.trial.TrialState.RUNNING),
        )

    def _say_waiting(self, bar) -> None:
        """One line per running trial this worker waits for, the first time it does: a
        stopped worker's trial holds its slot until its heartbeat is stale."""
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for t in running:
            if t.number in self._said_waiting:
                continue
            self._said_waiting.add(t.number)
            bar.write(
                f"waiting for trial {t.number} of worker {t.user_attrs.get('worker', '?')}: "
                f"if that worker was stopped, its trial is failed and its plan re-queued once "
                f"its heartbeat is {2 * self.cfg.heartbeat} s old",
                file=sys.stderr,
            )

    def run(self) -> Path:
        """Ask, evaluate and tell until the study holds ``cfg.trials`` completed trials."""
        bar = tqdm(total=self.cfg.trials, disable=not self.cfg.progress, desc="search")
        pause = min(float(self.cfg.heartbeat), 5.0)
        while True:
            self.reap()
            done, running = self._counts()
            bar.n = min(done, self.cfg.trials)
            bar.refresh()
            if done >= self.cfg.trials:
                break
            if done + running >= self.cfg.trials:
                # the last slots are held by other workers' running trials: wait for them to
                # finish (or to be failed as stale, which re-queues their plans), creating
                # no trial meanwhile
                self._say_waiting(bar)
                time.sleep(pause)
                continue
            with warnings.catch_warnings():  # heartbeats are run below, around the trial
                warnings.filterwarnings("ignore", ".*Heartbeat of storage.*")
                trial = self.study.ask()
            try:
                # the heartbeat first: if this worker dies from here on, another fails the
                # trial after the grace period and the retry callback re-queues its plan
                beat = _Heartbeat(self.storage, self._trial_id(trial.number), self.cfg.heartbeat)
                try:
                    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
                    if self._over_budget(trial):  # a race for the last slot, lost: once
                        trial.set_user_attr("over_budget", True)
                        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                        continue
                    values = self.objective(trial)
                finally:
                    beat.close()
            except BaseException:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
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
        if self.dense:
            pareto_plot(
                trials,
                rows,
                base,
                out / "pareto.png",
                second=("anomaly_aupr", "synthetic anomaly AUPR (higher is better)"),
                latency=("latency_ms_per_image", "predict latency, ms per image (log)"),
            )
        else:
            pareto_plot(trials, rows, base, out / "pareto.png")
        chosen = choose(rows)
        PlacementPlan.from_dict(json.loads(chosen["plan"])).save(out / "plan.json")
        io.atomic_write_text(out / "search_config.json", json.dumps(asdict(self.cfg), indent=2))
        return out


def _check_task(cfg: SearchConfig, bundle: DataBundle) -> None:
    """Refuse, before any work, what does not fit the data's task: a classification model on
    label maps (or the reverse), baselines without a segmentation form, held-out classes on a
    classification data set."""
    from ..models import MODELS, model_task

    if cfg.model in MODELS and model_task(cfg.model) != bundle.task:
        fit = [m for m in MODELS if model_task(m) == bundle.task]
        raise ConfigError(
            f"model {cfg.model!r} is a {model_task(cfg.model)} model but {bundle.name!r} is a "
            f"{bundle.task} data set; use --model {' / '.join(fit)} (or register your own with "
            f"bnnkit.models.register_model(..., task={bundle.task!r}))"
        )
    if bundle.dense:
        bad = [b for b in cfg.baselines if b in _NO_SEGMENTATION]
        if bad:
            raise ConfigError(
                f"baseline(s) {bad} have no segmentation form; leave them out of the search's "
                "baselines (laplace_last_layer does segment)"
            )
    elif cfg.anomaly_classes != DATA_OPTIONS["anomaly_classes"].default:
        raise ConfigError(
            f"anomaly_classes={cfg.anomaly_classes!r} holds classes out of a segmentation data "
            f"set, but {bundle.name!r} is a classification data set; leave it at its default"
        )


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    io.atomic_write_text(path, buf.getvalue())


def choose(rows: list[dict], nll_tolerance: float = 0.02) -> dict:
    """The Pareto plan to deploy: the cheapest (fewest FLOPs per image; the earliest trial among
    equals) whose validation NLL is within ``nll_tolerance`` (relative) of the front's best. A
    deterministic cost, so that the same search chooses the same plan whatever the timing."""
    best = min(r["val_nll"] for r in rows)
    ok = [r for r in rows if r["val_nll"] <= best * (1 + nll_tolerance)]
    return min(ok, key=lambda r: (r["flops_per_image"], r.get("trial", 0)))
