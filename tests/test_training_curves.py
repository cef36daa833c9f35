"""Training curves from a run's chunked CSV logs, and the convergence table built on them."""

import pytest

from bnnkit.report import figures as figs
from bnnkit.report.training import convergence_summary, read_curve

pytestmark = pytest.mark.timeout(60)


def write_log(run_dir, version, rows):
    d = run_dir / "logs" / f"version_{version}"
    d.mkdir(parents=True)
    lines = ["epoch,step,train_nll,val_acc,val_nll"]
    for epoch, val_nll, val_acc, train_nll in rows:
        lines.append(f"{epoch},{epoch * 10},,{val_acc},{val_nll}")
        lines.append(f"{epoch},{epoch * 10},{train_nll},,")
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_chunks_join_and_a_later_chunk_wins(tmp_path):
    run = tmp_path / "run"
    write_log(run, 0, [(0, 0.9, 0.5, 1.2), (1, 0.7, 0.6, 0.8)])
    # the second chunk re-logged epoch 1 (stopped after validation, before its checkpoint)
    write_log(run, 1, [(1, 0.65, 0.61, 0.79), (2, 0.6, 0.7, 0.6)])
    # version 10 sorts after version 2 numerically, not as text
    write_log(run, 10, [(3, 0.55, 0.72, 0.5)])
    write_log(run, 2, [(3, 0.99, 0.1, 9.0)])
    c = read_curve(run)
    assert c["val_nll"] == {0: 0.9, 1: 0.65, 2: 0.6, 3: 0.55}
    assert c["val_acc"][1] == 0.61 and c["train_nll"][3] == 0.5
    assert read_curve(tmp_path / "nothing") == {}


def test_convergence_summary_by_hand():
    falling = {"val_nll": {e: 1.0 - 0.1 * e for e in range(8)}, "val_acc": {7: 0.9}}
    rising = {"val_nll": {0: 1.0, 1: 0.5, 2: 0.4, 3: 0.45, 4: 0.5, 5: 0.55, 6: 0.6, 7: 0.7},
              "val_acc": {7: 0.8}}  # fmt: skip
    headers, lines = convergence_summary({"a": [falling], "b": [falling, rising], "c": [{}]})
    assert headers[0] == "Method" and len(lines) == 2  # "c" logged nothing
    # a: last 0.3, best at epoch 8 (1-based), last quarter: epoch 8 minus epoch 6 (index 5)
    assert lines[0] == ["a", "8", "0.3000", "0.3000 (8)", "-0.2000", "90.00"]
    # b: the mean of the two curves per epoch
    mean = [(falling["val_nll"][e] + rising["val_nll"][e]) / 2 for e in range(8)]
    best = min(range(8), key=mean.__getitem__)
    assert lines[1] == [
        "b", "8", f"{mean[7]:.4f}", f"{mean[best]:.4f} ({best + 1})", f"{mean[7] - mean[5]:+.4f}",
        "85.00",
    ]  # fmt: skip


def test_figure_is_written(tmp_path):
    curves = {"a": [{"val_nll": {0: 1.0, 1: 0.5}, "val_acc": {0: 0.5, 1: 0.7}}] * 2}
    path = figs.training_curves(curves, tmp_path / "curves.png")
    assert path.stat().st_size > 1000
