"""Bench report tables: the numbers behind the figures, averaged the documented way."""

import pytest

from bnnkit.report import shift_summary, summary


def _rows():
    rows = []
    for seed, (a0, a90) in enumerate([(0.9, 0.2), (0.7, 0.4)]):
        rows += [
            {"method": "m", "seed": seed, "split": "rotate:0", "metric": "accuracy", "value": a0},
            {"method": "m", "seed": seed, "split": "rotate:90", "metric": "accuracy", "value": a90},
        ]
        for typ, v in (("noise", 1.0), ("blur", 2.0)):
            rows.append(
                {
                    "method": "m",
                    "seed": seed,
                    "split": f"corrupt:{typ}:3",
                    "metric": "nll",
                    "value": v + seed,
                }  # fmt: skip
            )
    # the per-type mean row must not be counted as a severity
    rows.append({"method": "m", "seed": 0, "split": "corrupt:mean", "metric": "nll", "value": 9.0})
    rows.append({"method": "m", "seed": 0, "split": "test", "metric": "nll", "value": 0.5})
    rows.append({"method": "m", "seed": 1, "split": "test", "metric": "nll", "value": 0.7})
    return rows


def test_rotation_table_means_over_seeds_in_percent():
    headers, lines = shift_summary(_rows(), "rotate", "accuracy")
    assert headers == ["Method", "0°", "90°"]
    assert lines == [["m", "80.0", "30.0"]]


def test_corruption_table_means_over_types_and_seeds():
    headers, lines = shift_summary(_rows(), "corrupt", "nll")
    assert headers == ["Method", "3"]
    assert lines == [["m", "2.000"]]  # (1 + 2 + 2 + 3) / 4


def test_shift_summary_rejects_unknown_kind_and_skips_absent_methods():
    with pytest.raises(ValueError, match="'rotate' or 'corrupt'"):
        shift_summary(_rows(), "blur", "nll")
    assert shift_summary(_rows(), "rotate", "accuracy", ["absent"])[1] == []


def test_summary_mean_and_std_over_seeds():
    headers, lines = summary(_rows(), ["m"])
    nll = lines[0][headers.index("NLL")]
    assert nll == "0.600 ± 0.141"


def test_ood_table_has_one_column_per_ood_set_and_the_main_table_their_mean():
    from bnnkit.report import ood_summary

    rows = []
    for seed, (a, b) in enumerate([(0.9, 0.6), (0.7, 0.8)]):
        rows += [
            {"method": "m", "seed": seed, "split": "ood:mnist", "metric": "auroc_entropy",
             "value": a},
            {"method": "m", "seed": seed, "split": "ood:cifar10_grey", "metric": "auroc_entropy",
             "value": b},
            {"method": "m", "seed": seed, "split": "test", "metric": "auroc_entropy",
             "value": 0.0},
        ]  # fmt: skip
    headers, lines = ood_summary(rows, "auroc_entropy")
    assert headers == ["Method", "cifar10_grey", "mnist"]
    assert lines == [["m", "70.00 ± 14.14", "80.00 ± 14.14"]]
    h, main = summary(rows)
    assert main[0][h.index("AUROC %")] == "75.00 ± 0.00"  # per seed: (0.9+0.6)/2 = (0.7+0.8)/2
