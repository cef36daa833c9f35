"""Classification metrics on probabilities ``[B, C]`` (or a Predictive) and labels ``[B]``.

Conventions (the ones used by torch-uncertainty and most UQ papers):
- ``nll``: mean over examples of ``-log p(y|x)``, probabilities clamped at 1e-12.
- ``brier``: mean over examples of ``sum_c (p_c - 1[y=c])^2`` (range [0, 2]).
- ``ece``: top-label expected calibration error (L1) over ``n_bins`` equal-width bins that are
  closed on the right: bin ``m`` holds the confidences in ``(m / n_bins, (m + 1) / n_bins]``
  (edges computed in float64; a confidence of exactly 0 joins the first bin), as in Guo et al.
  (2017). ``reliability`` uses the same bins.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ._checks import as_probs

_EPS = 1e-12


def accuracy(probs, labels: torch.Tensor) -> float:
    p = as_probs(probs, labels)
    return (p.argmax(-1) == labels).double().mean().item()


def nll(probs, labels: torch.Tensor) -> float:
    p = as_probs(probs, labels)
    picked = p.gather(1, labels.long().unsqueeze(1)).squeeze(1)
    return (-torch.log(picked.double().clamp_min(_EPS))).mean().item()


def brier(probs, labels: torch.Tensor) -> float:
    p = as_probs(probs, labels).double()
    onehot = torch.nn.functional.one_hot(labels.long(), p.shape[1]).double()
    return ((p - onehot) ** 2).sum(-1).mean().item()


def _binned(probs, labels: torch.Tensor, n_bins: int):
    """Per-bin sums of (confidence, correct) and counts, float64, with the module's bins."""
    if n_bins < 1:
        raise InputError(f"n_bins must be >= 1, got {n_bins}")
    p = as_probs(probs, labels)
    conf, pred = p.max(-1)
    conf = conf.double()
    correct = (pred == labels).double()
    inner = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    idx = torch.bucketize(conf, inner, right=False)  # inner[i-1] < conf <= inner[i]
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    return conf_sum, acc_sum, count


def ece(probs, labels: torch.Tensor, n_bins: int = 15) -> float:
    conf_sum, acc_sum, count = _binned(probs, labels, n_bins)
    return ((conf_sum - acc_sum).abs().sum() / count.sum()).item()


def reliability(probs, labels: torch.Tensor, n_bins: int = 15):
    """Per-bin (confidence, accuracy, count) for reliability diagrams. Returns three tensors."""
    conf_sum, acc_sum, count = _binned(probs, labels, n_bins)
    safe = count.clamp_min(1)
    return (conf_sum / safe).float(), (acc_sum / safe).float(), count.float()
