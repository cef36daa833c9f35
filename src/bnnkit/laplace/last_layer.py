"""Full-covariance linearised Laplace over the last ``nn.Linear`` layer (weights and bias)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import (
    as_logits_model,
)
from .jacobians import (
    param_slots,
)
from .subnetwork import SubnetLaplace


def last_layer_indices(model: nn.Module) -> torch.Tensor:
    """Flat indices of the last ``nn.Linear`` layer's parameters."""
    model = as_logits_model(model)
    last = None
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            last = mod
    if last is None:
        raise ConfigError("the model has no nn.Linear layer: no last layer for last-layer Laplace")
    ids = {id(p) for p in last.parameters() if p.requires_grad}
    idx = [
        torch.arange(s.offset, s.offset + s.numel) for s in param_slots(model) if id(s.param) in ids
    ]
    return torch.cat(idx)


class LastLayerLaplace(SubnetLaplace):
    """Full-covariance linearised Laplace over the last ``nn.Linear`` layer (weights + bias)."""

    kind = "last_layer"

    def __init__(
        self,
        model,
        prior_precision=1.0,
        memory_budget="2GB",
        likelihood="classification",
        linalg_device="cpu",
    ):
        logits_model = as_logits_model(model)
        super().__init__(
            logits_model,
            last_layer_indices(logits_model),
            prior_precision,
            memory_budget,
            likelihood,
            linalg_device,
        )
