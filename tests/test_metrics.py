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


@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_matches_brute_force_binning(n_bins):
    p, y = _random(2000)
    conf, pred = p.max(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            acc = (pred[mask] == y[mask]).double().mean()
            total += mask.double().mean() * abs(conf[mask].double().mean() - acc)
    assert M.ece(p, y, n_bins=n_bins) == pytest.approx(float(total), abs=1e-5)


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
