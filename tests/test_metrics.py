import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from bnnkit import InputError, Predictive
from bnnkit import metrics as M


def _random(n=500, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=g), -1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


def test_accuracy_nll_brier_match_brute_force():
    p, y = _random()
    pn, yn = p.double().numpy(), y.numpy()
    assert M.accuracy(p, y) == pytest.approx((pn.argmax(1) == yn).mean())
    assert M.nll(p, y) == pytest.approx(-np.mean(np.log(pn[np.arange(len(yn)), yn])), rel=1e-6)
    onehot = np.eye(pn.shape[1])[yn]
    assert M.brier(p, y) == pytest.approx(np.mean(((pn - onehot) ** 2).sum(1)), rel=1e-6)


def _brute_force_bins(conf: list[float], n_bins: int) -> list[int]:
    """The documented bins, one comparison at a time: bin m holds (m/M, (m+1)/M], 0 joins bin 0."""
    out = []
    for c in conf:
        hits = [m for m in range(n_bins) if m / n_bins < c <= (m + 1) / n_bins]
        out.append(0 if c == 0.0 else hits[0])
        assert len(hits) <= 1
    return out


def _probs_with_top(tops: np.ndarray, c: int, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose largest entry is exactly ``tops`` (float32), at a random class."""
    n = len(tops)
    rest = ((1.0 - tops) / (c - 1)).astype(np.float32)
    assert (rest < tops).all()
    p = np.repeat(rest[:, None], c, axis=1)
    top_cls = rng.integers(0, c, n)
    p[np.arange(n), top_cls] = tops
    labels = np.where(rng.random(n) < tops, top_cls, (top_cls + 1) % c)  # roughly calibrated
    return torch.from_numpy(p), torch.from_numpy(labels).long()


@pytest.mark.parametrize("n_bins", [4, 5, 8, 10, 15])
def test_ece_and_reliability_match_brute_force_binning_on_bin_edges(n_bins):
    """Confidences exactly on every bin edge (as float32 rounds it), one float32 step either
    side of it, and random ones: ECE and the reliability bins equal a loop over the documented
    bins, compared exactly (the edges decide which bin each example falls in)."""
    rng = np.random.default_rng(n_bins)
    c = 10
    edges = np.array([k / n_bins for k in range(1, n_bins + 1)], dtype=np.float32)
    edges = edges[edges > 0.15]  # the top class must stay the largest of 10
    up, down = np.nextafter(edges, np.float32(2)), np.nextafter(edges, np.float32(0))
    tops = np.concatenate([edges, edges, edges, down, up[up <= 1], rng.uniform(0.15, 1, 200)])
    p, y = _probs_with_top(tops.astype(np.float32), c, rng)
    conf = p.max(1).values.tolist()
    correct = (p.argmax(1) == y).tolist()
    bins = _brute_force_bins(conf, n_bins)
    count = [0] * n_bins
    conf_sum, acc_sum = [0.0] * n_bins, [0.0] * n_bins
    for b, cf, ok in zip(bins, conf, correct):
        count[b] += 1
        conf_sum[b] += cf
        acc_sum[b] += ok
    expected = sum(abs(conf_sum[b] - acc_sum[b]) for b in range(n_bins)) / len(conf)
    assert M.ece(p, y, n_bins=n_bins) == pytest.approx(expected, abs=1e-12)
    r_conf, r_acc, r_count = M.reliability(p, y, n_bins)
    assert r_count.tolist() == count
    for b in range(n_bins):
        if count[b]:
            assert r_conf[b].item() == pytest.approx(conf_sum[b] / count[b], rel=1e-6)
            assert r_acc[b].item() == pytest.approx(acc_sum[b] / count[b], rel=1e-6)


def test_ece_on_random_probabilities_matches_brute_force():
    p, y = _random(2000)
    for n_bins in (1, 7, 15):
        conf, pred = p.max(1)
        bins = _brute_force_bins(conf.tolist(), n_bins)
        total = 0.0
        for b in set(bins):
            idx = [i for i, bb in enumerate(bins) if bb == b]
            acc = (pred[idx] == y[idx]).double().mean().item()
            total += len(idx) / len(bins) * abs(conf[idx].double().mean().item() - acc)
        assert M.ece(p, y, n_bins=n_bins) == pytest.approx(total, abs=1e-9)


def test_perfectly_calibrated_onehot_has_zero_ece_and_nll():
    y = torch.tensor([0, 1, 2, 1])
    p = torch.nn.functional.one_hot(y, 3).float()
    assert M.ece(p, y) == pytest.approx(0.0, abs=1e-7)
    assert M.nll(p, y) == pytest.approx(0.0, abs=1e-7)
    assert M.accuracy(p, y) == 1.0


def test_ood_metrics_match_sklearn():
    g = torch.Generator().manual_seed(1)
    s_in = torch.randn(400, generator=g)
    s_out = torch.randn(300, generator=g) + 1.0
    scores = np.concatenate([s_in.numpy(), s_out.numpy()])
    target = np.concatenate([np.zeros(400), np.ones(300)])
    assert M.auroc(s_in, s_out) == pytest.approx(roc_auc_score(target, scores), abs=1e-6)
    assert M.aupr(s_in, s_out) == pytest.approx(average_precision_score(target, scores), abs=1e-6)
    fpr, tpr, _ = roc_curve(target, scores, drop_intermediate=False)
    expected = fpr[np.argmax(tpr >= 0.95)]
    assert M.fpr_at_95_tpr(s_in, s_out) == pytest.approx(expected, abs=1e-6)


def _brute_force_ood(s_in: np.ndarray, s_out: np.ndarray):
    """AUROC by counting every (in, out) pair (a tie counts 1/2); average precision as the mean
    over OOD inputs of the precision among everything scored at least as high; FPR at the
    highest threshold flagging >= 95% of the OOD inputs."""
    wins = sum(float(o > i) + 0.5 * float(o == i) for i in s_in for o in s_out)
    auroc = wins / (len(s_in) * len(s_out))
    prec = [(s_out >= o).sum() / ((s_out >= o).sum() + (s_in >= o).sum()) for o in s_out]
    aupr = float(np.mean(prec))
    fpr = next(
        (s_in >= t).mean()
        for t in sorted(set(np.r_[s_in, s_out]), reverse=True)
        if 100 * (s_out >= t).sum() >= 95 * len(s_out)
    )
    return auroc, aupr, float(fpr)


@pytest.mark.parametrize("seed", range(6))
def test_ood_metrics_with_ties_and_unbounded_scores_match_brute_force_and_sklearn(seed):
    """Scores from a few values (many ties within and across the two sets), shifted and scaled
    far outside [0, 1] (log-likelihoods, energies): exact against pair counting and sklearn."""
    rng = np.random.default_rng(seed)
    n_in, n_out = int(rng.integers(5, 60)), int(rng.integers(5, 60))
    if seed % 2:
        n_out = 20 * (1 + seed % 3)  # 95% of OOD is a whole number: the >= matters
    levels = int(rng.integers(2, 6))
    scale, shift = [(1.0, 0.0), (50.0, 200.0), (30.0, -900.0)][seed % 3]
    s_in = rng.integers(0, levels, n_in) * scale + shift
    s_out = (rng.integers(0, levels, n_out) + int(rng.integers(0, 2))) * scale + shift
    auroc, aupr, fpr = _brute_force_ood(s_in, s_out)
    t_in, t_out = torch.from_numpy(s_in), torch.from_numpy(s_out)
    assert M.auroc(t_in, t_out) == pytest.approx(auroc, abs=1e-12)
    assert M.aupr(t_in, t_out) == pytest.approx(aupr, abs=1e-12)
    assert M.fpr_at_95_tpr(t_in, t_out) == pytest.approx(fpr, abs=1e-12)
    target = np.r_[np.zeros(n_in), np.ones(n_out)]
    scores = np.r_[s_in, s_out]
    assert auroc == pytest.approx(roc_auc_score(target, scores), abs=1e-12)
    assert aupr == pytest.approx(average_precision_score(target, scores), abs=1e-12)
    f, t, _ = roc_curve(target, scores, drop_intermediate=False)
    assert fpr == pytest.approx(f[np.argmax(t >= 0.95)], abs=1e-12)
    # swapping the roles mirrors AUROC, ties included
    assert M.auroc(t_out, t_in) == pytest.approx(1 - auroc, abs=1e-12)


def test_ood_metrics_when_every_score_is_equal():
    s_in, s_out = torch.full((30,), 7.0), torch.full((10,), 7.0)
    assert M.auroc(s_in, s_out) == 0.5
    assert M.aupr(s_in, s_out) == pytest.approx(10 / 40)
    assert M.fpr_at_95_tpr(s_in, s_out) == 1.0


def test_fpr95_reads_the_threshold_that_flags_exactly_95_percent():
    """20 OOD scores: the threshold 1.0 flags 19 (95% exactly); in-distribution scores tie
    with the OOD ones at 0 and 1."""
    s_out = torch.arange(20.0)
    s_in = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.5, -1.0, -2.0])
    expected = _brute_force_ood(s_in.numpy(), s_out.numpy())[2]
    assert expected == 3 / 8
    assert M.fpr_at_95_tpr(s_in, s_out) == expected


def test_ood_metrics_keep_the_order_of_large_scores():
    """Distinct scores far from [0, 1] stay distinct (nothing squashes them through a sigmoid)."""
    s_in, s_out = torch.arange(40.0, 60.0), torch.arange(50.0, 80.0)
    auroc, aupr, fpr = _brute_force_ood(s_in.numpy(), s_out.numpy())
    assert M.auroc(s_in, s_out) == pytest.approx(auroc) and auroc == pytest.approx(0.9166667)
    assert M.aupr(s_in, s_out) == pytest.approx(aupr)
    assert M.fpr_at_95_tpr(s_in, s_out) == pytest.approx(fpr) and fpr == 0.45  # t = 51: 29 of 30


def test_ood_perfect_separation():
    s_in, s_out = torch.zeros(50), torch.ones(50)
    assert M.auroc(s_in, s_out) == 1.0
    assert M.fpr_at_95_tpr(s_in, s_out) == 0.0


def test_predictive_accepted_by_metrics():
    p, y = _random(100)
    stacked = torch.stack([p, p, p])
    assert M.nll(Predictive(stacked), y) == pytest.approx(M.nll(p, y), rel=1e-6)


def test_mutual_information_closed_forms():
    same = Predictive(torch.softmax(torch.randn(1, 5, 4), -1).expand(3, 5, 4).clone())
    assert torch.allclose(same.mutual_information(), torch.zeros(5), atol=1e-6)
    # two confident members that disagree: MI = log 2, total entropy = log 2
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    pred = Predictive(probs)
    assert pred.mutual_information().item() == pytest.approx(math.log(2), abs=1e-6)
    assert pred.entropy().item() == pytest.approx(math.log(2), abs=1e-6)
    assert pred.confidence().item() == pytest.approx(0.5)


def test_scores_higher_means_more_uncertain():
    sure = Predictive(torch.tensor([[[0.98, 0.01, 0.01]]]))
    unsure = Predictive(torch.tensor([[[0.34, 0.33, 0.33]]]))
    for fn in (M.max_prob_score, M.entropy_score):
        assert fn(unsure) > fn(sure)


@pytest.mark.parametrize(
    "probs,labels,match",
    [
        (torch.tensor([[0.5, 0.6]]), torch.tensor([0]), "sum to 1"),
        (torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]), "NaN"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), "lie in"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]), "shape"),
        (torch.tensor([[2.0, -1.0]]), torch.tensor([0]), "logits"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "empty"),
        (torch.tensor([[0.5, 0.5]]), torch.tensor([0.0]), "integer"),
        (torch.tensor([0.5, 0.5]), torch.tensor([0]), r"\[B, C\]"),
    ],
)
def test_invalid_inputs_raise_clear_errors(probs, labels, match):
    with pytest.raises(InputError, match=match):
        M.nll(probs, labels)


def test_invalid_ood_scores():
    with pytest.raises(InputError, match="NaN"):
        M.auroc(torch.tensor([0.0, float("nan")]), torch.tensor([1.0]))
    with pytest.raises(InputError, match="empty"):
        M.auroc(torch.tensor([0.0]), torch.tensor([]))
    with pytest.raises(InputError, match="1-D"):
        M.aupr(torch.zeros(2, 2), torch.zeros(3))
