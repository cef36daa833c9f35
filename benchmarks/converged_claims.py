"""The papers' claims, answered from finished converged benches with paired, seed-matched
differences and 95% confidence intervals.

    python benchmarks/converged_claims.py runs/fmnist_converged [runs/mnist_converged ...]
        [--out claims.md]

Reads each bench directory's ``results.sqlite`` (written by ``bnnkit bench --config
benchmarks/configs/fmnist_converged.yaml`` or ``mnist_converged.yaml``) and prints markdown:
for every claim, one table of differences A - B between two methods over the seeds both have
(matched by seed), with the mean difference, its 95% Student-t interval
``mean +- t(0.975, n-1) * sd / sqrt(n)``, the number of seeds and a verdict ("A better" /
"B better" when the interval excludes 0, taking into account whether lower or higher is better;
otherwise "not resolved (n seeds)"); then the papers' numbers beside the bench's.

Claims:

- Subnetwork selection (Daxberger et al., 2021): every ``subnet-<rule>-<size>`` variant of the
  bench against ``subnet-random-<size>``, on NLL under shift.
- Subnetwork Laplace beats diagonal Laplace, last-layer Laplace and the deep ensemble under
  shift (Daxberger et al., 2021): ``laplace_subnetwork`` and the best ``subnet-lv-*`` variant.
- Rank-1 BNNs (Dusenberry et al., 2020) beat BatchEnsemble and match or beat deep ensembles in
  NLL and calibration.
- LP-BNN (Franchi et al., 2020) detects OOD inputs better than BatchEnsemble.
- The placement search (Wang et al., 2022) finds plans as good as MC dropout and deep ensembles
  in NLL and OOD detection at a fraction of their cost: on the final comparison of ``bnnkit
  search`` (``OUT/final``), every searched plan against ``deep_ensemble``, ``mc_dropout_full``
  (MC dropout run the usual way) and ``mc_dropout``. Only quality is compared here; the
  speed-ups come from ``benchmarks/latency.py --runs OUT/final`` (side by side on idle cores).

Rows are those the bench's own table uses: its data set and model, the methods of its config
and seeds below its ``seeds`` (``bench_config.json``). Bad input (a missing directory, no
results, another data set) ends with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sqlite3
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bnnkit.errors import BnnkitError, InputError
from bnnkit.io import atomic_write_text
from bnnkit.report import ResultStore, markdown

#: the data sets these claims are about (the converged benches' configs)
EXPECTED_DATASETS = ("fashion_mnist", "mnist")

#: where the two quoted numbers come from. The paper's image experiments (ResNet-18 on rotated
#: MNIST and corrupted CIFAR-10) report their results as plots, mean +- std over 3 seeds; its
#: accessible text names neither Fashion-MNIST as a training set nor MNIST-C, so these values
#: are targets set by the project, not a table of the paper.
QUOTED = "subnetwork Laplace target as quoted for Daxberger et al. (2021); not in its text"

#: the papers' numbers beside the bench's: (data set, split, metric, quantity, value, source)
PAPER_NUMBERS = [
    (
        "fashion_mnist",
        "test",
        "nll",
        "Fashion-MNIST test NLL",
        0.286,
        QUOTED,
    ),
    (
        "mnist",
        "mnist_c:brightness",
        "nll",
        "MNIST-C brightness NLL",
        0.1,
        QUOTED,
    ),
]

_SUBNET = re.compile(r"^subnet-([^-]+)-([0-9.]+[km]?)$")

Values = dict[tuple[str, str], float]  # (split, metric) -> value of one run


# ---------------------------------------------------------------------------------------------
# statistics


def t_quantile(df: int, level: float = 0.975) -> float:
    """The ``level`` quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t

    if df < 1:
        raise InputError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    return float(t.ppf(level, df))


@dataclass(frozen=True)
class Paired:
    """Differences A - B over the seeds both methods have."""

    seeds: tuple[int, ...]
    mean_a: float | None
    mean_b: float | None
    mean: float | None
    lo: float | None  # 95% interval; None below 2 seeds
    hi: float | None

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Match ``a`` and ``b`` (seed -> value) by seed; mean difference and its 95% t interval."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return Paired(seeds, None, None, None, None, None)
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(diffs)
    mean_a = statistics.fmean(a[s] for s in seeds)
    mean_b = statistics.fmean(b[s] for s in seeds)
    if len(diffs) < 2:
        return Paired(seeds, mean_a, mean_b, mean, None, None)
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return Paired(seeds, mean_a, mean_b, mean, mean - half, mean + half)


def verdict(p: Paired, lower_is_better: bool) -> str:
    if p.n == 0:
        return "no common seed"
    if p.lo is None or p.hi is None or p.lo <= 0.0 <= p.hi:
        return f"not resolved ({p.n} seed{'' if p.n == 1 else 's'})"
    a_lower = p.hi < 0.0
    return "A better" if a_lower == lower_is_better else "B better"


# ---------------------------------------------------------------------------------------------
# reading a bench


@dataclass
class Bench:
    path: str  # as given on the command line
    dataset: str
    model: str
    runs: dict[str, dict[int, Values]]  # method -> seed -> values
    expected: dict[str, int] | None = None  # methods of its config -> seeds it will have

    def unfinished(self) -> list[str]:
        """Methods of the bench's config with fewer finished seeds than it will have."""
        return [
            f"{m} ({len(self.runs.get(m, {}))} of {n} seeds)"
            for m, n in (self.expected or {}).items()
            if len(self.runs.get(m, {})) < n
        ]

    @property
    def seeds(self) -> list[int]:
        return sorted({s for per in self.runs.values() for s in per})

    def has(self, method: str) -> bool:
        return method in self.runs

    def splits(self, metric: str) -> set[str]:
        return {
            sp for per in self.runs.values() for v in per.values() for sp, m in v if m == metric
        }


def _hint() -> str:
    return (
        "give the output directory of a bnnkit bench, e.g. runs/fmnist_converged from "
        "`bnnkit bench --config benchmarks/configs/fmnist_converged.yaml` (repeat that command "
        "until it prints its table)"
    )


def load_bench(path: str) -> Bench:
    """The rows of one bench directory, as its own table uses them."""
    d = Path(path)
    if not d.exists():
        raise InputError(f"bench directory {path} does not exist; {_hint()}")
    if not d.is_dir():
        raise InputError(f"{path} is not a directory; {_hint()}")
    db = d / "results.sqlite"
    if not db.is_file():
        raise InputError(f"{path} holds no results.sqlite, so no bench has finished a run there; "
                         f"{_hint()}")  # fmt: skip
    cfg: dict = {}
    cfg_path = d / "bench_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{cfg_path} cannot be read ({e}); {_hint()}") from None
        if not isinstance(cfg, dict):
            raise InputError(f"{cfg_path} is not a bench config (a JSON object); {_hint()}")
    try:
        with ResultStore(db) as store:
            rows = store.rows()
    except sqlite3.Error as e:
        raise InputError(
            f"{db} cannot be read as a bnnkit results store ({e}); {_hint()}"
        ) from None
    datasets = sorted({r["dataset"] for r in rows})
    dataset = cfg.get("dataset")
    if dataset is None:
        if len(datasets) > 1:
            raise InputError(f"{path} holds results of several data sets ({', '.join(datasets)}) "
                             "and no bench_config.json naming its own; " + _hint())  # fmt: skip
        dataset = datasets[0] if datasets else None
    if dataset is not None and dataset not in EXPECTED_DATASETS:
        raise InputError(
            f"{path} is a bench of {dataset}, but these claims are about "
            f"{' and '.join(EXPECTED_DATASETS)} benches; {_hint()}"
        )
    rows = [r for r in rows if r["dataset"] == dataset]
    model = cfg.get("model") or (rows[0]["model"] if rows else "")
    rows = [r for r in rows if r["model"] == model]
    if isinstance(cfg.get("methods"), list):
        rows = [r for r in rows if r["method"] in cfg["methods"]]
    if isinstance(cfg.get("seeds"), int):
        rows = [r for r in rows if r["seed"] < cfg["seeds"]]
    if not rows:
        raise InputError(f"{path} holds no finished runs of its bench yet; {_hint()}")
    runs: dict[str, dict[int, Values]] = {}
    for r in rows:
        v = r["value"]
        if v is None or not math.isfinite(v):
            continue
        runs.setdefault(r["method"], {}).setdefault(r["seed"], {})[(r["split"], r["metric"])] = v
    expected = None
    if isinstance(cfg.get("methods"), list) and isinstance(cfg.get("seeds"), int):
        expected = {m: cfg["seeds"] for m in cfg["methods"] if isinstance(m, str)}
    return Bench(path, dataset, model, runs, expected)


# ---------------------------------------------------------------------------------------------
# metrics


@dataclass(frozen=True)
class Metric:
    label: str
    lower_is_better: bool
    percent: bool
    get: Callable[[Values], float | None]


def _one(split: str, metric: str) -> Callable[[Values], float | None]:
    return lambda v: v.get((split, metric))


def _mean(splits: list[str], metric: str) -> Callable[[Values], float | None]:
    """Mean over ``splits``; None unless the run has every one of them."""

    def get(v: Values) -> float | None:
        vals = [v.get((sp, metric)) for sp in splits]
        if not vals or any(x is None for x in vals):
            return None
        return statistics.fmean(vals)

    return get


def _angles_text(angles: list[int]) -> str:
    steps = {b - a for a, b in zip(angles, angles[1:])}
    if len(angles) > 3 and len(steps) == 1:
        return f"{angles[0]}°-{angles[-1]}° every {steps.pop()}°"
    return ", ".join(f"{a}°" for a in angles)


def bench_metrics(bench: Bench) -> dict[str, Metric]:
    """The metrics this bench has rows for, by key."""
    out: dict[str, Metric] = {}
    present = {(sp, m) for per in bench.runs.values() for v in per.values() for sp, m in v}
    for key, split, metric, label, lower, pct in [
        ("test_nll", "test", "nll", "test NLL", True, False),
        ("test_ece", "test", "ece", "test ECE %", True, True),
        ("test_acc", "test", "accuracy", "test accuracy %", False, True),
        ("corrupt_nll", "corrupt:mean", "nll", "corrupt:mean NLL", True, False),
        ("mnist_c_nll", "mnist_c:mean", "nll", "mnist_c:mean NLL", True, False),
        ("brightness_nll", "mnist_c:brightness", "nll", "mnist_c:brightness NLL", True, False),
    ]:
        if (split, metric) in present:
            out[key] = Metric(label, lower, pct, _one(split, metric))
    angles = []
    for sp in bench.splits("nll"):
        kind, _, level = sp.partition(":")
        if kind == "rotate" and re.fullmatch(r"-?\d+", level) and int(level) > 0:
            angles.append(int(level))
    angles.sort()
    if angles:
        out["rotate_nll"] = Metric(
            f"rotation NLL (mean over {_angles_text(angles)})",
            True,
            False,
            _mean([f"rotate:{a}" for a in angles], "nll"),
        )
    for score, name in (("entropy", "entropy"), ("mutual_info", "mutual information")):
        metric = f"auroc_{score}"
        sets = sorted(sp[4:] for sp in bench.splits(metric) if sp.startswith("ood:"))
        if not sets:
            continue
        over = f"mean over {', '.join(sets)}" if len(sets) > 1 else f"vs {sets[0]}"
        out[metric] = Metric(
            f"OOD AUROC % ({name}, {over})",
            False,
            True,
            _mean([f"ood:{s}" for s in sets], metric),
        )
        if len(sets) > 1:
            for s in sets:
                out[f"{metric}:{s}"] = Metric(
                    f"OOD AUROC % ({name}) vs {s}", False, True, _one(f"ood:{s}", metric)
                )
    return out


def per_seed(bench: Bench, method: str, metric: Metric) -> dict[int, float]:
    vals = {s: metric.get(v) for s, v in bench.runs.get(method, {}).items()}
    return {s: x for s, x in vals.items() if x is not None}


# ---------------------------------------------------------------------------------------------
# tables


def _num(x: float | None, pct: bool, signed: bool = False) -> str:
    """NLL with 4 decimals, percentages (``pct``) with 2; ``signed``: always with a sign."""
    if x is None:
        return "–"
    spec = ("+" if signed else "") + (".2f" if pct else ".4f")
    return format(100.0 * x if pct else x, spec)


def _seeds_text(seeds) -> str:
    return ", ".join(str(s) for s in seeds) if seeds else "none"


@dataclass(frozen=True)
class Row:
    a: str
    b: str
    key: str
    a_note: str = ""  # e.g. "best subnet-lv by mean"


def comparison_table(bench: Bench, rows: list[Row], metrics: dict[str, Metric]) -> str:
    """The paired table of ``rows`` (metrics absent for both methods left out), preceded by
    its line naming the bench, data set and seeds."""
    lines = []
    used: set[int] = set()
    cells = []
    for row in rows:
        m = metrics.get(row.key)
        if m is None:
            continue
        a, b = per_seed(bench, row.a, m), per_seed(bench, row.b, m)
        if not a and not b:
            continue
        p = paired(a, b)
        used.update(p.seeds)
        cells.append((row, m, p))
    if not cells:
        return "No metric of this claim is in the bench for these methods."
    everywhere = tuple(sorted(used))
    for row, m, p in cells:
        n = str(p.n) if p.seeds == everywhere else f"{p.n} (seeds {_seeds_text(p.seeds)})"
        ci = (
            "–"
            if p.lo is None
            else f"[{_num(p.lo, m.percent, True)}, {_num(p.hi, m.percent, True)}]"
        )
        lines.append(
            [
                f"{row.a}{f' ({row.a_note})' if row.a_note else ''}",
                row.b,
                m.label,
                "lower" if m.lower_is_better else "higher",
                _num(p.mean_a, m.percent),
                _num(p.mean_b, m.percent),
                _num(p.mean, m.percent, True),
                ci,
                n,
                verdict(p, m.lower_is_better),
            ]
        )
    head = (
        f"Bench `{bench.path}`, data set {bench.dataset}, seeds {_seeds_text(everywhere)} "
        "(each row pairs the seeds both methods have):\n\n"
    )
    headers = ["A", "B", "Metric", "Better", "A mean", "B mean", "A − B", "95% CI", "n", "Verdict"]
    return head + markdown(headers, lines)


def _size(text: str) -> float:
    """``600`` -> 600, ``3k`` -> 3000, ``1.5m`` -> 1.5e6; anything else sorts last."""
    scale = {"k": 1e3, "m": 1e6}.get(text[-1:], 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        return math.inf


def subnet_variants(bench: Bench) -> list[tuple[str, str, str]]:
    """``(name, rule, size)`` of every ``subnet-<rule>-<size>`` method, by size then rule."""
    out = []
    for name in bench.runs:
        m = _SUBNET.match(name)
        if m:
            out.append((name, m.group(1), m.group(2)))
    return sorted(out, key=lambda t: (_size(t[2]), t[1] != "lv", t[1]))


SHIFT_KEYS = ["rotate_nll", "corrupt_nll", "mnist_c_nll", "brightness_nll"]


def claim_selection(bench: Bench, metrics: dict[str, Metric]) -> str:
    title = (
        "### Subnetwork selection (Daxberger et al., 2021): each rule against a random "
        "subnetwork of the same size, NLL under shift\n\n"
    )
    variants = subnet_variants(bench)
    rows, notes = [], []
    for name, rule, size in variants:
        if rule == "random":
            continue
        random = f"subnet-random-{size}"
        if bench.has(random):
            rows += [Row(name, random, k) for k in SHIFT_KEYS]
        else:
            notes.append(f"{name} has no {random} in this bench: not compared.")
    if not rows:
        return title + ("Skipped: no subnet-<rule>-<size> variant with a subnet-random-<size> of "
                        "the same size in this bench.")  # fmt: skip
    body = comparison_table(bench, rows, metrics)
    return title + body + "".join(f"\n\n{n}" for n in notes)


def _best(bench: Bench, names: list[str], m: Metric) -> str | None:
    """The name among ``names`` with the best mean of ``m`` over its seeds."""
    means = {n: statistics.fmean(v.values()) for n in names if (v := per_seed(bench, n, m))}
    if not means:
        return None
    pick = min if m.lower_is_better else max
    return pick(means, key=means.get)


def claim_subnet_vs_others(bench: Bench, metrics: dict[str, Metric]) -> str:
    title = (
        "### Subnetwork Laplace vs diagonal Laplace, last-layer Laplace and the deep ensemble "
        "under shift (Daxberger et al., 2021: the subnetwork is better)\n\n"
    )
    lv = [n for n, rule, _ in subnet_variants(bench) if rule == "lv"]
    subnets = (["laplace_subnetwork"] if bench.has("laplace_subnetwork") else []) + (
        ["best subnet-lv"] if lv else []
    )
    others = [m for m in ("laplace_diag", "laplace_last_layer", "deep_ensemble") if bench.has(m)]
    missing = [
        m for m in ("laplace_diag", "laplace_last_layer", "deep_ensemble") if m not in others
    ]
    if not subnets or not others:
        what = "laplace_subnetwork or a subnet-lv-<size> variant" if not subnets else (
            "laplace_diag, laplace_last_layer and deep_ensemble")  # fmt: skip
        return title + f"Skipped: this bench has none of {what}."
    keys = ["test_nll", *SHIFT_KEYS, "auroc_entropy"]
    rows = []
    for s in subnets:
        for o in others:
            for k in keys:
                if s == "laplace_subnetwork":
                    rows.append(Row(s, o, k))
                elif k in metrics and (best := _best(bench, lv, metrics[k])) is not None:
                    rows.append(Row(best, o, k, "best subnet-lv by mean"))
    body = comparison_table(bench, rows, metrics)
    notes = []
    if lv:
        notes.append(
            "best subnet-lv by mean: the subnet-lv-<size> variant with the best mean on that "
            "row's metric, chosen on the same runs (so its rows lean in its favour)."
        )
    if missing:
        notes.append(f"Not in this bench, so not compared: {', '.join(missing)}.")
    return title + body + "".join(f"\n\n{n}" for n in notes)


def _pairs_claim(bench, metrics, title, a, bs, keys) -> str:
    if not bench.has(a):
        return title + f"Skipped: this bench has no {a}."
    present = [b for b in bs if bench.has(b)]
    if not present:
        return title + f"Skipped: this bench has none of {', '.join(bs)}."
    rows = [Row(a, b, k) for b in present for k in keys]
    body = comparison_table(bench, rows, metrics)
    missing = [b for b in bs if b not in present]
    if missing:
        body += f"\n\nNot in this bench, so not compared: {', '.join(missing)}."
    return title + body


def claim_rank1(bench: Bench, metrics: dict[str, Metric]) -> str:
    title = (
        "### Rank-1 BNN (Dusenberry et al., 2020: better than BatchEnsemble, as good as or "
        "better than deep ensembles in NLL and calibration)\n\n"
    )
    keys = ["test_nll", "test_ece", "test_acc"]
    return _pairs_claim(bench, metrics, title, "rank1", ["deep_ensemble", "batch_ensemble"], keys)


def claim_lpbnn(bench: Bench, metrics: dict[str, Metric]) -> str:
    title = "### LP-BNN (Franchi et al., 2020: better OOD detection than BatchEnsemble)\n\n"
    keys = [
        k
        for score in ("auroc_entropy", "auroc_mutual_info")
        for k in [score, *sorted(k for k in metrics if k.startswith(score + ":"))]
    ] + ["test_nll"]
    return _pairs_claim(bench, metrics, title, "lpbnn", ["batch_ensemble"], keys)


#: the final comparison of a placement search: its plans' labels and the baselines
SEARCHED = ("searched", "searched_fast", "searched_nll", "searched_ood")
SEARCH_BASELINES = ("deep_ensemble", "mc_dropout_full", "mc_dropout")


def claim_search(bench: Bench, metrics: dict[str, Metric]) -> str:
    title = (
        "### Placement search (Wang et al., 2022: as good as MC dropout and deep ensembles in "
        "NLL and OOD detection, about 3x faster)\n\n"
    )
    plans = [p for p in SEARCHED if bench.has(p)]
    if not plans:
        return title + (
            "Skipped: this bench has no searched plan (the final comparison of `bnnkit search "
            "--final-config`, in its `OUT/final`, has them)."
        )
    present = [b for b in SEARCH_BASELINES if bench.has(b)]
    if not present:
        return title + f"Skipped: this bench has none of {', '.join(SEARCH_BASELINES)}."
    note = ""
    if "mc_dropout_full" in present and "mc_dropout" in present:
        present.remove("mc_dropout")  # the same trained network: only its cost differs
        note = (
            "\n\nmc_dropout is the same trained network as mc_dropout_full (run with the "
            "deterministic prefix once): its quality is the same, so it is not repeated."
        )
    keys = ["test_nll", "auroc_entropy"]
    keys += sorted(k for k in metrics if k.startswith("auroc_entropy:")) + ["test_ece"]
    rows = [Row(p, b, k) for p in plans for b in present for k in keys]
    return title + comparison_table(bench, rows, metrics) + note


def papers_table(bench: Bench) -> str:
    title = "### The papers' numbers beside ours\n\n"
    entries = [p for p in PAPER_NUMBERS if p[0] == bench.dataset]
    methods = (["laplace_subnetwork"] if bench.has("laplace_subnetwork") else []) + [
        n for n, _, _ in subnet_variants(bench)
    ]
    lines, used = [], set()
    for _ds, split, metric, quantity, value, source in entries:
        for name in methods:
            vals = {s: v[(split, metric)] for s, v in bench.runs[name].items()
                    if (split, metric) in v}  # fmt: skip
            if not vals:
                continue
            used.update(vals)
            xs = list(vals.values())
            ours = f"{statistics.fmean(xs):.3f}" + (
                f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")  # fmt: skip
            lines.append([quantity, f"{value:g}", source, name, ours, str(len(xs))])
    note = (
        "\n\nThe rank-1 and LP-BNN papers' numbers listed in BENCHMARKS.md are CIFAR-10 "
        "(WideResNet-28-10) numbers, with no counterpart in a LeNet-5 bench."
    )
    if not lines:
        quantities = ", ".join(p[3] for p in entries) or "no quoted number for this data set"
        return title + (
            f"Bench `{bench.path}`, data set {bench.dataset}: no subnetwork Laplace rows for "
            f"{quantities}." + note
        )
    head = (
        f"Bench `{bench.path}`, data set {bench.dataset}, seeds {_seeds_text(sorted(used))} "
        "(ours: mean ± std over seeds):\n\n"
    )
    headers = ["Quantity", "Paper", "Paper's source", "bnnkit method", "bnnkit", "seeds"]
    return title + head + markdown(headers, lines) + note


CLAIMS = [claim_selection, claim_subnet_vs_others, claim_rank1, claim_lpbnn, claim_search]


def report(benches: list[Bench]) -> str:
    parts = [
        "# The papers' claims on the converged benches\n\n"
        "Each row compares method A with method B on one metric over the seeds both have, "
        "matched by seed: the mean of A − B, its 95% Student-t interval "
        '(mean ± t(0.975, n−1) · sd / √n), and a verdict: "A better" or "B better" when '
        'the interval excludes 0 (in the metric\'s better direction), else "not resolved". '
        "NLL in nats; accuracy, ECE and AUROC in %, their differences in points."
    ]
    for bench in benches:
        metrics = bench_metrics(bench)
        parts.append(f"## `{bench.path}`: {bench.dataset}, {bench.model}")
        if bench.unfinished():
            parts.append(
                f"**Unfinished bench**: {', '.join(bench.unfinished())}; the claims below use "
                "its finished runs only (a method without one is reported as absent). Finish "
                "the bench (repeat its command) for the full answer."
            )
        parts += [claim(bench, metrics) for claim in CLAIMS]
        parts.append(papers_table(bench))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benches", nargs="+", help="bench directories (e.g. runs/fmnist_converged)")
    ap.add_argument("--out", help="also write the markdown to this file (atomically)")
    args = ap.parse_args(argv)
    try:
        benches = [load_bench(p) for p in args.benches]
        text = report(benches)
        if args.out:
            try:
                atomic_write_text(Path(args.out), text)
            except OSError as e:
                raise InputError(
                    f"cannot write --out {args.out} ({e}); give a writable path"
                ) from None
    except BnnkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
