"""Metrics: classification (accuracy, NLL, Brier, ECE), OOD (AUROC, AUPR, FPR95), scores, and
semantic segmentation over pixels (mIoU, pixel NLL / Brier / ECE, anomaly AUROC / AUPR / FPR95,
per-pixel entropy and mutual information)."""

from .classification import accuracy, brier, ece, nll, reliability
from .ood import aupr, auroc, fpr_at_95_tpr
from .segmentation import (
    PixelAnomalyMetrics,
    PixelUncertainty,
    SegmentationMetrics,
    uncertainty_maps,
)
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
    "SegmentationMetrics",
    "PixelAnomalyMetrics",
    "PixelUncertainty",
    "uncertainty_maps",
]
