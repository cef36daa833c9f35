"""Input validation shared by the metric functions."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..predictive import Predictive


def as_probs(probs, labels: torch.Tensor | None = None, *, atol: float = 1e-3) -> torch.Tensor:
    """Return mean probabilities ``[B, C]`` after checking them (and labels, if given)."""
    if isinstance(probs, Predictive):
        probs = probs.mean()
    if not isinstance(probs, torch.Tensor):
        raise InputError(f"probs must be a tensor or Predictive, got {type(probs).__name__}")
    if probs.dim() != 2:
        raise InputError(
            f"probs must have shape [B, C], got {tuple(probs.shape)}; "
            "average members first or pass a Predictive"
        )
    probs = probs.detach().float()
    if probs.shape[0] == 0:
        raise InputError("probs is empty (batch size 0); metrics need at least one example")
    if not torch.isfinite(probs).all():
        raise InputError("probs contains NaN or inf; check the model's outputs")
    if (probs < -atol).any() or (probs > 1 + atol).any():
        raise InputError("probs must lie in [0, 1]; did you pass logits? apply softmax first")
    sums = probs.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=atol):
        worst = (sums - 1).abs().max().item()
        raise InputError(
            f"each row of probs must sum to 1 (worst row is off by {worst:.3g}); "
            "did you pass logits or unnormalised scores? apply softmax first"
        )
    if labels is not None:
        check_labels(labels, probs.shape[0], probs.shape[1])
    return probs.clamp(0.0, 1.0)


def check_labels(labels: torch.Tensor, batch: int, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise InputError(
            f"labels must have shape [{batch}] to match probs [B={batch}, C], "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if batch and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(
            f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes, "
            f"found range [{labels.min().item()}, {labels.max().item()}]"
        )


def as_scores(score: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(score, torch.Tensor):
        raise InputError(f"{name} must be a tensor, got {type(score).__name__}")
    if score.dim() != 1:
        raise InputError(f"{name} must be 1-D [N], got shape {tuple(score.shape)}")
    if score.numel() == 0:
        raise InputError(f"{name} is empty; OOD metrics need scores for both sets")
    if not torch.isfinite(score).all():
        raise InputError(f"{name} contains NaN or inf")
    return score.detach().double()
