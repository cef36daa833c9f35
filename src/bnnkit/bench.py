"""`bnnkit bench`: train and evaluate several methods on one data set, one table, figures.

Every (method, seed) is a run directory under ``OUT/runs``; finished runs and their
results are reused, a killed run resumes from its last epoch, so re-running the same
command after an interruption loses no completed work.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import io
from .data import load_bundle
from .data.corruptions import corruption_names
from .data.mnist_c import MNIST_C_SHAPE, mnist_c_names
from .errors import ConfigError
from .evaluate import EVAL_OPTIONS, EvalConfig, evaluate
from .methods import METHODS, UQModel, get_method, method_options
from .options import Option, OptionTable, declared_by
from .report import (
    SEG_COLUMNS,
    ResultStore,
    class_iou_summary,
    markdown,
    ood_summary,
    plain,
    shift_summary,
    summary,
)
from .report import figures as figs
from .report.tables import mnist_c_summary
from .report.training import convergence_summary, read_curve
from .train import Budget, check_writable, train_run
from .train.chunks import device_name
from .train.config import DATA_OPTIONS, TRAIN_OPTIONS, check_extras, run_config
from .train.run import check_run, check_same_config, config_diffs, is_complete

DEFAULT_METHODS = [
    "deterministic",
    "temperature_scaling",
    "mc_dropout",
    "deep_ensemble",
    "batch_ensemble",
    "rank1",
    "lpbnn",
    "mfvi",
    "laplace_diag",
    "laplace_last_layer",
    "laplace_subnetwork",
]
#: the default methods on a segmentation data set: the classification defaults without the
#: diagonal and subnetwork Laplace (no segmentation form) and mean-field VI (it runs on
#: segmentation networks, but its Flipout convolutions double a training step's cost)
SEG_DEFAULT_METHODS = [
    m for m in DEFAULT_METHODS if m not in ("mfvi", "laplace_diag", "laplace_subnetwork")
]
DEFAULT_CORRUPTIONS = [
    "gaussian_noise",
    "impulse_noise",
    "gaussian_blur",
    "contrast",
    "pixelate",
    "elastic",
]


BENCH_OPTIONS = OptionTable(
    "bench config",
    [
        # the bench's own defaults: short training on a 16,000-image subset, 5,000 test images
        TRAIN_OPTIONS["epochs"].with_default(5),
        Option("seeds", "int", 2, "seeds per method", low=1),
        DATA_OPTIONS["subset"].with_default(16000),
        DATA_OPTIONS["val_size"],
        DATA_OPTIONS["anomaly_classes"],
        Option("test_size", "int", 5000, "first N test and OOD images (null: all)", low=1,
               nullable=True),
        TRAIN_OPTIONS["batch_size"],
        TRAIN_OPTIONS["lr"],
        TRAIN_OPTIONS["weight_decay"],
        TRAIN_OPTIONS["kl_anneal_epochs"],
        TRAIN_OPTIONS["ensemble_protocol"],
        Option("device", "choice", "auto", "where to train and evaluate",
               choices=("auto", "cpu", "cuda", "gpu", "mps")),
        EVAL_OPTIONS["n_corrupt"].with_default(250),
        EVAL_OPTIONS["mnist_c"],
        dataclasses.replace(EVAL_OPTIONS["batch_size"], name="eval_batch_size"),
        EVAL_OPTIONS["n_rotate"].with_default(300),
        EVAL_OPTIONS["angles"],
        EVAL_OPTIONS["memory_budget"].with_default("512MB"),
        Option("model", "str", "lenet5", "architecture"),
        Option("dataset", "str", "fashion_mnist", "data set"),
        Option("out", "str", "runs/bench", "output directory"),
        Option("progress", "bool", True, "progress bars"),
        Option("max_minutes", "float", None, "stop at an epoch boundary after about this many "
               "minutes; re-running the command continues (null: no limit)", low=0.0,
               low_open=True, nullable=True),
    ],
)  # fmt: skip


#: the bench's options that are train options of every run (they win over ``train_options``)
_BENCH_TRAIN_FIELDS = [o.name for o in BENCH_OPTIONS if o.name in TRAIN_OPTIONS]


@dataclass
@declared_by(BENCH_OPTIONS)
class BenchConfig:
    """A bench: one field per option of :data:`BENCH_OPTIONS`, plus the nested settings below
    (lists of names and per-method mappings, checked by :meth:`validate`)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    #: architecture options (e.g. ``{"width": 16}`` for a narrow ResNet-18)
    model_options: dict[str, Any] = field(default_factory=dict)
    #: per-method option overrides; entries for methods not in ``methods`` are ignored
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "mc_dropout": {"samples": 8},
            "mfvi": {"samples": 8},
            "rank1": {"samples": 2},
            "lpbnn": {"samples": 2},
            # curvature on half the training subset (the bench's time budget)
            "laplace_diag": {"n_fit": 8000},
            "laplace_last_layer": {"n_fit": 8000},
            "laplace_subnetwork": {"n_fit": 8000},
        }
    )
    #: named variants of a method, usable in ``methods`` like a method name (one run
    #: directory and one table row each), e.g. ``{"subnet-random": {"method":
    #: "laplace_subnetwork", "strategy": "random"}}``; their options override ``method_options``
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: other bench directories whose finished runs are copied in instead of being trained
    #: again, each run only when its saved run config equals this bench's for that method and
    #: seed (the benches' data and evaluation settings must agree; checked before any write)
    reuse: list[str] = field(default_factory=list)
    #: further train config fields for every run (optimizer, loader, cutout, channels_last,
    #: compile, precision, warmup_epochs, momentum, augment); the options above win
    train_options: dict[str, Any] = field(default_factory=dict)
    #: corruption names (a list, or a comma-separated string; 'all'; '' / 'none' for none)
    corruptions: list[str] = field(default_factory=lambda: list(DEFAULT_CORRUPTIONS))

    def validate(self) -> None:
        """Check every setting; ``corruptions`` and ``mnist_c`` become the lists of registry
        names they select, so that equivalent spellings (``ALL``, ``all``, the 15 names;
        ``rotate``, ``[rotate]``) are one setting."""
        # mnist_c may also be a list of names (YAML): checked by name below
        BENCH_OPTIONS.resolve(
            {o.name: getattr(self, o.name) for o in BENCH_OPTIONS if o.name != "mnist_c"}
        )
        if not isinstance(self.methods, list) or not all(isinstance(m, str) for m in self.methods):
            raise ConfigError(f"methods must be a list of method names, got {self.methods!r}")
        if not self.methods:
            raise ConfigError("no methods given; e.g. --methods deterministic,deep_ensemble")
        if not isinstance(self.variants, dict):
            raise ConfigError(
                f"variants must be a mapping of label -> {{method: ..., options}}, got "
                f"{self.variants!r}"
            )
        if not isinstance(self.reuse, list) or not all(
            isinstance(r, str) and r.strip() for r in self.reuse
        ):
            raise ConfigError(
                f"reuse must be a list of bench directories (e.g. [runs/bench]), got {self.reuse!r}"
            )
        for label, spec in self.variants.items():
            if label in METHODS:
                raise ConfigError(f"variant {label!r} shadows the method of that name; rename it")
            if "/" in label or not label:
                raise ConfigError(f"variant name {label!r} must be non-empty, without '/'")
            if not isinstance(spec, dict) or "method" not in spec:
                raise ConfigError(
                    f"variant {label!r} needs a 'method' key naming the method it runs, e.g. "
                    "{method: laplace_subnetwork, strategy: random}"
                )
        check_extras("bench", self.train_options, self.model, self.model_options,
                     reserved=[o.name for o in BENCH_OPTIONS],
                     fixed={"epochs": self.epochs, "batch_size": self.batch_size})  # fmt: skip
        for m in self.methods:
            self.resolve(m)
        for m, opts in self.method_options.items():
            method_options(m, opts)  # unknown method or option: a clear error now, not later
        for m in self.methods:
            method_options(*self.resolve(m))
        self.corruptions = corruption_names(self.corruptions)
        self.mnist_c = mnist_c_names(self.mnist_c)

    def resolve(self, name: str) -> tuple[str, dict[str, Any]]:
        """``(method, options)`` of a method name or variant label."""
        if name in self.variants:
            spec = dict(self.variants[name])
            base = spec.pop("method")
            get_method(base)
            return base, {**self.method_options.get(base, {}), **spec}
        get_method(name)
        return name, dict(self.method_options.get(name, {}))


def _check_task(cfg: BenchConfig) -> None:
    """Refuse, before any write, what a segmentation bench cannot do."""
    from .data.sources import get_spec
    from .evaluate import GEOMETRIC_CORRUPTIONS

    spec = get_spec(cfg.dataset)
    if mnist_c_names(cfg.mnist_c) and (
        spec.task != "classification" or tuple(spec.input_shape) != MNIST_C_SHAPE
    ):
        raise ConfigError(
            f"MNIST-C is defined on 28x28 grey classification images, but {cfg.dataset} is a "
            f"{spec.task} data set of images {tuple(spec.input_shape)} (C, H, W); leave "
            "mnist_c out (e.g. use it with --dataset mnist or fashion_mnist)"
        )
    if spec.task != "segmentation":
        return
    moving = [c for c in cfg.corruptions if c in GEOMETRIC_CORRUPTIONS]
    if moving:
        raise ConfigError(
            f"corruption(s) {moving} move pixels, so {cfg.dataset}'s label maps would no longer "
            "match the images; leave them out (e.g. --corruptions gaussian_noise,contrast)"
        )
    if cfg.angles:
        raise ConfigError(
            f"rotation angles {cfg.angles} are a classification evaluation; pass --angles '' "
            f"for the segmentation data set {cfg.dataset}"
        )


def _accelerator(device: str) -> str:
    if device in ("auto", "cpu", "gpu", "cuda", "mps"):
        return "gpu" if device == "cuda" else device
    raise ConfigError(f"unknown device {device!r}; use auto, cpu or cuda")


def _torch_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA device is available")
    return torch.device("cuda" if device in ("cuda", "gpu") else "cpu")


def _order(cfg: BenchConfig) -> list[str]:
    """Training order: every post-hoc method after the method it starts from."""
    needed = list(cfg.methods)

    def posthoc_of(m: str) -> str | None:
        return get_method(cfg.resolve(m)[0]).posthoc_of

    for m in cfg.methods:
        base = posthoc_of(m)
        if base and base not in needed:
            needed.insert(0, base)
    return sorted(needed, key=lambda m: posthoc_of(m) is not None)


#: fields that may change between runs into the same output directory: adding methods or
#: seeds reuses the finished runs; anything else would mix results of different set-ups
_REUSABLE = {"methods", "seeds", "device", "out", "progress", "method_options", "variants",
             "max_minutes", "eval_batch_size", "reuse"}  # fmt: skip


#: recorded settings compared by what they select, not by their spelling (a bench recorded
#: before they were stored as lists may hold the text given, e.g. mnist_c "" or "all")
_RESOLVED = {"corruptions": corruption_names, "mnist_c": mnist_c_names}


def _same_setting(key: str, old, new) -> bool:
    resolve = _RESOLVED.get(key)
    if resolve is not None:
        try:
            return resolve(old) == resolve(new)
        except ConfigError:
            return False
    return old == new


def _setting_diffs(old: dict, cfg: BenchConfig, strict: bool = False) -> list[str]:
    """The settings (outside ``_REUSABLE``) in which the recorded bench ``old`` differs from
    ``cfg``; ``strict``: a setting ``old`` did not record is a difference too."""
    diffs = []
    for k, v in asdict(cfg).items():
        if k in _REUSABLE:
            continue
        if k not in old:
            if strict:
                diffs.append(f"{k}: not recorded -> {v!r}")
        elif not _same_setting(k, old[k], v):
            diffs.append(f"{k}: {old[k]!r} -> {v!r}")
    return diffs


_START_OVER = "use another --out, or delete it to start over"


def check_reusable(path: Path, cfg: BenchConfig, advice: str = _START_OVER) -> None:
    if not path.is_file():
        return
    diffs = _setting_diffs(json.loads(path.read_text()), cfg)
    if diffs:
        raise ConfigError(
            f"{path.parent} holds a bench made with other settings ({'; '.join(diffs)}); {advice}"
        )


def _check_ood_sets(path: Path, ood_sets: list[str]) -> None:
    """The OOD columns average over the OOD sets: rows kept from an earlier call must have been
    scored on the same sets (an OOD data set installed since would otherwise mix averages)."""
    if not path.is_file():
        return
    before = json.loads(path.read_text()).get("ood_sets")
    if before is not None and before != ood_sets:
        raise ConfigError(
            f"{path.parent} holds results scored on the OOD sets {before}, but {ood_sets} are "
            "available now; use another --out (or delete it) so that every row is scored on "
            "the same sets"
        )


def check_reuse_sources(cfg: BenchConfig, ood_sets: list[str] | None) -> list[Path]:
    """The ``reuse`` directories, each checked to be a bench scored like this one: the same
    data, model, training and evaluation settings and OOD sets (the methods may differ; None:
    the OOD sets are not known yet and not compared). A setting the source did not record
    counts as a difference: it cannot be shown to agree."""
    sources = []
    for name in cfg.reuse:
        src = Path(name)
        meta = src / "bench_config.json"
        if not src.is_dir():
            what = "is a file, not a directory" if src.exists() else "does not exist"
            raise ConfigError(
                f"reuse: {src} {what}; name the --out of an earlier bnnkit bench, or drop it "
                "from reuse"
            )
        if not meta.is_file() or not (src / "results.sqlite").is_file():
            raise ConfigError(
                f"reuse: {src} is not a bench directory (no bench_config.json / results.sqlite);"
                " name the --out of an earlier bnnkit bench"
            )
        if src.resolve() == Path(cfg.out).resolve():
            raise ConfigError(f"reuse: {src} is this bench's own output directory; drop it")
        try:
            old = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"reuse: {meta} is unreadable ({e}); drop it from reuse") from e
        diffs = _setting_diffs(old, cfg, strict=True)
        if ood_sets is not None and old.get("ood_sets") != ood_sets:
            diffs.append(f"ood_sets: {old.get('ood_sets', 'not recorded')!r} -> {ood_sets!r}")
        if diffs:
            raise ConfigError(
                f"reuse: {src} was made with other settings ({'; '.join(diffs)}); drop it from "
                "reuse, or make this bench's settings the same"
            )
        sources.append(src)
    return sources


def _adopt_run(src: Path, cfg: BenchConfig, method: str, seed: int, rc, run_dir: Path,
               store: ResultStore, log) -> bool:  # fmt: skip
    """Copy ``method``'s finished run of ``seed`` from the bench at ``src`` into ``run_dir``
    and its rows into ``store`` when that run was made with exactly ``rc``; True if copied."""
    src_run = src / "runs" / f"{method}-seed{seed}"
    if not (src_run / "predictions.safetensors").is_file() or not is_complete(src_run):
        return False
    diffs = config_diffs(src_run / "config.json", rc)
    if diffs is None:
        log(f"note: not reusing {src_run}: its config.json is unreadable")
        return False
    if diffs:
        log(f"note: not reusing {src_run}: made with other settings ({'; '.join(diffs)})")
        return False
    with ResultStore(src / "results.sqlite") as src_store:
        rows = src_store.rows(method=method, dataset=cfg.dataset, model=cfg.model, seed=seed)
    if not rows:
        return False
    # copy beside the target, then one rename: a kill leaves either no run or the whole run
    tmp = run_dir.with_name(run_dir.name + ".reuse-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_run, tmp)
    tmp.rename(run_dir)
    store.add_run(method, cfg.dataset, cfg.model, seed, run_dir, json.dumps(rc.to_dict()), rows)
    log(f"reused {src_run}")
    return True


def _run_config(cfg: BenchConfig, method: str, seed: int):
    """The RunConfig of one run of the bench (``method`` may name a variant)."""
    base_method, options = cfg.resolve(method)
    return run_config(
        method=base_method,
        method_options=options,
        model=cfg.model,
        model_options=cfg.model_options,
        seed=seed,
        data={
            "dataset": cfg.dataset,
            "val_size": cfg.val_size,
            "subset": cfg.subset,
            "anomaly_classes": cfg.anomaly_classes,
        },  # fmt: skip
        train_options=cfg.train_options,
        train={
            **{k: getattr(cfg, k) for k in _BENCH_TRAIN_FIELDS},
            "accelerator": _accelerator(cfg.device),
        },
    )


def for_task(cfg: BenchConfig) -> BenchConfig:
    """The bench as run on its data set: on a segmentation data set the default method and
    corruption lists become their segmentation forms (:data:`SEG_DEFAULT_METHODS`;
    no corruption that moves pixels, since the label maps must still match); lists the user
    gave are kept, and refused if they name what segmentation cannot do."""
    from .data.sources import get_spec
    from .evaluate import GEOMETRIC_CORRUPTIONS

    if get_spec(cfg.dataset).task != "segmentation":
        return cfg
    changes: dict[str, Any] = {}
    if cfg.methods == DEFAULT_METHODS:
        changes["methods"] = list(SEG_DEFAULT_METHODS)
    if cfg.corruptions == DEFAULT_CORRUPTIONS:
        changes["corruptions"] = [c for c in cfg.corruptions if c not in GEOMETRIC_CORRUPTIONS]
    if cfg.angles == EVAL_OPTIONS["angles"].default:
        changes["angles"] = []
    return dataclasses.replace(cfg, **changes) if changes else cfg


def run_bench(cfg: BenchConfig, log=print) -> str | None:
    """Train, evaluate, tabulate; return the printed table, or None when ``max_minutes`` ran
    out first (everything finished is kept; the same call continues)."""
    cfg.validate()
    cfg = for_task(cfg)
    _check_task(cfg)
    budget = Budget.minutes(cfg.max_minutes)
    out = Path(cfg.out)
    check_writable(out, create=False)
    device = _torch_device(cfg.device)
    check_reusable(out / "bench_config.json", cfg)
    bundle = load_bundle(
        cfg.dataset, val_size=cfg.val_size, subset=cfg.subset, test_size=cfg.test_size,
        anomaly_classes=cfg.anomaly_classes,
    )  # fmt: skip
    for name, why in bundle.missing_ood.items():
        log(f"note: OOD set {name} skipped: {why}")
    _check_ood_sets(out / "bench_config.json", sorted(bundle.ood))
    sources = check_reuse_sources(cfg, sorted(bundle.ood))
    order = _order(cfg)
    # every run's refusals (subset, model, Lightning's set-up) before the first write, so a
    # refused bench leaves nothing that would refuse the corrected command in turn
    for method in order:
        check_run(_run_config(cfg, method, 0), out / "runs" / f"{method}-seed0", bundle)
    # one bench writes an output directory at a time: a second call (the same command in
    # another terminal) is refused instead of training the same runs twice into one store
    with io.exclusive(out, "wait for it to finish, or give this bench another --out"):
        io.atomic_write_text(
            out / "bench_config.json", json.dumps({**asdict(cfg), "ood_sets": sorted(bundle.ood)},
                                                  indent=2)
        )  # fmt: skip
        eval_cfg = EvalConfig(
            corruptions=cfg.corruptions,
            mnist_c=cfg.mnist_c,
            n_corrupt=cfg.n_corrupt,
            n_rotate=cfg.n_rotate,
            angles=[] if bundle.dense else cfg.angles,
            batch_size=cfg.eval_batch_size,
            memory_budget=cfg.memory_budget,
            progress=cfg.progress,
        )
        arts: dict[str, dict] = {}
        with ResultStore(out / "results.sqlite") as store:
            jobs = [(s, m) for s in range(cfg.seeds) for m in order]
            bar = tqdm(jobs, desc="bench", disable=not cfg.progress)
            trained: dict[tuple[str, int], UQModel] = {}
            stopped = False
            for seed, method in bar:
                if budget.exhausted():
                    stopped = True
                    break
                bar.set_postfix_str(f"{method} seed {seed}")
                run_dir = out / "runs" / f"{method}-seed{seed}"
                rc = _run_config(cfg, method, seed)
                posthoc_of = get_method(rc.method).posthoc_of
                pred_path = run_dir / "predictions.safetensors"
                done = store.has(method, cfg.dataset, cfg.model, seed) and pred_path.is_file()
                if not done and not run_dir.exists():
                    done = any(
                        _adopt_run(src, cfg, method, seed, rc, run_dir, store, log)
                        for src in sources
                    )
                if done and method in cfg.methods:
                    check_same_config(run_dir / "config.json", rc)
                    if seed == 0:
                        arts[method] = io.load(pred_path, kind="predictions")
                    continue
                base = trained.get((posthoc_of or "", seed))
                if base is None and posthoc_of:
                    base_path = out / "runs" / f"{posthoc_of}-seed{seed}"
                    if (base_path / "model.safetensors").is_file():
                        base = UQModel.load(base_path / "model.safetensors")
                model = train_run(
                    rc, run_dir, resume=True, bundle=bundle, base_model=base, budget=budget
                )
                if not is_complete(run_dir):
                    stopped = True
                    break
                trained[(method, seed)] = model
                if method not in cfg.methods:
                    continue
                model.to(device)
                rows, art = evaluate(model, bundle, eval_cfg)
                model.cpu()
                rows += _train_rows(run_dir)
                io.save(art, pred_path, kind="predictions")
                io.atomic_write_text(run_dir / "metrics.json", json.dumps(rows, indent=1))
                store.add_run(
                    method, cfg.dataset, cfg.model, seed, run_dir, json.dumps(rc.to_dict()), rows
                )
                if seed == 0:
                    arts[method] = art
            rows = store.rows(dataset=cfg.dataset, model=cfg.model)
            store.to_csv(out / "results.csv")
        bar.close()
        if stopped:
            log(
                f"stopped: the {cfg.max_minutes:g}-minute budget ran out; finished runs and the "
                f"last epoch of the current one are kept in {out}: run the same command to continue"
            )
            return None
        rows = [r for r in rows if r["method"] in cfg.methods and r["seed"] < cfg.seeds]
        curves = {
            m: [read_curve(out / "runs" / f"{m}-seed{seed}") for seed in range(cfg.seeds)]
            for m in cfg.methods
        }
        curves = {m: c for m, c in curves.items() if any(r.get("val_nll") for r in c)}
        headers, lines = summary(rows, cfg.methods, SEG_COLUMNS if bundle.dense else None)
        stamp = _dt.date.today().isoformat()
        shift = (
            f"anomaly classes: {', '.join(bundle.anomaly_classes) or 'none'}"
            if bundle.dense
            else f"OOD: {', '.join(bundle.ood) or 'none'}"
        )
        md = (
            f"# bnnkit bench: {cfg.dataset}, {cfg.model}\n\n"
            f"{cfg.seeds} seed(s), {cfg.epochs} epochs, training subset {cfg.subset or 'all'}, "
            f"{len(bundle.test)} test images, "
            f"{shift}; made {stamp} on {device_name(device)}, "
            f"torch {torch.__version__}.\n\n"
            + markdown(headers, lines)
            + "\n\n"
            + (SEG_COLUMN_NOTE if bundle.dense else COLUMN_NOTE)
            + _throughput_table(rows, cfg.methods)
            + _convergence_table(curves)
            + (
                _seg_tables(rows, cfg, bundle.class_names)
                if bundle.dense
                else _shift_tables(rows, cfg)
            )
        )
        io.atomic_write_text(out / "results.md", md)
        fig_dir = out / "figures"
        fig_dir.mkdir(exist_ok=True)
        present = [m for m in cfg.methods if m in arts]
        if present and bundle.dense:
            ordered = {m: arts[m] for m in present}
            if any(a.get("maps") for a in ordered.values()):
                figs.segmentation_maps(ordered, fig_dir / "uncertainty_maps.png", "entropy")
            if any(a.get("maps") and a.get("members", 1) > 1 for a in ordered.values()):
                figs.segmentation_maps(ordered, fig_dir / "mutual_info_maps.png", "mutual_info")
        elif present:
            ordered = {m: arts[m] for m in present}
            figs.reliability_diagrams(ordered, fig_dir / "reliability.png")
            if bundle.ood:
                figs.ood_histograms(ordered, fig_dir / "ood_hist.png")
        if curves:
            figs.training_curves(curves, fig_dir / "training_curves.png")
        if cfg.corruptions:
            figs.corruption_curves(rows, fig_dir / "corruption.png", cfg.methods, bundle.dense)
        if cfg.angles and not bundle.dense:
            figs.rotation_curves(rows, fig_dir / "rotation.png", cfg.methods)
        table = plain(headers, lines)
        log(table)
        log(
            f"\nresults: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.sqlite'}; "
            f"figures in {fig_dir}"
        )
        return table


def _train_rows(run_dir: Path) -> list[dict]:
    """Training images per second of a run (training batches only, every chunk), from its
    meta.json; none for post-hoc methods, which train nothing."""
    try:
        meta = json.loads((run_dir / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    rate = meta.get("train_images_per_s")
    return [] if rate is None else [{"split": "train", "metric": "images_per_s", "value": rate}]


def _convergence_table(curves: dict[str, list[dict]]) -> str:
    headers, lines = convergence_summary(curves)
    if not lines:
        return ""
    return (
        "\n\n### Validation NLL during training (figures/training_curves.png)\n\n"
        "Mean over seeds; change over the last quarter: the last epoch minus the epoch three "
        "quarters in (negative: still falling; positive: rising again).\n\n"
        + markdown(headers, lines)
    )


def _throughput_table(rows: list[dict], methods: list[str]) -> str:
    rates: dict[str, list[float]] = {}
    for r in rows:
        if r["split"] == "train" and r["metric"] == "images_per_s":
            rates.setdefault(r["method"], []).append(r["value"])
    lines = [f"| {m} | {sum(rates[m]) / len(rates[m]):,.0f} |" for m in methods if m in rates]
    if not lines:
        return ""
    return ("\n\n### Training images/s (training batches only; every member sees each image)"
            "\n\n| Method | images/s |\n|---|---|\n" + "\n".join(lines))  # fmt: skip


def _shift_tables(rows: list[dict], cfg: BenchConfig) -> str:
    """OOD AUROC per OOD set; accuracy / NLL / ECE per rotation angle and per corruption
    severity (mean over seeds and, for corruptions, over types): the numbers behind the main
    table's means and the shift figures; NLL and accuracy per MNIST-C corruption."""
    out = []
    for metric, name in (("auroc_entropy", "entropy"), ("auroc_mutual_info", "mutual information")):
        headers, lines = ood_summary(rows, metric, cfg.methods)
        if lines and len(headers) > 1:
            out.append(f"### OOD AUROC % ({name}) per OOD set\n\n" + markdown(headers, lines))
    for kind, title in (("rotate", "rotated test images"), ("corrupt", "corruption severity")):
        for metric, name in (("accuracy", "Accuracy %"), ("nll", "NLL"), ("ece", "ECE %")):
            headers, lines = shift_summary(rows, kind, metric, cfg.methods)
            if lines and len(headers) > 1:
                out.append(f"### {name} by {title}\n\n" + markdown(headers, lines))
    for metric, name in (("nll", "NLL"), ("accuracy", "Accuracy %")):
        headers, lines = mnist_c_summary(rows, metric, cfg.methods)
        if lines and len(headers) > 1:
            out.append(
                f"### MNIST-C: {name} per corruption (first {cfg.n_corrupt} test images)\n\n"
                + markdown(headers, lines)
            )
    return ("\n\n" + "\n\n".join(out)) if out else ""


def _seg_tables(rows: list[dict], cfg: BenchConfig, classes) -> str:
    """Per-class IoU, and mIoU / NLL / ECE per corruption severity."""
    out = []
    headers, lines = class_iou_summary(rows, cfg.methods, classes)
    if lines:
        out.append("### Test IoU % per class\n\n" + markdown(headers, lines))
    for metric, name in (("miou", "mIoU %"), ("nll", "pixel NLL"), ("ece", "ECE %")):
        headers, lines = shift_summary(rows, "corrupt", metric, cfg.methods)
        if lines and len(headers) > 1:
            out.append(f"### {name} by corruption severity\n\n" + markdown(headers, lines))
    return ("\n\n" + "\n\n".join(out)) if out else ""


SEG_COLUMN_NOTE = (
    "Columns (segmentation; every pixel metric over the non-void pixels of the full 180x240 "
    "test images, the held-out classes' pixels excluded): mIoU, pixel accuracy, pixel NLL, "
    "Brier, top-label ECE (15 bins); anomaly AUROC / AUPR / FPR@95%TPR over pixels with the "
    "held-out classes' pixels positive and the other non-void pixels negative, scored by the "
    "predictive entropy (AUPR-MI: mutual information, – for single-member predictives; "
    "AUPR-MCP: 1 - max probability); cmIoU / cNLL: mean over the corruption types and severities; "
    "ms/image: median time of predict() on one batch divided by its images, all members and "
    "samples included; Mem MB: peak tensor memory of that call; Params: parameter count."
)


COLUMN_NOTE = (
    "Columns: test accuracy, NLL, Brier, ECE (15 bins); OOD AUROC / AUPR / FPR@95%TPR with "
    "the predictive entropy as score (OOD = positive), mean over the OOD sets (per set in "
    "results.md); AUROC-MI: AUROC with the mutual "
    "information (epistemic part; – for single-sample predictives, whose mutual information "
    "is 0); cAcc / cNLL: mean over the corruption types and severities 1-5; ms/batch: median "
    "time of predict() on one batch of 128, from images to the predictive, with all members "
    "and samples (for Laplace rows the linearised predictive, Jacobians included); Mem MB: "
    "peak tensor memory of that call (CUDA: allocator peak; CPU: new storage created by "
    "torch ops); Params: parameter count. mean ± std over seeds."
)

__all__ = ["BenchConfig", "run_bench", "DEFAULT_METHODS", "METHODS"]
