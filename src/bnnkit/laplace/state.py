"""Rebuilding a fitted Laplace approximation from its saved state."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import (
    as_logits_model,
)
from .diagonal import DiagLaplace
from .jacobians import (
    check_indices,
    n_params,
)
from .pixel import PixelLastLayerLaplace
from .subnetwork import SubnetLaplace


def check_subnetwork(model: nn.Module, indices) -> torch.Tensor:
    """Validated, sorted subnetwork indices for ``model`` (raises InputError otherwise)."""
    return check_indices(indices, n_params(as_logits_model(model)))


def laplace_from_state(model: nn.Module, state: dict[str, Any], options: dict[str, Any]):
    """Rebuild a fitted Laplace approximation of ``model`` from :meth:`state`."""
    budget = options.get("memory_budget", "2GB")
    kind = state.get("kind")
    if kind in ("subnetwork", "last_layer"):
        la = SubnetLaplace(
            model, state["indices"], memory_budget=budget,
            linalg_device=options.get("linalg_device", "cpu"),
        )  # fmt: skip
    elif kind == "diag":
        la = DiagLaplace(model, memory_budget=budget)
    elif kind == "pixel_last_layer":
        la = PixelLastLayerLaplace(
            model, head=state["head"], pixel_stride=int(state["pixel_stride"]),
            memory_budget=budget, linalg_device=options.get("linalg_device", "cpu"),
        )  # fmt: skip
    else:
        raise ConfigError(f"unknown Laplace kind {kind!r} in the checkpoint")
    return la.load_state(state)
