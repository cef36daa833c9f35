"""Command line: ``bnnkit train | evaluate | bench | search | posterior | data | methods``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from .errors import BnnkitError, ConfigError


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


#: exit status of a command stopped by its time or epoch budget: the work so far is kept and
#: the same command (with --resume for `bnnkit train`) continues it (EX_TEMPFAIL)
EXIT_STOPPED = 75


def _options(pairs: list[str] | None, flag: str = "--option") -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{flag} takes key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k] = _parse_value(v)
    return out


def _subset(text: str, flag: str = "--subset"):
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"{flag} takes a number >= 1 or 'all', got {text!r}") from None
    if n < 1:
        raise ConfigError(f"{flag} must be >= 1 (or 'all' for every example), got {n}")
    return n


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse with bnnkit's error format: one ``bnnkit: error: ...`` line, exit status 2."""

    def error(self, message):
        self.exit(2, f"bnnkit: error: {message} (see `{self.prog} --help`)\n")


# ------------------------------------------------------------------ train


def _train_options(pairs: list[str] | None) -> dict:
    """``--train-option key=value`` pairs, checked against the train config's option table."""
    from .train.config import TRAIN_OPTIONS

    opts = _options(pairs, "--train-option")
    TRAIN_OPTIONS.resolve(opts, fill=False)
    return opts


def _apply_extras(cfg, a) -> None:
    """``--train-option`` / ``--model-option`` onto a bench or search config."""
    if a.train_option:
        cfg.train_options.update(_train_options(a.train_option))
    if a.model_option:
        cfg.model_options.update(_options(a.model_option, "--model-option"))


def cmd_train(a) -> int:
    from .train import Budget, RunConfig, is_complete, load_yaml, read_progress, train_run

    cfg = RunConfig.from_dict(load_yaml(a.config)) if a.config else RunConfig()
    if a.method:
        cfg.method = a.method
    if a.model:
        cfg.model = a.model
    if a.dataset:
        cfg.data.dataset = a.dataset
    if a.subset is not None:
        cfg.data.subset = _subset(a.subset)
    if a.seed is not None:
        cfg.seed = a.seed
    for name in ("epochs", "batch_size", "lr", "devices", "strategy", "precision", "num_nodes"):
        v = getattr(a, name)
        if v is not None:
            setattr(cfg.train, name, v)
    if a.device:
        cfg.train.accelerator = "gpu" if a.device == "cuda" else a.device
    cfg.train.progress = not a.quiet
    for k, v in _train_options(a.train_option).items():
        setattr(cfg.train, k, v)
    cfg.method_options.update(_options(a.option))
    if a.plan:
        if a.method not in (None, "placement"):
            raise ConfigError(f"--plan trains the plan itself; drop --method {a.method}")
        from .plan import PlacementPlan

        cfg.method = "placement"
        cfg.method_options["plan"] = PlacementPlan.load(a.plan).to_dict()
    budget = Budget.minutes(a.max_minutes, a.stop_at_epoch)
    model = train_run(cfg, a.out, resume=a.resume, budget=budget)
    zero = (
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    )
    if not is_complete(a.out):
        if zero:
            done = read_progress(Path(a.out)).get("epochs_done", 0)
            print(
                f"stopped at epoch {done} of {cfg.train.epochs} (budget); the run is kept: "
                "run the same command with --resume to continue"
            )
        return EXIT_STOPPED
    if zero:
        print(f"trained {cfg.method} ({model.num_parameters():,} parameters) -> {a.out}")
    return 0


# ------------------------------------------------------------------ evaluate


def cmd_evaluate(a) -> int:
    from . import io
    from .data import load_bundle
    from .evaluate import EvalConfig, evaluate
    from .methods import UQModel
    from .train import RunConfig

    run = Path(a.run_dir)
    if not (run / "model.safetensors").is_file():
        raise ConfigError(
            f"{run} holds no trained model (model.safetensors); train one with "
            f"`bnnkit train --out {run}` or finish it with --resume"
        )
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    model = UQModel.load(run / "model.safetensors")
    bundle = load_bundle(
        a.dataset or cfg.data.dataset, val_size=cfg.data.val_size, subset=cfg.data.subset
    )
    ecfg = EvalConfig(progress=not a.quiet, n_corrupt=a.n_corrupt, n_rotate=a.n_rotate)
    if a.corruptions:
        from .data import CORRUPTIONS

        ecfg.corruptions = [c.strip() for c in a.corruptions.split(",") if c.strip()]
        bad = [c for c in ecfg.corruptions if c not in CORRUPTIONS]
        if bad:
            raise ConfigError(f"unknown corruption(s) {bad}; valid: {', '.join(CORRUPTIONS)}")
    rows, _ = evaluate(model, bundle, ecfg)
    io.atomic_write_text(run / "metrics.json", json.dumps(rows, indent=1))
    keep = {"test", "corrupt:mean", "cost"} | {
        s for s in (r["split"] for r in rows) if s.startswith("ood:")
    }
    for r in rows:
        if r["split"] in keep:
            print(f"{r['split']:<22} {r['metric']:<20} {r['value']:.4f}")
    print(f"all {len(rows)} rows -> {run / 'metrics.json'}")
    return 0


# ------------------------------------------------------------------ bench


def _bench_config(path: str | None):
    """A BenchConfig from a YAML file of its fields (defaults where the file is silent)."""
    from .bench import BenchConfig
    from .train import load_yaml

    base = {}
    if path:
        base = load_yaml(path)
        valid = {f.name for f in fields(BenchConfig)}
        unknown = set(base) - valid
        if unknown:
            raise ConfigError(
                f"unknown key(s) {sorted(unknown)} in {path}; valid: " + ", ".join(sorted(valid))
            )
    return BenchConfig(**base)


def cmd_bench(a) -> int:
    from .bench import run_bench

    cfg = _bench_config(a.config)
    if a.methods:
        cfg.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for name in ("model", "dataset", "epochs", "seeds", "device", "out", "lr", "batch_size"):
        v = getattr(a, name)
        if v is not None:
            setattr(cfg, name, v)
    if a.subset is not None:
        cfg.subset = _subset(a.subset)
    if a.test_subset is not None:
        cfg.test_size = _subset(a.test_subset, "--test-subset")
    if a.quiet:
        cfg.progress = False
    if a.max_minutes is not None:
        cfg.max_minutes = a.max_minutes
    _apply_extras(cfg, a)
    return 0 if run_bench(cfg) is not None else EXIT_STOPPED


# ------------------------------------------------------------------ search


def cmd_search(a) -> int:
    from .search.study import PlacementSearch, SearchConfig

    cfg = SearchConfig()
    for name in ("out", "dataset", "model", "epochs", "seed", "trials", "storage", "study",
                 "sampler", "lr", "batch_size", "heartbeat", "max_latency_ms",
                 "max_parameters", "ood_family", "population"):  # fmt: skip
        v = getattr(a, name)
        if v is not None:
            setattr(cfg, name, v)
    if a.subset is not None:
        cfg.subset = _subset(a.subset)
    cfg.progress = not a.quiet
    if a.no_baselines:
        cfg.baselines = []
    _apply_extras(cfg, a)
    import warnings

    import optuna

    final_bench = _bench_config(a.final_config) if a.final_config else None
    with warnings.catch_warnings():  # heartbeats and stale-trial retries are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        out = PlacementSearch(cfg).run()
    print(f"Pareto front -> {out / 'pareto.csv'}; chosen plan -> {out / 'plan.json'}")
    if a.final or a.final_config:
        from .search.final import final_comparison

        bench = final_bench or _bench_config(None)
        bench.progress = not a.quiet
        final_comparison(out, bench)
    return 0


# ------------------------------------------------------------------ posterior


def cmd_posterior(a) -> int:
    if a.action == "collect" and a.swag and not a.from_run:
        raise ConfigError("--swag needs --from-run RUN_DIR (a trained deterministic run)")
    if a.action == "collect" and a.from_run and a.swag:
        from .posterior.collect import collect_swag

        col = collect_swag(a.out, a.from_run, samples=a.samples, seed=a.seed)
        print(f"{len(col)} members -> {a.out}")
    elif a.action == "collect" and a.from_run:
        from .posterior.collect import collect_samples

        col = collect_samples(a.out, a.from_run, samples=a.samples, seed=a.seed)
        print(f"{len(col)} members -> {a.out}")
    elif a.action == "collect":
        from .posterior.collect import collect_reference

        col = collect_reference(
            a.out, model=a.model, dataset=a.dataset, members=a.members, epochs=a.epochs,
            subset=_subset(a.subset) if a.subset is not None else 16000, chunk=a.chunk,
            first_seed=a.seed,
            progress=None if a.quiet else (lambda k, n: print(f"{k}/{n} members", flush=True)),
        )  # fmt: skip
        print(f"{len(col)} members -> {a.out}")
    elif a.action == "canonicalize":
        from .posterior.tools import canonical_collection

        col = canonical_collection(a.collection, a.out, scaling=not a.no_scaling)
        print(f"{len(col)} members in canonical form -> {a.out}")
    elif a.action == "mmd":
        from .posterior.tools import compare, example_input

        probe = None
        if a.space == "function":
            from .data import load_bundle
            from .posterior.collection import Collection

            arch = Collection.open(a.a).arch
            bundle = load_bundle(a.dataset, ood=[], test_size=a.probe)
            probe = bundle.test.float()
            if tuple(probe.shape[1:]) != tuple(example_input(arch).shape[1:]):
                raise ConfigError(f"{a.dataset} images do not fit the collection's input shape")
        r = compare(a.a, a.b, a.space, probe, alpha=a.alpha, seed=a.seed)
        best = min(r.p_values, key=r.p_values.get)
        print(f"MMDAgg ({a.space} space, alpha {r.alpha}): "
              f"{'different' if r.reject else 'no difference detected'}")  # fmt: skip
        print(f"most sensitive kernel: {best}, MMD^2 {r.statistics[best]:.4g}, "
              f"single-kernel p {r.p_values[best]:.4f}")  # fmt: skip
    elif a.action == "align":
        from .posterior.tools import aligned_collection

        col = aligned_collection(a.collection, a.out, to=a.to, scaling=not a.no_scaling)
        print(f"{len(col)} members aligned -> {a.out}")
    elif a.action == "modes":
        _posterior_modes(a)
    elif a.action == "report":
        from .report.posterior import PosteriorReportConfig, posterior_report

        named = {}
        for item in a.collection or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--collection takes NAME=DIR, got {item!r}")
            named[name] = path
        cfg = PosteriorReportConfig(
            reference=a.reference, collections=named, out=a.out, dataset=a.dataset,
            probe=a.probe, modes_members=a.modes_members, modes_threshold=a.threshold,
            seed=a.seed,
        )  # fmt: skip
        page = posterior_report(cfg, log=(lambda *_: None) if a.quiet else print)
        print(f"report -> {page}")
    return 0


def _posterior_modes(a) -> None:
    import torch

    from .data import load_bundle
    from .posterior.collect import build_from
    from .posterior.collection import Collection
    from .posterior.modes import barrier_matrix, count_modes
    from .posterior.tools import example_input

    col = Collection.open(a.collection)
    ids = [m.id for m in col.members][: a.members]
    if len(ids) < 2:
        raise ConfigError(f"{a.collection} holds {len(ids)} member(s); modes need at least 2")
    net = build_from(col.arch).eval()
    bundle = load_bundle(a.dataset, ood=[], test_size=a.images)
    x, y = bundle.test.float(), bundle.test.y
    if tuple(x.shape[1:]) != tuple(example_input(col.arch).shape[1:]):
        raise ConfigError(f"{a.dataset} images do not fit the collection's input shape")
    B = barrier_matrix(net, [col.load(i) for i in ids], x, y, aligned=not a.no_align,
                       bn_data=bundle.train.float()[:2000],
                       example_input=example_input(col.arch))  # fmt: skip
    n, labels = count_modes(B, a.threshold)
    off = B[~torch.eye(len(B), dtype=torch.bool)]
    print(f"{n} mode(s) among {len(ids)} networks (barrier < {a.threshold} nats joins two; "
          f"{'aligned' if not a.no_align else 'as trained'}); barriers: median "
          f"{float(off.median()):.4f}, max {float(off.max()):.4f}")  # fmt: skip
    for mode in range(n):
        print(f"mode {mode}: " + ", ".join(i for i, lab in zip(ids, labels) if lab == mode))


# ------------------------------------------------------------------ data


def cmd_data(a) -> int:
    """List data sets, where they are, their sizes and checksums. Exits non-zero, naming the fix,
    when a named data set (or, with no names, the default one) is missing, or when any file
    that is present fails its sha256 check."""
    from .data import DATASETS, fetch, get_spec, locate_split, verify
    from .data.sources import DEFAULT_DATASET, count
    from .errors import DataError

    for name in [*a.names, *([a.download] if a.download else [])]:
        get_spec(name)  # an unknown name is refused before anything is downloaded
    requested = list(dict.fromkeys([*a.names, *([a.download] if a.download else [])]))
    if a.download:
        got = fetch(a.download)
        print(f"downloaded {len(got)} file(s) for {a.download}" if got else "already present")
    required = set(requested) if requested else {DEFAULT_DATASET}
    problems = []
    for name in requested or list(DATASETS):
        spec = get_spec(name)
        counts, folders, missing, unreadable = [], set(), False, None
        for split in spec.files:
            try:
                folders.update(str(p.parent) for p in locate_split(name, split))
            except DataError:
                missing = True
                continue
            try:
                counts.append(f"{split} {count(name, split):,}")
            except DataError as e:
                unreadable = str(e).splitlines()[0]
        state = "MISSING" if missing else "UNREADABLE" if unreadable else ", ".join(counts)
        print(f"{name:<14} {spec.input_shape}  {spec.num_classes} classes  {state}")
        if folders:
            print(f"    found in {', '.join(sorted(folders))}")
        if missing:
            print(f"    to get it: {spec.hint}")
            if name in required:
                problems.append(f"{name} is missing; to get it: {spec.hint}")
        if unreadable:
            print(f"    {unreadable}")
        rows = verify(name) if not a.no_verify or missing else []
        for fname, where, status in rows:
            print(f"    {fname:<36} {status:<12} {where}")
        bad = [(fname, where) for fname, where, status in rows if status.startswith("MISMATCH")]
        for fname, where in bad:
            fix = (f"delete it and run `bnnkit data --download {name}`"
                   if any(f.url for fs in spec.files.values() for f in fs if f.name == fname)
                   else f"replace it with the original file ({spec.hint})")  # fmt: skip
            problems.append(f"{name}: {where} does not match its recorded sha256; {fix}")
        if unreadable and not bad:
            problems.append(f"{name}: {unreadable}")
    if problems:
        raise DataError("; ".join(problems))
    return 0


def cmd_methods(a) -> int:
    from .methods import METHODS

    for m in METHODS.values():
        extra = f" (post hoc on {m.posthoc_of})" if m.posthoc_of else ""
        print(f"{m.name}: {m.summary}{extra}")
        for o in m.options:
            print(f"    {o.name}={json.dumps(o.default)}  {o.help} [{o.describe()}]")
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bnnkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one method into a run directory")
    t.add_argument("--method")
    t.add_argument("--model")
    t.add_argument("--dataset")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--subset", help="train on N training examples ('all' for every one)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--devices", type=int)
    t.add_argument("--num-nodes", type=int)
    t.add_argument("--strategy", help="Lightning strategy: auto, ddp, ...")
    t.add_argument("--precision", help="e.g. 32-true, bf16-mixed, 16-mixed")
    t.add_argument("--option", action="append", help="method option key=value (repeatable)")
    t.add_argument("--plan", help="plan.json of a placement plan (from bnnkit search)")
    t.add_argument("--config", help="YAML file with a RunConfig")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument(
        "--train-option",
        action="append",
        help="train config key=value (repeatable), e.g. optimizer=sgd, loader=tensor, cutout=16, "
        "channels_last=true, compile=max-autotune, weight_decay=5e-4, warmup_epochs=5",
    )
    t.add_argument(
        "--max-minutes",
        type=_positive_float,
        help="stop at the last epoch boundary that fits in this many minutes (exit status 75; "
        "--resume continues exactly)",
    )
    t.add_argument(
        "--stop-at-epoch", type=_count, help="stop once this many epochs are done (exit 75)"
    )
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a trained run directory")
    e.add_argument("run_dir")
    e.add_argument("--dataset", help="evaluate on another data set of the same shape")
    e.add_argument("--corruptions", help="comma-separated corruption names")
    e.add_argument("--n-corrupt", type=_count, default=2000, help="images per corruption")
    e.add_argument("--n-rotate", type=_count, default=2000, help="images per angle")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("bench", help="train and evaluate methods; print one table")
    b.add_argument("--methods", help="comma-separated method names (see `bnnkit methods`)")
    b.add_argument("--model")
    b.add_argument("--dataset")
    b.add_argument("--epochs", type=int)
    b.add_argument("--seeds", type=int)
    b.add_argument("--subset", help="training examples to use ('all' for every one)")
    b.add_argument("--test-subset", help="test and OOD images to use ('all' for every one)")
    b.add_argument("--batch-size", type=int)
    b.add_argument("--lr", type=float)
    b.add_argument("--device", choices=["auto", "cpu", "cuda"])
    b.add_argument("--out")
    b.add_argument("--config", help="YAML file with BenchConfig fields")
    b.add_argument("--train-option", action="append", help="train config key=value for every run")
    b.add_argument(
        "--model-option", action="append", help="architecture option key=value, e.g. width=16"
    )
    b.add_argument(
        "--max-minutes",
        type=_positive_float,
        help="stop at an epoch boundary after about this many minutes (exit status 75); the "
        "same command continues",
    )
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("search", help="search where the Bayesian layers go (Optuna, NSGA-II)")
    s.add_argument("--out", help="output directory (default runs/search)")
    s.add_argument("--dataset")
    s.add_argument("--model")
    s.add_argument("--epochs", type=_count, help="training epochs per candidate")
    s.add_argument("--subset", help="training examples per candidate ('all' for every one)")
    s.add_argument("--batch-size", type=_count)
    s.add_argument("--lr", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--trials", type=_count, help="completed trials in the study (all workers)")
    s.add_argument("--storage", help="Optuna storage URL (default: SQLite file in --out)")
    s.add_argument("--study", help="study name (workers on one storage share it)")
    s.add_argument("--sampler", choices=["nsga2", "tpe"])
    s.add_argument("--population", type=_count, help="NSGA-II generation size (default 16)")
    s.add_argument(
        "--ood-family",
        help="search-time OOD images, never test data: synthetic, corrupted, scrambled or mixed",
    )
    s.add_argument("--heartbeat", type=_count, help="seconds between trial heartbeats")
    s.add_argument("--max-latency-ms", type=float, help="constraint: predict latency per batch")
    s.add_argument(
        "--train-option",
        action="append",
        help="train config key=value for every candidate (repeatable)",
    )
    s.add_argument("--model-option", action="append", help="architecture option key=value")
    s.add_argument("--max-parameters", type=_count, help="constraint: parameter count")
    s.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip training the baselines scored beside the front (pareto.png)",
    )
    s.add_argument(
        "--final",
        action="store_true",
        help="then retrain the searched plans from scratch beside the baselines "
        "with the bench's training and compare them on the test OOD sets",
    )
    s.add_argument(
        "--final-config",
        metavar="FILE",
        help="YAML of BenchConfig fields for --final (implies --final)",
    )
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_search)

    po = sub.add_parser("posterior", help="checkpoint collections, symmetries, MMD")
    pa = po.add_subparsers(dest="action", required=True, parser_class=_Parser)
    c = pa.add_parser("collect", help="train independent networks into a collection")
    c.add_argument("--out", required=True, help="collection directory")
    c.add_argument("--model", default="mlp")
    c.add_argument("--dataset", default="fashion_mnist")
    c.add_argument("--members", type=_count, default=128)
    c.add_argument("--epochs", type=_count, default=5)
    c.add_argument("--subset", help="training examples ('all' for every one; default 16000)")
    c.add_argument("--chunk", type=_count, default=32, help="networks trained at once")
    c.add_argument("--seed", type=int, default=0, help="seed of the first member / of draws")
    c.add_argument(
        "--from-run",
        metavar="RUN_DIR",
        help="instead: add a trained bnnkit model's posterior samples (plain nets)",
    )
    c.add_argument("--samples", type=_count, default=1, help="draws per member (--from-run)")
    c.add_argument("--swag", action="store_true",
                   help="with --from-run: SWAG samples around the run's network")  # fmt: skip
    c.add_argument("--quiet", action="store_true")
    k = pa.add_parser("canonicalize", help="remove scaling and permutation symmetries")
    k.add_argument("collection")
    k.add_argument("--out", required=True)
    k.add_argument("--no-scaling", action="store_true", help="remove permutations only")
    mm = pa.add_parser("mmd", help="MMDAgg test between two collections")
    mm.add_argument("a")
    mm.add_argument("b")
    mm.add_argument("--space", choices=["weight", "function"], default="weight")
    mm.add_argument("--dataset", default="fashion_mnist", help="probe images (function space)")
    mm.add_argument("--probe", type=_count, default=500, help="probe images (function space)")
    mm.add_argument("--alpha", type=float, default=0.05)
    mm.add_argument("--seed", type=int, default=0)
    al = pa.add_parser("align", help="align every member to one by weight matching")
    al.add_argument("collection")
    al.add_argument("--out", required=True)
    al.add_argument("--to", metavar="MEMBER_ID", help="target member (default: the first)")
    al.add_argument("--no-scaling", action="store_true", help="do not balance scalings first")
    md = pa.add_parser("modes", help="loss barriers between members and the modes they form")
    md.add_argument("collection")
    md.add_argument("--members", type=_count, default=16, help="first N members")
    md.add_argument("--threshold", type=_positive_float, default=0.05,
                    help="a barrier below this (nats) joins two networks")  # fmt: skip
    md.add_argument("--dataset", default="fashion_mnist", help="test images for the losses")
    md.add_argument("--images", type=_count, default=1000)
    md.add_argument("--no-align", action="store_true", help="barriers between weights as stored")
    rp = pa.add_parser("report", help="Markdown report with figures against a reference")
    rp.add_argument("--reference", required=True, help="reference collection")
    rp.add_argument("--collection", action="append", metavar="NAME=DIR",
                    help="a collection to compare (repeatable)")  # fmt: skip
    rp.add_argument("--out", required=True)
    rp.add_argument("--dataset", default="fashion_mnist")
    rp.add_argument("--probe", type=_count, default=500)
    rp.add_argument("--modes-members", type=_count, default=16)
    rp.add_argument("--threshold", type=_positive_float, default=0.05)
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--quiet", action="store_true")
    po.set_defaults(func=cmd_posterior)

    d = sub.add_parser("data", help="list data sets, where they are, counts, sha256 checks")
    d.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="data sets to check (default: all, and fail only if the default one, "
        "fashion_mnist, is missing or a file present fails its sha256 check)",
    )
    d.add_argument("--no-verify", action="store_true", help="skip the sha256 check of files")
    d.add_argument("--download", metavar="NAME", help="download a data set (needs internet)")
    d.set_defaults(func=cmd_data)

    m = sub.add_parser("methods", help="list the registered methods and their options")
    m.set_defaults(func=cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BnnkitError as e:
        print(f"bnnkit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path, permission or full disk: the user's to fix, not a bug
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"bnnkit: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "bnnkit: interrupted; re-run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser"]
