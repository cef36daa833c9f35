"""`Predictive`: the one object every method's ``predict`` returns.

It holds per-member (or per-sample) class probabilities ``probs`` of shape ``[S, B, C]``.
Metrics and evaluation only ever see a Predictive, never the method that made it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

_EPS = 1e-12


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(_EPS))).sum(-1)


@dataclass
class Predictive:
    """Per-member class probabilities ``probs: [S, B, C]``.

    ``S`` is the number of ensemble members or posterior samples (1 for a deterministic net).
    """

    probs: torch.Tensor

    def __post_init__(self) -> None:
        p = self.probs
        if not isinstance(p, torch.Tensor):
            raise InputError(f"Predictive needs a tensor, got {type(p).__name__}")
        if p.dim() == 2:
            p = p.unsqueeze(0)
        if p.dim() != 3:
            raise InputError(
                f"Predictive.probs must have shape [S, B, C], got {tuple(p.shape)}; "
                "pass [B, C] for a single model"
            )
        self.probs = p

    @classmethod
    def from_logits(cls, logits: torch.Tensor, temperature: float | torch.Tensor = 1.0):
        """Softmax of logits ``[S, B, C]`` (or ``[B, C]``), optionally tempered."""
        return cls(torch.softmax(logits.float() / temperature, dim=-1))

    @property
    def num_samples(self) -> int:
        return self.probs.shape[0]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[-1]

    def __len__(self) -> int:
        return self.probs.shape[1]

    def mean(self) -> torch.Tensor:
        """Bayesian model average ``[B, C]``."""
        return self.probs.mean(0)

    def entropy(self) -> torch.Tensor:
        """Total predictive uncertainty: entropy of the mean prediction ``[B]``."""
        return _entropy(self.mean())

    def expected_entropy(self) -> torch.Tensor:
        """Aleatoric part: mean over members of each member's entropy ``[B]``."""
        return _entropy(self.probs).mean(0)

    def mutual_information(self) -> torch.Tensor:
        """Epistemic part: entropy of the mean minus mean entropy ``[B]`` (clamped at 0)."""
        return (self.entropy() - self.expected_entropy()).clamp_min(0.0)

    def confidence(self) -> torch.Tensor:
        """Max class probability of the mean prediction ``[B]``."""
        return self.mean().max(-1).values

    def prediction(self) -> torch.Tensor:
        """Predicted class ``[B]``."""
        return self.mean().argmax(-1)

    @staticmethod
    def concat(parts: list[Predictive]) -> Predictive:
        """Concatenate Predictives along the batch dimension."""
        return Predictive(torch.cat([p.probs for p in parts], dim=1))

    def to(self, device) -> Predictive:
        return Predictive(self.probs.to(device))
