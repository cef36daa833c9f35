"""`Predictive`: the one object every method's ``predict`` returns.

It holds per-member (or per-sample) class probabilities ``probs`` of shape ``[S, B, C]`` for
classification, or ``[S, B, C, H, W]`` for dense prediction (one distribution per pixel; the
class axis is always axis 2). Metrics and evaluation only ever see a Predictive, never the
method that made it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

_EPS = 1e-12


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(_EPS))).sum(dim)


@dataclass
class Predictive:
    """Per-member class probabilities ``probs: [S, B, C]`` or ``[S, B, C, H, W]``.

    ``S`` is the number of ensemble members or posterior samples (1 for a deterministic net).
    A dense ``[S, B, C, H, W]`` Predictive's per-example quantities are maps: ``mean()`` is
    ``[B, C, H, W]``, ``entropy()`` ``[B, H, W]``, and so on. A 4-dimensional tensor is refused:
    ``[B, C, H, W]`` of one model and ``[S, B, C, L]`` cannot be told apart.
    """

    probs: torch.Tensor

    def __post_init__(self) -> None:
        p = self.probs
        if not isinstance(p, torch.Tensor):
            raise InputError(f"Predictive needs a tensor, got {type(p).__name__}")
        if p.dim() == 2:
            p = p.unsqueeze(0)
        if p.dim() not in (3, 5):
            hint = (
                "; for one model's dense maps [B, C, H, W] pass probs.unsqueeze(0)"
                if p.dim() == 4
                else ""
            )
            raise InputError(
                f"Predictive.probs must have shape [S, B, C] or [S, B, C, H, W], got "
                f"{tuple(p.shape)}; pass [B, C] for a single classifier{hint}"
            )
        self.probs = p

    @classmethod
    def from_logits(cls, logits: torch.Tensor, temperature: float | torch.Tensor = 1.0):
        """Softmax over the class axis of logits ``[S, B, C]``, ``[S, B, C, H, W]`` (or
        ``[B, C]``), optionally tempered."""
        dim = -1 if logits.dim() <= 3 else 2
        return cls(torch.softmax(logits.float() / temperature, dim=dim))

    @property
    def num_samples(self) -> int:
        return self.probs.shape[0]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[2]

    @property
    def dense(self) -> bool:
        """Whether this holds per-pixel distributions ``[S, B, C, H, W]``."""
        return self.probs.dim() == 5

    def __len__(self) -> int:
        return self.probs.shape[1]

    def mean(self) -> torch.Tensor:
        """Bayesian model average ``[B, C]`` (dense: ``[B, C, H, W]``)."""
        return self.probs.mean(0)

    def entropy(self) -> torch.Tensor:
        """Total predictive uncertainty: entropy of the mean prediction ``[B]`` (dense:
        ``[B, H, W]``, as for every per-example quantity below)."""
        return _entropy(self.mean(), 1)

    def expected_entropy(self) -> torch.Tensor:
        """Aleatoric part: mean over members of each member's entropy ``[B]``."""
        return _entropy(self.probs, 2).mean(0)

    def mutual_information(self) -> torch.Tensor:
        """Epistemic part: entropy of the mean minus mean entropy ``[B]`` (clamped at 0)."""
        return (self.entropy() - self.expected_entropy()).clamp_min(0.0)

    def confidence(self) -> torch.Tensor:
        """Max class probability of the mean prediction ``[B]``."""
        return self.mean().max(1).values

    def prediction(self) -> torch.Tensor:
        """Predicted class ``[B]``."""
        return self.mean().argmax(1)

    @staticmethod
    def concat(parts: list[Predictive]) -> Predictive:
        """Concatenate Predictives along the batch dimension."""
        if len({p.probs.shape[:1] + p.probs.shape[2:] for p in parts}) > 1:
            shapes = sorted({tuple(p.probs.shape) for p in parts})
            raise InputError(
                f"cannot concatenate Predictives of shapes {shapes}: they differ beyond the "
                "batch axis (samples, classes or map size)"
            )
        return Predictive(torch.cat([p.probs for p in parts], dim=1))

    def to(self, device) -> Predictive:
        return Predictive(self.probs.to(device))
