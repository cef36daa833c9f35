"""Classification metrics on probabilities ``[B, C]`` (or a Predictive) and labels ``[B]``.

Conventions (the ones used by torch-uncertainty and most UQ papers):
- ``nll``: mean over examples of ``-log p(y|x)``, probabilities clamped at 1e-12.
- ``brier``: mean over examples of ``sum_c (p_c - 1[y=c])^2`` (range [0, 2]).
- ``ece``: top-label expected calibration error with ``n_bins`` equal-width bins (L1).
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_calibration_error

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


def ece(probs, labels: torch.Tensor, n_bins: int = 15) -> float:
    if n_bins < 1:
        raise InputError(f"n_bins must be >= 1, got {n_bins}")
    p = as_probs(probs, labels)
    return multiclass_calibration_error(
        p, labels.long(), num_classes=p.shape[1], n_bins=n_bins, norm="l1"
    ).item()


def reliability(probs, labels: torch.Tensor, n_bins: int = 15):
    """Per-bin (confidence, accuracy, count) for reliability diagrams. Returns three tensors."""
    p = as_probs(probs, labels)
    conf, pred = p.max(-1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf, edges[1:-1], right=False)
    count = torch.bincount(idx, minlength=n_bins).float()
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    safe = count.clamp_min(1)
    return conf_sum / safe, acc_sum / safe, count
