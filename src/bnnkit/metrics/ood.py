"""OOD-detection metrics. A higher score means 'more likely OOD'; OOD is the positive class."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_roc,
)

from ._checks import as_scores


def _stack(score_in: torch.Tensor, score_out: torch.Tensor):
    s_in = as_scores(score_in, "score_in")
    s_out = as_scores(score_out, "score_out")
    scores = torch.cat([s_in, s_out])
    target = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)]).long()
    return scores, target


def auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    scores, target = _stack(score_in, score_out)
    return binary_auroc(scores, target).item()


def aupr(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """Area under the precision-recall curve with OOD as positive (average precision)."""
    scores, target = _stack(score_in, score_out)
    return binary_average_precision(scores, target).item()


def fpr_at_95_tpr(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """Fraction of in-distribution inputs flagged OOD at the first threshold catching 95% of OOD."""
    scores, target = _stack(score_in, score_out)
    fpr, tpr, _ = binary_roc(scores, target)
    hit = torch.nonzero(tpr >= 0.95)
    return fpr[hit[0, 0]].item()
