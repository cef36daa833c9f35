"""Uncertainty scores from a Predictive; higher means more uncertain (more likely OOD)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import unknown_name
from ..predictive import Predictive


def max_prob_score(pred: Predictive) -> torch.Tensor:
    """``1 - max_c p(c|x)``: the maximum-softmax-probability baseline, negated."""
    return 1.0 - pred.confidence()


def entropy_score(pred: Predictive) -> torch.Tensor:
    return pred.entropy()


def mutual_information_score(pred: Predictive) -> torch.Tensor:
    return pred.mutual_information()


SCORES: dict[str, Callable[[Predictive], torch.Tensor]] = {
    "max_prob": max_prob_score,
    "entropy": entropy_score,
    "mutual_info": mutual_information_score,
}


def get_score(name: str) -> Callable[[Predictive], torch.Tensor]:
    if name not in SCORES:
        raise unknown_name("uncertainty score", name, SCORES)
    return SCORES[name]
