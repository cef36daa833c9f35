"""Helpers over whole models."""

from __future__ import annotations

import torch
from torch import nn


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Sum of ``kl()`` over the KL-bearing sub-modules of ``model`` (0 if there are none).

    A sub-module that defines ``kl()`` is counted once and its own children are not visited,
    so a layer that wraps another stochastic layer is not counted twice.
    """
    terms: list[torch.Tensor] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if callable(getattr(child, "kl", None)):
                terms.append(child.kl())
            else:
                visit(child)

    visit(model)
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return torch.stack([t.reshape(()) for t in terms]).sum()


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss()`` (extra training losses such as LP-BNN's VAE terms) over layers."""
    terms = [m.aux_loss() for m in model.modules() if m is not model and hasattr(m, "aux_loss")]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return torch.stack([t.reshape(()) for t in terms]).sum()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
