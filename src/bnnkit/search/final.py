"""The final comparison of a placement search: the searched plans retrained from scratch with
the bench's training, evaluated beside the baselines on the test set and the test OOD sets (which
the search never saw), in a bench results store under ``OUT/final``.

Up to four plans of the Pareto front are retrained (fewer when they coincide): ``searched``, the
chosen plan of ``plan.json`` (the cheapest within 2% of the best validation NLL),
``searched_nll``, the front's best validation NLL, ``searched_ood``, its best search OOD AUROC,
and ``searched_fast``, the cheapest plan (fewest FLOPs per image) within 2% of the deterministic
baseline's validation NLL and with at least its search OOD AUROC (when the search scored that
baseline). The comparison
(``comparison.md``) gives, for each searched plan against each baseline, the latency ratio
(baseline ms / searched ms, > 1: the searched plan is faster) and the relative differences in test
NLL and in OOD AUROC on every test OOD set. Beside MC dropout as bnnkit runs it (the layers
before the first dropout once per input), ``mc_dropout_full`` is the same trained network run as
MC dropout usually is, the whole network every pass: the comparison the literature makes.

After a segmentation search (its front scores ``anomaly_aupr``, the synthetic anomalies of the
validation images), ``searched_ood`` is the front's best synthetic-anomaly AUPR, the bench runs
on the search's held-out classes, and the comparison gives, per pair, the speed-up per image
and the relative differences in test pixel NLL, test mIoU and the pixel anomaly AUPR / AUROC
(entropy) on the test split's held-out-class pixels, which the search never saw.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections import defaultdict
from pathlib import Path

from .. import io
from ..bench import BenchConfig, check_reusable, check_reuse_sources, run_bench
from ..errors import ConfigError
from ..plan import PlacementPlan
from ..report import ResultStore, markdown

LABELS = ("searched", "searched_nll", "searched_ood", "searched_fast")


def final_plans(out: str | Path) -> dict[str, PlacementPlan]:
    """The plans to retrain, by label (duplicates dropped, the chosen plan kept first)."""
    out = Path(out)
    for name in ("plan.json", "pareto.csv", "search_config.json"):
        if not (out / name).is_file():
            raise ConfigError(
                f"{out} holds no finished search ({name} missing); run `bnnkit search --out "
                f"{out}` to the end first"
            )
    with open(out / "pareto.csv", newline="") as f:
        front = list(csv.DictReader(f))
    if not front:
        raise ConfigError(f"{out / 'pareto.csv'} is empty; the search has no Pareto front")
    best_nll = min(front, key=lambda r: float(r["val_nll"]))
    best_ood = max(front, key=lambda r: float(r[_ood_key(front)]))
    candidates = {
        "searched": PlacementPlan.load(out / "plan.json"),
        "searched_nll": PlacementPlan.from_dict(json.loads(best_nll["plan"])),
        "searched_ood": PlacementPlan.from_dict(json.loads(best_ood["plan"])),
    }
    fast = _fastest_not_worse_than_deterministic(out, front)
    if fast is not None:
        candidates["searched_fast"] = PlacementPlan.from_dict(json.loads(fast["plan"]))
    plans, seen = {}, set()
    for label, plan in candidates.items():
        if plan.key() not in seen:
            seen.add(plan.key())
            plans[label] = plan
    return plans


def _ood_key(front: list[dict]) -> str:
    """The front's OOD objective: ``anomaly_aupr`` after a segmentation search, else
    ``ood_auroc``."""
    return "anomaly_aupr" if "anomaly_aupr" in front[0] else "ood_auroc"


def _fastest_not_worse_than_deterministic(out: Path, front: list[dict]) -> dict | None:
    """The cheapest front plan (fewest FLOPs per image, a deterministic cost; the earliest
    trial among equals) whose validation NLL is within 2% of the deterministic baseline's and
    whose search OOD AUROC (segmentation: synthetic anomaly AUPR) is at least its: the cheapest
    uncertainty that costs nothing in fit (None without a scored deterministic baseline)."""
    if not (out / "baselines.csv").is_file():
        return None
    with open(out / "baselines.csv", newline="") as f:
        det = next((r for r in csv.DictReader(f) if r["name"] == "deterministic"), None)
    if det is None:
        return None
    key = _ood_key(front)
    ok = [r for r in front
          if float(r["val_nll"]) <= 1.02 * float(det["val_nll"])
          and float(r[key]) >= float(det[key])]  # fmt: skip
    return min(ok, key=lambda r: (float(r["flops_per_image"]), int(r["trial"]))) if ok else None


def final_comparison(
    out: str | Path,
    bench: BenchConfig | None = None,
    baselines: list[str] | None = None,
    log=print,
) -> str | None:
    """Retrain the searched plans and the baselines with ``bench`` (default: the bench's own
    defaults) into ``OUT/final``; return and write the comparison (``comparison.md``).

    Resumable like the bench: finished runs are read back, a killed run continues; None when
    the bench's ``max_minutes`` ran out first (the same call continues, and only then writes
    the comparison)."""
    out = Path(out)
    plans = final_plans(out)
    scfg = json.loads((out / "search_config.json").read_text())
    cfg, base = _final_config(out, scfg, bench, baselines, plans)
    check_reusable(
        out / "final" / "bench_config.json", cfg,
        advice=f"delete {out / 'final'} to start the final comparison over (the search itself "
        "is kept), or give the final bench the settings it was made with",
    )  # fmt: skip
    table = run_bench(cfg, log=log)
    if table is None:  # stopped by max_minutes: no comparison from a part of the runs
        return None
    with ResultStore(Path(cfg.out) / "results.sqlite") as store:
        rows = store.rows(dataset=cfg.dataset, model=cfg.model)
    rows = [r for r in rows if r["method"] in cfg.methods and r["seed"] < cfg.seeds]
    headers, lines = comparison(rows, list(plans), base)
    dense = _dense(rows)
    plan_lines = "\n".join(f"- `{label}`: {p.describe()}" for label, p in plans.items())
    unseen = "test set and its held-out-class pixels" if dense else "test set and test OOD sets"
    md = (
        f"# Placement search: final comparison ({cfg.dataset}, {cfg.model})\n\n"
        f"Retrained from scratch: {cfg.epochs} epochs on {cfg.subset or 'all'} training "
        f"images, {cfg.seeds} seed(s); {unseen} never seen by the search.\n\n"
        f"{plan_lines}\n\n"
        + markdown(headers, lines)
        + "\n\n"
        + (SEG_COMPARISON_NOTE if dense else COMPARISON_NOTE)
        + (REUSED_TIMING_NOTE.format(final=out / "final") if cfg.reuse else "")
        + "\n"
    )
    io.atomic_write_text(out / "final" / "comparison.md", md)
    log("\n" + markdown(headers, lines))
    log(f"\nfinal comparison -> {out / 'final' / 'comparison.md'}")
    return table


#: BenchConfig fields the final comparison takes from the search: a --final-config may repeat
#: them (a bench config of the same data and model) but not contradict them
FROM_SEARCH = ("dataset", "model", "model_options", "anomaly_classes")
#: fields it sets itself (OUT/final) or builds (the search's baselines and the searched plans,
#: as variants): a --final-config's values are not used, and the user is told so
SET_BY_FINAL = ("out", "methods", "variants")


def _final_config(
    out: Path,
    scfg: dict,
    bench: BenchConfig | None,
    baselines: list[str] | None,
    plans: dict[str, PlacementPlan],
) -> tuple[BenchConfig, list[str]]:
    """The final bench's config and its baselines: ``bench``'s training and evaluation on the
    search's data (and held-out classes), model and train options (the bench's own train
    options win); ``bench`` itself is left as it was."""
    base_cfg = bench if bench is not None else BenchConfig()
    base = list(baselines if baselines is not None else scfg.get("baselines", []))
    variants = {label: {"method": "placement", "plan": p.to_dict()} for label, p in plans.items()}
    if "mc_dropout" in base:  # the same network run the usual way: the whole net every pass
        base.insert(base.index("mc_dropout") + 1, "mc_dropout_full")
        variants["mc_dropout_full"] = {"method": "mc_dropout", "prefix_once": False}
    cfg = dataclasses.replace(
        base_cfg,
        dataset=scfg["dataset"],
        anomaly_classes=scfg.get("anomaly_classes", base_cfg.anomaly_classes),
        model=scfg["model"],
        model_options=dict(scfg.get("model_options", {})),
        train_options={**scfg.get("train_options", {}), **base_cfg.train_options},
        out=str(out / "final"),
        methods=base + list(plans),
        variants={**base_cfg.variants, **variants},
    )
    return cfg, base


def check_final_config(
    search: dict, bench: BenchConfig, given: set[str] | frozenset[str] = frozenset(),
    source: str = "the final config",
) -> list[str]:  # fmt: skip
    """Refuse, before a search starts, a final bench that would be refused after it: data set,
    model or held-out classes other than the search's (``given``: the keys the user's file
    set), invalid values, and ``reuse`` directories that are not benches made with the same
    settings. ``search``: the search's settings (``asdict(SearchConfig)``). Returns the given
    fields the final comparison does not use (``out``, ``methods``, ``variants``), for a note."""
    clash = [
        f"{k}: {getattr(bench, k)!r} (the search's: {search.get(k)!r})"
        for k in FROM_SEARCH
        if k in given and k in search and _plain(getattr(bench, k)) != _plain(search[k])
    ]
    if clash:
        raise ConfigError(
            f"{source} sets {'; '.join(clash)}, but the final comparison retrains the searched "
            "plans on the search's data and model; remove these fields, or give a bench config "
            "of the search's data set and model"
        )
    unused = sorted(set(given) & set(SET_BY_FINAL))
    out = Path(search.get("out") or ".")
    cfg, _ = _final_config(out, search, bench, None, {})
    if not cfg.methods:  # validate() wants methods; the plans are not known yet
        cfg = dataclasses.replace(cfg, methods=["deterministic"])
    cfg.validate()
    check_reuse_sources(cfg, None)
    return unused


def _plain(v):
    """A setting as compared: tuples as lists (YAML and JSON give lists)."""
    return list(v) if isinstance(v, tuple) else v


def _means(rows: list[dict]) -> dict[tuple[str, str, str], float]:
    vals: dict = defaultdict(list)
    for r in rows:
        vals[(r["method"], r["split"], r["metric"])].append(r["value"])
    return {k: statistics.mean(v) for k, v in vals.items()}


def _dense(rows: list[dict]) -> bool:
    """Whether ``rows`` are a segmentation bench's (pixel anomaly rows, mIoU)."""
    return any(r["split"] == "anomaly" or r["metric"] == "miou" for r in rows)


def comparison(rows: list[dict], searched: list[str], baselines: list[str]):
    """``(headers, lines)``: one line per (searched plan, baseline) pair present in ``rows``:
    the latency ratio, the relative NLL difference, and the relative OOD AUROC difference per
    OOD set, all from means over seeds. Segmentation rows: the latency ratio per image, the
    relative differences in test pixel NLL, test mIoU and the pixel anomaly AUPR and AUROC
    (entropy) on the held-out-class pixels."""
    m = _means(rows)
    if _dense(rows):
        return _seg_comparison(m, searched, baselines)
    ood_sets = sorted({s[4:] for (_, s, _) in m if s.startswith("ood:")})
    headers = ["searched", "baseline", "speed-up (x)", "NLL vs baseline %"]
    headers += [f"AUROC {s} vs baseline %" for s in ood_sets]
    lines = []
    for s in searched:
        for b in baselines:
            ms_s, ms_b = m.get((s, "cost", "latency_ms")), m.get((b, "cost", "latency_ms"))
            if ms_s is None or ms_b is None:
                continue
            line = [s, b, f"{ms_b / ms_s:.2f}", _rel(m, s, b, "test", "nll")]
            line += [_rel(m, s, b, f"ood:{o}", "auroc_entropy") for o in ood_sets]
            lines.append(line)
    return headers, lines


def _seg_comparison(m, searched: list[str], baselines: list[str]):
    headers = ["searched", "baseline", "speed-up (x)", "NLL vs baseline %",
               "mIoU vs baseline %", "anomaly AUPR vs baseline %",
               "anomaly AUROC vs baseline %"]  # fmt: skip
    lines = []
    for s in searched:
        for b in baselines:
            ms_s = m.get((s, "cost", "latency_ms_per_image"))
            ms_b = m.get((b, "cost", "latency_ms_per_image"))
            if ms_s is None or ms_b is None:
                continue
            lines.append([
                s, b, f"{ms_b / ms_s:.2f}", _rel(m, s, b, "test", "nll"),
                _rel(m, s, b, "test", "miou"), _rel(m, s, b, "anomaly", "aupr_entropy"),
                _rel(m, s, b, "anomaly", "auroc_entropy"),
            ])  # fmt: skip
    return headers, lines


def _rel(m, s: str, b: str, split: str, metric: str) -> str:
    vs, vb = m.get((s, split, metric)), m.get((b, split, metric))
    if vs is None or vb is None or vb == 0:
        return "–"
    return f"{100.0 * (vs - vb) / abs(vb):+.1f}"


COMPARISON_NOTE = (
    "speed-up: the baseline's predict() latency per batch divided by the searched plan's (> 1: "
    "the searched plan is faster); NLL vs baseline: relative difference in test NLL (negative: "
    "the searched plan is better); AUROC vs baseline: relative difference in OOD AUROC with the "
    "predictive entropy, per test OOD set (positive: better). Means over seeds; the full table "
    "with spreads is in results.md."
)

REUSED_TIMING_NOTE = (
    "\n\nRuns copied from a `reuse` bench keep the latency that bench measured, in another "
    "process and at another time: for speed-ups timed side by side, run `python "
    "benchmarks/latency.py --runs {final} --vs <baselines>`."
)

SEG_COMPARISON_NOTE = (
    "speed-up: the baseline's predict() latency per image divided by the searched plan's (> 1: "
    "the searched plan is faster); NLL and mIoU vs baseline: relative differences in test pixel "
    "NLL (negative: better) and mIoU (positive: better) over the non-void pixels; anomaly AUPR "
    "/ AUROC vs baseline: relative differences with the predictive entropy as the score and "
    "the held-out classes' test pixels as the anomalies (positive: better). Means over seeds; "
    "the full table with spreads is in results.md."
)
