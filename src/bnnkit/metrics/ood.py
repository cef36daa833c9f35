"""OOD-detection metrics. A higher score means 'more likely OOD'; OOD is the positive class.

Plain torch, exact on ties: examples with equal scores share one threshold (they are flagged
together), so AUROC counts a tied (in, out) pair as 1/2 (the Mann-Whitney statistic), AUPR is
the average precision over the distinct thresholds (scikit-learn's ``average_precision_score``)
and FPR95 is read at the highest threshold that flags at least 95% of the OOD inputs. Scores may
take any real values (log-likelihoods, energies): nothing squashes them into [0, 1].
"""

from __future__ import annotations

import torch

from ._checks import as_scores


def _counts(score_in: torch.Tensor, score_out: torch.Tensor):
    """Per distinct score, highest first: (OOD count, in-distribution count), both int64."""
    s_in = as_scores(score_in, "score_in")
    s_out = as_scores(score_out, "score_out")
    scores = torch.cat([s_in, s_out])
    is_out = torch.cat([torch.zeros_like(s_in), torch.ones_like(s_out)]).long()
    values, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    pos = torch.zeros(len(values), dtype=torch.long).index_add_(0, inverse, is_out)
    neg = torch.zeros(len(values), dtype=torch.long).index_add_(0, inverse, 1 - is_out)
    return pos.flip(0), neg.flip(0)


def auroc(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """P(score_out > score_in) + P(score_out == score_in) / 2 over all (in, out) pairs."""
    pos, neg = _counts(score_in, score_out)
    # for each group (highest first): in-distribution inputs scored strictly higher
    neg_above = torch.cumsum(neg, 0) - neg
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    wins = (pos * (n_neg - neg_above - neg)).sum().double() + 0.5 * (pos * neg).sum().double()
    return (wins / (n_pos * n_neg)).item()


def aupr(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """Area under the precision-recall curve with OOD as positive (average precision)."""
    pos, neg = _counts(score_in, score_out)
    tp, fp = torch.cumsum(pos, 0).double(), torch.cumsum(neg, 0).double()
    precision = tp / (tp + fp)
    return ((pos.double() / pos.sum()) * precision).sum().item()


def fpr_at_95_tpr(score_in: torch.Tensor, score_out: torch.Tensor) -> float:
    """Fraction of in-distribution inputs flagged OOD at the first threshold catching 95% of OOD."""
    pos, neg = _counts(score_in, score_out)
    tp, fp = torch.cumsum(pos, 0), torch.cumsum(neg, 0)
    hit = torch.nonzero(100 * tp >= 95 * tp[-1])[0, 0]  # integers: no rounding at 95% exactly
    return (fp[hit].double() / fp[-1]).item()
