"""Training curves of a bench's runs: validation NLL per epoch, and whether it has stopped falling.

A run trained in several chunks has one CSV log per chunk (``logs/version_N/metrics.csv``, the
Lightning CSVLogger's layout); an epoch logged by two chunks (a chunk stopped after its validation
but before its checkpoint) takes the later chunk's value, the one training went on from.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

#: the per-epoch quantities read from the logs
CURVE_METRICS = ("val_nll", "val_acc", "train_nll")


def _version(p: Path) -> int:
    try:
        return int(p.parent.name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def read_curve(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{metric: {epoch: value}}`` of one run (empty when it logged nothing, e.g. post hoc)."""
    out: dict[str, dict[int, float]] = {m: {} for m in CURVE_METRICS}
    for path in sorted(Path(run_dir).glob("logs/version_*/metrics.csv"), key=_version):
        try:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    try:
                        epoch = int(row.get("epoch") or "")
                    except ValueError:
                        continue
                    for m in CURVE_METRICS:
                        value = row.get(m)
                        if value not in (None, ""):
                            v = float(value)
                            if math.isfinite(v):
                                out[m][epoch] = v
        except OSError:
            continue
    return {m: dict(sorted(v.items())) for m, v in out.items() if v}


def convergence_summary(curves: dict[str, list[dict[str, dict[int, float]]]]):
    """Headers and lines (lists of cells, for :func:`tables.markdown`): per method (mean over
    its seeds' curves), the epochs trained, validation NLL at the last epoch, its lowest value
    and epoch, and the change over the last quarter of training (last epoch minus the epoch
    three quarters in: negative = still falling, positive = rising again, i.e. overfitting in
    NLL)."""
    headers = ["Method", "epochs", "val NLL last", "val NLL best (epoch)", "change, last quarter",
               "val acc % last"]  # fmt: skip
    lines = []
    for method, runs in curves.items():
        runs = [r for r in runs if r.get("val_nll")]
        if not runs:
            continue
        epochs = sorted(set.intersection(*(set(r["val_nll"]) for r in runs)))
        if not epochs:
            continue
        mean = [statistics.fmean(r["val_nll"][e] for r in runs) for e in epochs]
        n = len(epochs)
        best = min(range(n), key=mean.__getitem__)
        q = max(0, n - 1 - max(1, n // 4))
        accs = [r["val_acc"][epochs[-1]] for r in runs if epochs[-1] in r.get("val_acc", {})]
        acc = f"{100 * statistics.fmean(accs):.2f}" if accs else "–"
        lines.append([
            method, str(epochs[-1] + 1), f"{mean[-1]:.4f}",
            f"{mean[best]:.4f} ({epochs[best] + 1})", f"{mean[-1] - mean[q]:+.4f}", acc,
        ])  # fmt: skip
    return headers, lines
