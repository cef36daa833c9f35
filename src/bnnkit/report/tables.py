"""The comparison table: one line per method, mean +- std over seeds."""

from __future__ import annotations

import statistics
from collections import defaultdict

#: (header, split, metric, format, lower-is-better)
COLUMNS = [
    ("Acc %", "test", "accuracy", "{:.2f}", False, 100.0),
    ("NLL", "test", "nll", "{:.3f}", True, 1.0),
    ("Brier", "test", "brier", "{:.4f}", True, 1.0),
    ("ECE %", "test", "ece", "{:.2f}", True, 100.0),
    ("AUROC %", "ood:*", "auroc_entropy", "{:.2f}", False, 100.0),
    ("AUROC-MI %", "ood:*", "auroc_mutual_info", "{:.2f}", False, 100.0),
    ("AUPR %", "ood:*", "aupr_entropy", "{:.2f}", False, 100.0),
    ("FPR95 %", "ood:*", "fpr95_entropy", "{:.2f}", True, 100.0),
    ("cAcc %", "corrupt:mean", "accuracy", "{:.2f}", False, 100.0),
    ("cNLL", "corrupt:mean", "nll", "{:.3f}", True, 1.0),
    ("ms/batch", "cost", "latency_ms", "{:.2f}", True, 1.0),
    ("Mem MB", "cost", "peak_mem_mb", "{:.1f}", True, 1.0),
    ("Params", "cost", "parameters", "{:,.0f}", True, 1.0),
]


#: the segmentation table (CamVid): pixel metrics over non-void pixels; anomaly detection over
#: pixels with the held-out classes positive
SEG_COLUMNS = [
    ("mIoU %", "test", "miou", "{:.2f}", False, 100.0),
    ("PixAcc %", "test", "pixel_accuracy", "{:.2f}", False, 100.0),
    ("NLL", "test", "nll", "{:.3f}", True, 1.0),
    ("Brier", "test", "brier", "{:.4f}", True, 1.0),
    ("ECE %", "test", "ece", "{:.2f}", True, 100.0),
    ("AUROC %", "anomaly", "auroc_entropy", "{:.2f}", False, 100.0),
    ("AUPR %", "anomaly", "aupr_entropy", "{:.2f}", False, 100.0),
    ("AUPR-MI %", "anomaly", "aupr_mutual_info", "{:.2f}", False, 100.0),
    ("AUPR-MCP %", "anomaly", "aupr_max_prob", "{:.2f}", False, 100.0),
    ("FPR95 %", "anomaly", "fpr95_entropy", "{:.2f}", True, 100.0),
    ("cmIoU %", "corrupt:mean", "miou", "{:.2f}", False, 100.0),
    ("cNLL", "corrupt:mean", "nll", "{:.3f}", True, 1.0),
    ("ms/image", "cost", "latency_ms_per_image", "{:.1f}", True, 1.0),
    ("Mem MB", "cost", "peak_mem_mb", "{:.1f}", True, 1.0),
    ("Params", "cost", "parameters", "{:,.0f}", True, 1.0),
]


def class_iou_summary(rows: list[dict], methods: list[str] | None = None, classes=None):
    """One line per method, one column per class (in the order of ``classes``, the data set's;
    by default as first seen): test IoU % (``iou:<class>`` rows), mean over seeds; a class
    without a row (absent from truth and prediction) shows as "–"."""
    cells: dict = defaultdict(lambda: defaultdict(list))
    classes = list(classes or [])
    for r in rows:
        if r["split"] == "test" and r["metric"].startswith("iou:"):
            c = r["metric"][4:]
            if c not in classes:
                classes.append(c)
            if r["value"] == r["value"]:  # not NaN
                cells[r["method"]][c].append(100.0 * r["value"])
    return ["Method", *classes], _mean_lines(cells, methods, classes, lambda v: f"{v:.1f}")


def _mean_lines(cells, methods, columns, fmt) -> list[list[str]]:
    """Lines of ``method, fmt(mean over seeds) per column`` ("–" where a column has no value)
    for the methods in ``cells`` (in the order of ``methods`` when given)."""
    lines = []
    for m in methods or sorted(cells):
        if m in cells:
            vals = cells[m]
            lines.append([m] + [fmt(statistics.mean(vals[c])) if vals[c] else "–" for c in columns])
    return lines


def _value(rows_by_key, method, seed, split, metric):
    if split == "ood:*":
        vals = [
            v
            for (m, s, sp, me), v in rows_by_key.items()
            if m == method and s == seed and sp.startswith("ood:") and me == metric
        ]
        return sum(vals) / len(vals) if vals else None
    return rows_by_key.get((method, seed, split, metric))


def summary(rows: list[dict], methods: list[str] | None = None, columns=None):
    """Return (headers, lines) with 'mean +- std' strings; methods keep the given order.
    ``columns``: :data:`COLUMNS` (default, classification) or :data:`SEG_COLUMNS`."""
    columns = COLUMNS if columns is None else columns
    by_key = {(r["method"], r["seed"], r["split"], r["metric"]): r["value"] for r in rows}
    seeds = defaultdict(set)
    for r in rows:
        seeds[r["method"]].add(r["seed"])
    order = methods or sorted(seeds)
    headers = ["Method"] + [c[0] for c in columns]
    lines = []
    for m in order:
        if m not in seeds:
            continue
        line = [m]
        for _h, split, metric, fmt, _lower, scale in columns:
            vals = [_value(by_key, m, s, split, metric) for s in sorted(seeds[m])]
            vals = [v * scale for v in vals if v is not None]
            if not vals:
                line.append("–")
            elif len(vals) == 1 or metric in ("parameters", "peak_mem_mb"):
                line.append(fmt.format(vals[0]))
            else:
                line.append(
                    f"{fmt.format(statistics.mean(vals))} ± {fmt.format(statistics.stdev(vals))}"
                )
        lines.append(line)
    return headers, lines


def markdown(headers, lines) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def plain(headers, lines) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *lines)]
    out = []
    for row in [headers, *lines]:
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ]
        out.append("  ".join(cells))
    return "\n".join(out)


def shift_summary(rows: list[dict], kind: str, metric: str, methods: list[str] | None = None):
    """One line per method, one column per shift level: ``kind='rotate'`` gives the value at
    every angle, ``kind='corrupt'`` the mean over corruption types at every severity; each cell
    is the mean over seeds (the spread is in the stored rows and the figures)."""
    if kind not in ("rotate", "corrupt"):
        raise ValueError(f"kind must be 'rotate' or 'corrupt', got {kind!r}")
    cells: dict = defaultdict(lambda: defaultdict(list))  # method -> level -> [values]
    for r in rows:
        parts = r["split"].split(":")
        if parts[0] != kind or r["metric"] != metric:
            continue
        if kind == "rotate" and len(parts) == 2:
            level = int(parts[1])
        elif kind == "corrupt" and len(parts) == 3:
            level = int(parts[2])
        else:
            continue
        cells[r["method"]][level].append(r["value"])
    levels = sorted({lv for per in cells.values() for lv in per})
    unit = "°" if kind == "rotate" else ""
    headers = ["Method"] + [f"{lv}{unit}" for lv in levels]
    scale = 100.0 if metric in ("accuracy", "ece", "miou") else 1.0
    fmt = "{:.1f}" if scale == 100.0 else "{:.3f}"
    lines = []
    for m in methods or sorted(cells):
        if m not in cells:
            continue
        line = [m]
        for lv in levels:
            vals = cells[m].get(lv, [])
            line.append(fmt.format(scale * statistics.mean(vals)) if vals else "-")
        lines.append(line)
    return headers, lines


def mnist_c_summary(rows: list[dict], metric: str, methods: list[str] | None = None):
    """One line per method, one column per MNIST-C corruption (``mnist_c:<name>`` splits, in
    the paper's order) and their mean (``mnist_c:mean``): ``metric`` (accuracy and ECE in %),
    mean over seeds."""
    from ..data.mnist_c import MNIST_C

    cells: dict = defaultdict(lambda: defaultdict(list))  # method -> corruption -> [values]
    for r in rows:
        if r["split"].startswith("mnist_c:") and r["metric"] == metric:
            cells[r["method"]][r["split"][8:]].append(r["value"])
    seen = {c for per in cells.values() for c in per}
    names = [c for c in MNIST_C if c in seen] + sorted(seen - set(MNIST_C) - {"mean"})
    names += ["mean"] if "mean" in seen else []
    scale = 100.0 if metric in ("accuracy", "ece") else 1.0
    fmt = "{:.1f}" if scale == 100.0 else "{:.3f}"
    return ["Method", *names], _mean_lines(cells, methods, names, lambda v: fmt.format(scale * v))


def ood_summary(rows: list[dict], metric: str, methods: list[str] | None = None):
    """One line per method, one column per OOD set (``ood:<name>`` splits): ``metric`` (e.g.
    ``auroc_entropy``) in %, mean ± std over seeds. The main table's OOD columns are the mean
    over these sets; this is the per-set view behind them."""
    cells: dict = defaultdict(lambda: defaultdict(list))  # method -> set -> [values]
    for r in rows:
        if r["split"].startswith("ood:") and r["metric"] == metric:
            cells[r["method"]][r["split"][4:]].append(r["value"])
    sets = sorted({s for per in cells.values() for s in per})
    headers = ["Method"] + sets
    lines = []
    for m in methods or sorted(cells):
        if m not in cells:
            continue
        line = [m]
        for s in sets:
            vals = [100.0 * v for v in cells[m].get(s, [])]
            if not vals:
                line.append("–")
            elif len(vals) == 1:
                line.append(f"{vals[0]:.2f}")
            else:
                line.append(f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}")
        lines.append(line)
    return headers, lines
