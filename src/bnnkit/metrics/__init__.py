"""Metrics: classification (accuracy, NLL, Brier, ECE), OOD (AUROC, AUPR, FPR95), scores."""

from .classification import accuracy, brier, ece, nll, reliability
from .ood import aupr, auroc, fpr_at_95_tpr
from .uncertainty import SCORES, entropy_score, get_score, max_prob_score, mutual_information_score

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "reliability",
    "auroc",
    "aupr",
    "fpr_at_95_tpr",
    "SCORES",
    "get_score",
    "max_prob_score",
    "entropy_score",
    "mutual_information_score",
]
