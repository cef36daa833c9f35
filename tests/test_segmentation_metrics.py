"""Segmentation metrics against brute force: numpy loops over the pixels of small random maps
(every metric), streaming == one batch, ignored pixels excluded, member-by-member uncertainty
maps == the stacked Predictive, and the refusals of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnnkit import InputError
from bnnkit.metrics import (
    PixelAnomalyMetrics,
    SegmentationMetrics,
    aupr,
    auroc,
    brier,
    ece,
    fpr_at_95_tpr,
    nll,
    uncertainty_maps,
)
from bnnkit.predictive import Predictive

IGN = 255


def random_case(seed: int, members: int = 0):
    """Probabilities [B, C, H, W] (or [S, B, C, H, W]) of random sharpness, labels [B, H, W] with
    ~20% ignored pixels; class C-1 is never the truth and nearly never predicted (absent)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = 2 + seed % 3, 3 + seed % 4, 3 + seed % 5, 4 + seed % 3
    shape = (members, b, c, h, w) if members else (b, c, h, w)
    logits = torch.randn(shape, generator=g) * (0.5 + 3 * torch.rand((), generator=g))
    logits[..., c - 1, :, :] = -30.0 if seed % 2 else logits[..., c - 1, :, :]
    probs = torch.softmax(logits, dim=-3)
    labels = torch.randint(0, c - 1, (b, h, w), generator=g)
    labels[torch.rand((b, h, w), generator=g) < 0.2] = IGN
    return probs, labels


def brute(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """Every pixel metric by looping over pixels, from the definitions."""
    b, c, h, w = probs.shape
    inter, union = np.zeros(c), np.zeros(c)
    n = correct = 0
    nll_sum = brier_sum = 0.0
    conf_bin, acc_bin = np.zeros(n_bins), np.zeros(n_bins)
    for i in range(b):
        for r in range(h):
            for s in range(w):
                y = int(labels[i, r, s])
                if y == IGN:
                    continue
                p = [float(v) for v in probs[i, :, r, s]]
                pred = p.index(max(p))  # first index on ties
                n += 1
                correct += pred == y
                for k in range(c):
                    inter[k] += (y == k) and (pred == k)
                    union[k] += (y == k) or (pred == k)
                nll_sum += -math.log(max(p[y], 1e-12))
                brier_sum += sum((p[k] - (k == y)) ** 2 for k in range(c))
                conf = max(p)
                for m in range(n_bins):  # bins (m/n, (m+1)/n]; a confidence of 0 joins bin 0
                    if m / n_bins < conf <= (m + 1) / n_bins or (m == 0 and conf == 0):
                        conf_bin[m] += conf
                        acc_bin[m] += pred == y
                        break
    iou = [inter[k] / union[k] if union[k] else float("nan") for k in range(c)]
    present = [v for v in iou if not math.isnan(v)]
    return {
        "iou": iou,
        "miou": sum(present) / len(present),
        "pixel_accuracy": correct / n,
        "nll": nll_sum / n,
        "brier": brier_sum / n,
        "ece": float(np.abs(conf_bin - acc_bin).sum() / n),
        "pixels": n,
    }


def assert_same(got: dict, want: dict, tol: float = 1e-9) -> None:
    assert got["pixels"] == want["pixels"]
    np.testing.assert_allclose(got["iou"], want["iou"], rtol=0, atol=1e-12)  # NaN == NaN
    for k in ("miou", "pixel_accuracy", "nll", "brier", "ece"):
        assert got[k] == pytest.approx(want[k], abs=tol, rel=1e-6), k


@pytest.mark.parametrize("seed", range(6))
def test_every_pixel_metric_matches_brute_force(seed):
    probs, labels = random_case(seed)
    m = SegmentationMetrics(probs.shape[1])
    m.update(probs, labels)
    got, want = m.compute(), brute(probs.numpy(), labels.numpy())
    assert_same(got, want)
    if seed % 2:  # the absent class is NaN in iou and left out of the mean, not counted as 0
        assert math.isnan(got["iou"][-1])
        assert got["miou"] == pytest.approx(np.nanmean(got["iou"]))
        assert got["miou"] > sum(0 if math.isnan(v) else v for v in got["iou"]) / len(got["iou"])


def test_a_class_only_predicted_counts_with_iou_zero():
    """Union > 0 but no true pixel: IoU 0, in the mean (a false-positive class is penalised)."""
    probs = torch.zeros(1, 3, 2, 2)
    probs[:, 0] = 1.0
    probs[0, :, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # predicts class 2, truth is 0
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    m = SegmentationMetrics(3)
    m.update(probs, labels)
    iou = m.iou()
    assert iou[0] == pytest.approx(3 / 4) and iou[2] == 0.0 and math.isnan(iou[1])
    assert m.miou() == pytest.approx((3 / 4 + 0) / 2)


@pytest.mark.parametrize("seed", range(4))
def test_streaming_over_batches_equals_one_batch(seed):
    probs, labels = random_case(seed + 10)
    one = SegmentationMetrics(probs.shape[1])
    one.update(probs, labels)
    many = SegmentationMetrics(probs.shape[1])
    for idx in torch.arange(len(labels)).split(1 + seed % 2):
        many.update(probs[idx], labels[idx])
    a, b = one.compute(), many.compute()
    assert torch.equal(one.confusion, many.confusion)
    assert_same(b, a, tol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_ignored_pixels_change_nothing_and_the_rest_is_classification_on_pixels(seed):
    probs, labels = random_case(seed + 20)
    m = SegmentationMetrics(probs.shape[1])
    m.update(probs, labels)
    # anything predicted on ignored pixels is not scored
    other = probs.clone()
    ign = labels == IGN
    other.permute(0, 2, 3, 1)[ign] = torch.softmax(torch.randn(int(ign.sum()), probs.shape[1]), 1)
    m2 = SegmentationMetrics(probs.shape[1])
    m2.update(other, labels)
    assert_same(m2.compute(), m.compute(), tol=0)
    # the valid pixels as classification examples: the same NLL, Brier and (binning) ECE
    flat_p = probs.permute(0, 2, 3, 1)[~ign]
    flat_y = labels[~ign]
    assert m.nll() == pytest.approx(nll(flat_p, flat_y), rel=1e-9)
    assert m.brier() == pytest.approx(brier(flat_p, flat_y), rel=1e-9)
    assert m.ece() == pytest.approx(ece(flat_p, flat_y), rel=1e-9, abs=1e-12)
    assert m.pixels == int((~ign).sum())


def test_per_member_probabilities_are_averaged():
    probs, labels = random_case(3, members=4)
    a, b = SegmentationMetrics(probs.shape[2]), SegmentationMetrics(probs.shape[2])
    a.update(probs, labels)
    b.update(probs.mean(0), labels)
    assert_same(a.compute(), b.compute(), tol=1e-12)
    c = SegmentationMetrics(probs.shape[2])
    c.update(uncertainty_maps(probs), labels)
    assert_same(c.compute(), b.compute(), tol=1e-12)


# ---------------------------------------------------------------- uncertainty maps


@pytest.mark.parametrize("seed", range(4))
def test_member_by_member_maps_equal_the_stacked_predictive(seed):
    probs, _ = random_case(seed + 30, members=2 + seed)
    s, b, c, h, w = probs.shape
    consumed = []

    def members():  # one member at a time, as a method running its members would yield them
        for i in range(s):
            consumed.append(i)
            yield probs[i]

    maps = uncertainty_maps(members())
    assert consumed == list(range(s)) and maps.num_members == s
    stacked = Predictive(probs.permute(0, 1, 3, 4, 2).reshape(s, b * h * w, c))

    def as_map(t):
        return t.reshape(b, h, w)

    torch.testing.assert_close(maps.mean, probs.mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(maps.entropy, as_map(stacked.entropy()), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        maps.expected_entropy, as_map(stacked.expected_entropy()), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        maps.mutual_information, as_map(stacked.mutual_information()), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(maps.score("max_prob"), as_map(1 - stacked.confidence()))
    assert torch.equal(maps.prediction(), as_map(stacked.prediction()))
    # the same from the stacked tensor itself
    torch.testing.assert_close(uncertainty_maps(probs).mutual_information, maps.mutual_information)


def test_one_member_has_no_mutual_information():
    probs, _ = random_case(5)
    maps = uncertainty_maps(probs)
    assert maps.num_members == 1 and torch.all(maps.mutual_information == 0)
    torch.testing.assert_close(maps.entropy, maps.expected_entropy)


# ---------------------------------------------------------------- anomaly metrics over pixels


def brute_anomaly(score_in: list[float], score_out: list[float]) -> tuple[float, float, float]:
    """AUROC by pair counting (ties 1/2), AUPR as average precision over distinct thresholds,
    FPR at the highest threshold catching >= 95% of the anomalies."""
    wins = sum((o > i) + 0.5 * (o == i) for o in score_out for i in score_in)
    roc = wins / (len(score_in) * len(score_out))
    ap, prev_recall, fpr95 = 0.0, 0.0, None
    for t in sorted(set(score_in) | set(score_out), reverse=True):
        tp = sum(o >= t for o in score_out)
        fp = sum(i >= t for i in score_in)
        recall = tp / len(score_out)
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
        if fpr95 is None and 100 * tp >= 95 * len(score_out):
            fpr95 = fp / len(score_in)
    return roc, ap, fpr95


@pytest.mark.parametrize("seed", range(5))
def test_anomaly_metrics_over_pixels_match_brute_force(seed):
    """Tied scores, void pixels left out (given extreme scores that would change every number),
    streamed in batches."""
    g = torch.Generator().manual_seed(seed)
    b, h, w = 3, 4 + seed, 5
    anomaly = torch.rand(b, h, w, generator=g) < 0.25
    anomaly[0, 0, 0] = True
    score = (torch.randn(b, h, w, generator=g) + 1.5 * anomaly).mul(3).round() / 3  # ties
    labels = torch.randint(0, 4, (b, h, w), generator=g)
    labels[anomaly] = IGN  # the test masks: anomalies are void for the in-distribution metrics
    void = (torch.rand(b, h, w, generator=g) < 0.2) & ~anomaly
    void[0, 0, 1] = True
    labels[void] = IGN
    score[void] = 100.0  # would be the most anomalous if counted
    m = PixelAnomalyMetrics()
    for i in range(b):
        m.update(score[i : i + 1], anomaly[i : i + 1], labels[i : i + 1])
    got = m.compute()
    s_out = [float(v) for v in score[anomaly]]
    s_in = [float(v) for v in score[~anomaly & ~void]]
    roc, ap, fpr = brute_anomaly(s_in, s_out)
    assert got["auroc"] == pytest.approx(roc, abs=1e-12)
    assert got["aupr"] == pytest.approx(ap, abs=1e-12)
    assert got["fpr95"] == pytest.approx(fpr, abs=1e-12)
    assert (got["anomalous"], got["normal"]) == (len(s_out), len(s_in))
    # bnnkit.metrics.ood's functions on the same pixels
    t_in, t_out = torch.tensor(s_in), torch.tensor(s_out)
    assert got["auroc"] == auroc(t_in, t_out) and got["aupr"] == aupr(t_in, t_out)
    assert got["fpr95"] == fpr_at_95_tpr(t_in, t_out)
    # without labels every non-anomalous pixel is a negative, void ones too
    m2 = PixelAnomalyMetrics()
    m2.update(score, anomaly)
    assert m2.compute()["normal"] == int((~anomaly).sum())


def test_pixel_subsampling_is_seeded_and_close_to_exact():
    g = torch.Generator().manual_seed(0)
    anomaly = torch.rand(4, 40, 50, generator=g) < 0.1
    score = torch.randn(4, 40, 50, generator=g) + anomaly.float()
    exact = PixelAnomalyMetrics()
    exact.update(score, anomaly)
    runs = []
    for _ in range(2):
        m = PixelAnomalyMetrics(sample_rate=0.5, seed=3)
        for i in range(4):
            m.update(score[i : i + 1], anomaly[i : i + 1])
        runs.append(m.compute())
    assert runs[0] == runs[1]
    assert 0.4 < runs[0]["normal"] / exact.compute()["normal"] < 0.6
    assert runs[0]["auroc"] == pytest.approx(exact.compute()["auroc"], abs=0.05)


# ---------------------------------------------------------------- refusals


def test_bad_input_is_refused_naming_the_fix():
    probs, labels = random_case(1)
    c = probs.shape[1]
    m = SegmentationMetrics(c)
    cases = [
        (probs, labels[:, :-1], "shape [B, H, W]"),
        (probs[:1], labels, "shape [B, H, W]"),
        (probs, labels.float(), "integer"),
        (probs.sum(1), labels, "[B, C, H, W]"),
        (torch.log(probs), labels, "softmax"),
        (probs * 0.5, labels, "sum to 1 over the class axis"),
        (probs.permute(0, 2, 3, 1), labels, None),  # channels last
    ]
    for p, y, msg in cases:
        with pytest.raises(InputError) as e:
            m.update(p, y)
        assert msg is None or msg in str(e.value)
    nan = probs.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        m.update(nan, labels)
    for bad in (c, -1, 254):
        y = labels.clone()
        y[0, 0, 0] = bad
        with pytest.raises(InputError, match=rf"lie in \[0, {c - 1}\].*found \[{bad}\]"):
            m.update(probs, y)
    with pytest.raises(InputError, match=f"num_classes={c + 1}"):
        SegmentationMetrics(c + 1).update(probs, labels)
    with pytest.raises(InputError, match="is a class label"):
        SegmentationMetrics(c, ignore_index=0)
    with pytest.raises(InputError, match="no valid pixels"):
        SegmentationMetrics(c).compute()
    empty = SegmentationMetrics(c)
    empty.update(probs, torch.full_like(labels, IGN))
    with pytest.raises(InputError, match="no valid pixels"):
        empty.miou()
    assert m.pixels == 0  # nothing refused was counted


def test_bad_anomaly_and_member_input_is_refused():
    score = torch.rand(2, 3, 4)
    anomaly = score > 0.5
    m = PixelAnomalyMetrics()
    with pytest.raises(InputError, match="differ"):
        m.update(score, anomaly[:, :2])
    with pytest.raises(InputError, match="bool"):
        m.update(score, anomaly.long())
    bad = score.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        m.update(bad, anomaly)
    with pytest.raises(InputError, match=r"\[B, H, W\]"):
        m.update(score[0], anomaly[0])
    m.update(score, torch.zeros_like(anomaly))
    with pytest.raises(InputError, match="both anomalous and normal pixels"):
        m.compute()
    with pytest.raises(InputError, match="sample_rate"):
        PixelAnomalyMetrics(sample_rate=0)
    probs, _ = random_case(2, members=2)
    with pytest.raises(InputError, match="member 1 has shape"):
        uncertainty_maps([probs[0], probs[1][:, :, :-1]])
    with pytest.raises(InputError, match="at least one member"):
        uncertainty_maps(iter([]))
    with pytest.raises(InputError, match="member 0 must sum to 1"):
        uncertainty_maps([probs[0] * 0.5])
    with pytest.raises(ValueError, match="unknown uncertainty score"):
        uncertainty_maps(probs).score("variance")


def test_ignore_index_is_the_same_in_data_and_metrics():
    from bnnkit.data import IGNORE_INDEX as DATA_IGNORE
    from bnnkit.metrics.segmentation import IGNORE_INDEX

    assert DATA_IGNORE == IGNORE_INDEX == IGN
