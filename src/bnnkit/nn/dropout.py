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
    """MC dropout of the Linear's inputs followed by the original Linear (the kind
    ``mc_dropout`` in a plan): a mask over the input features per example, i.e. over the
    weight's input columns. On inputs with positions (``[B, T, in]`` tokens, ``[B, H, W, in]``
    pixels) the positions of one example share its mask, as in variational RNN dropout (Gal &
    Ghahramani, 2016): the network is one weight sample per example, which is what
    ``bnnkit.posterior.network_samples`` exports."""

    def __init__(self, layer: nn.Linear, p: float = 0.25):
        super().__init__(_MCDropoutColumns(p), layer)


class MCDropoutConv2d(nn.Sequential):
    """Channel dropout (Dropout2d semantics, kept on) followed by the original Conv2d."""

    def __init__(self, layer: nn.Conv2d, p: float = 0.1):
        super().__init__(_MCDropout2d(p), layer)


class _MCDropoutColumns(MCDropout):
    """Dropout of the last axis, one mask per example (shared along the axes between)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2 or self.p == 0.0:
            return F.dropout(x, self.p, training=True)
        shape = (x.shape[0], *(1,) * (x.dim() - 2), x.shape[-1])
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class _MCDropout2d(MCDropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(x, self.p, training=True)
