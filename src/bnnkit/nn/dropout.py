"""MC dropout (Gal & Ghahramani, 2016): dropout that stays on at prediction time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..options import Option, OptionTable

MC_DROPOUT_OPTIONS = OptionTable(
    "layer kind 'mc_dropout'",
    [
        Option("p", "float", None, "drop probability (null: 0.25 before Linear layers, 0.1 "
               "channel dropout before Conv2d layers)", low=0.0, high=1.0, high_open=True,
               nullable=True),
    ],
)  # fmt: skip


class MCDropout(nn.Module):
    """Dropout active in train *and* eval mode; each row of the batch gets its own mask,
    so repeating the input S times gives S independent samples in one pass."""

    def __init__(self, p: float = 0.25) -> None:
        super().__init__()
        MC_DROPOUT_OPTIONS["p"].check(p, "MCDropout")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MCDropoutLinear(nn.Sequential):
    """``MCDropout`` followed by the original Linear (the kind ``mc_dropout`` in a plan)."""

    def __init__(self, layer: nn.Linear, p: float = 0.25):
        super().__init__(MCDropout(p), layer)


class MCDropoutConv2d(nn.Sequential):
    """Channel dropout (Dropout2d semantics, kept on) followed by the original Conv2d."""

    def __init__(self, layer: nn.Conv2d, p: float = 0.1):
        super().__init__(_MCDropout2d(p), layer)


class _MCDropout2d(MCDropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(x, self.p, training=True)
