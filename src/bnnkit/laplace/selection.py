"""Subnetwork selection: which parameters get a full-covariance posterior.

Every strategy returns sorted flat indices into the model's trainable parameters (the order of
``torch.nn.utils.parameters_to_vector``), ``n_params`` of them.

* ``largest_variance`` (the rule of Daxberger et al., 2021): largest marginal variance
  ``1 / (h_i + delta_i)`` of a diagonal Laplace posterior with a tuned prior (``h`` = GGN
  diagonal; ``delta`` = the prior precision, a scalar or one value per parameter; the
  ``laplace_subnetwork`` method tunes it per layer by the diagonal posterior's marginal
  likelihood). With a scalar prior the ranking is that of the smallest curvatures, so weights
  the data never inform (a dead unit, an unused input pixel: ``h_i = 0``) come first.
* ``largest_variance_naive``: the same with a scalar prior (laplace-torch's rule). A mask of
  uninformed weights has no curvature and no predictive influence: its predictive equals the
  MAP's.
* ``largest_variance_informed`` (a bnnkit modification): the largest variances among
  *informed* weights ``h_i > informed_tol * delta``, which excludes the uninformed ones; with a
  scalar prior it picks the smallest curvatures just above the threshold, so ``informed_tol``
  decides the subnetwork.
* ``predictive_variance``: largest predictive variance a weight induces alone,
  ``q_i / (h_i + delta)`` with ``q_i = sum_n ||d f(x_n) / d theta_i||^2``.
* ``swag``: largest SWAG variance (diagonal moments of SGD iterates started at the MAP).
* ``magnitude``: largest ``|theta_i|``. ``random``: uniformly at random (seeded).
* ``names``: every parameter whose name or module name matches one of ``names`` (fnmatch).
* ``last_layer``: the last ``nn.Linear`` layer's weights and bias.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .base import _batches, as_logits_model
from .diagonal import DiagLaplace
from .jacobians import (
    check_indices,
    flat_params,
    param_slots,
    unsupported,
)
from .last_layer import last_layer_indices
from .swag import fit_swag

STRATEGIES = (
    "largest_variance",
    "largest_variance_naive",
    "largest_variance_informed",
    "predictive_variance",
    "swag",
    "magnitude",
    "random",
    "names",
    "last_layer",
)


#: the rules that read a diagonal Laplace's curvature
VARIANCE_RULES = (
    "largest_variance",
    "largest_variance_naive",
    "largest_variance_informed",
    "predictive_variance",
)


def name_indices(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Flat indices of every parameter whose name (or its module's name) matches a pattern."""
    model = as_logits_model(model)
    picked, unmatched = [], []
    slots = param_slots(model)
    for pat in names:
        hit = [
            s
            for s in slots
            if fnmatch.fnmatchcase(s.name, pat)
            or fnmatch.fnmatchcase(s.name.rsplit(".", 1)[0], pat)
        ]
        if not hit:
            unmatched.append(pat)
        picked += hit
    if unmatched:
        raise InputError(
            f"no parameter matches {unmatched}; parameter names are: "
            + ", ".join(s.name for s in slots)
        )
    uniq = {s.offset: s for s in picked}.values()
    return torch.sort(torch.cat([torch.arange(s.offset, s.offset + s.numel) for s in uniq])).values


def diagonal_statistics(model: nn.Module, data, memory_budget="2GB", batch_size: int = 256):
    """GGN diagonal ``h`` and Jacobian energy ``q`` of every trainable parameter (float64): one
    diagonal Laplace fit (:meth:`DiagLaplace.fit` accumulates both)."""
    la = DiagLaplace(model, memory_budget=memory_budget).fit(data, batch_size)
    return la.h, la.jacobian_energy


def swag_variance(
    model: nn.Module,
    data,
    epochs: int = 1,
    lr: float = 0.01,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    seed: int = 0,
) -> torch.Tensor:
    """Diagonal SWAG variance (Maddox et al., 2019) from SGD iterates started at the MAP: the
    moments of :func:`bnnkit.laplace.swag.fit_swag` updated after every step.

    Runs on a copy: the model itself is left untouched. ``data``: ``(x, y)`` or a DataLoader
    (its batches are gathered once and reshuffled by ``seed`` every epoch)."""
    if isinstance(data, (tuple, list)) and isinstance(data[0], torch.Tensor):
        x, y = data[0], data[1]
    else:
        pairs = list(_batches(data, batch_size))
        if not pairs:
            raise InputError("SWAG needs training data; the loader gave no batches")
        x, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    steps = -(-len(x) // batch_size)
    try:
        swag = fit_swag(
            as_logits_model(model), x, y, epochs=epochs, lr=lr, weight_decay=weight_decay,
            batch_size=batch_size, snapshots_per_epoch=steps, rank=0, seed=seed,
        )  # fmt: skip
    except InputError as e:
        raise InputError(f"SWAG variance: {e}") from e
    return swag.variance


def select_subnetwork(
    model: nn.Module,
    strategy: str,
    n_params: int | None = None,
    data=None,
    *,
    prior_precision: float | torch.Tensor = 1.0,
    informed_tol: float = 0.01,
    names: list[str] | None = None,
    seed: int = 0,
    memory_budget="2GB",
    swag_epochs: int = 1,
    swag_lr: float = 0.01,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sorted flat indices of the chosen subnetwork (see the module docstring).

    ``data`` (training data, a DataLoader or ``(x, y)``) is needed by the variance-based
    strategies; ``stats`` may pass precomputed ``diagonal_statistics`` to avoid recomputing.
    ``prior_precision``: a scalar, or one value per parameter (``largest_variance`` with a
    per-layer prior)."""
    model = as_logits_model(model)
    if strategy not in STRATEGIES:
        raise InputError(
            f"unknown subnetwork strategy {strategy!r}; use one of {', '.join(STRATEGIES)}"
        )
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if strategy == "last_layer":
        return last_layer_indices(model)
    if strategy == "names":
        if not names:
            raise InputError("strategy 'names' needs names=[...] (parameter or module patterns)")
        return name_indices(model, names)
    if n_params is None or n_params < 1:
        raise InputError(f"strategy {strategy!r} needs n_params >= 1, got {n_params}")
    if n_params > total:
        raise InputError(
            f"subnetwork of {n_params} parameters is larger than the model ({total} trainable "
            "parameters); choose n_params <= the model size"
        )
    # every rule chooses among the parameters a subnetwork Laplace can fit
    fittable, others = _fittable(model)
    n_fit = int(fittable.sum())
    if n_params > n_fit:
        raise InputError(
            f"subnetwork of {n_params} parameters is larger than the {n_fit} parameters of the "
            f"model's Linear, Conv2d and BatchNorm layers (the others: {', '.join(others)}); "
            f"choose n_params <= {n_fit}"
        )
    if strategy == "random":
        g = torch.Generator().manual_seed(seed)
        if not others:  # the draw of every earlier bnnkit version
            return torch.sort(torch.randperm(total, generator=g)[:n_params]).values
        pool = torch.nonzero(fittable).flatten()
        return torch.sort(pool[torch.randperm(len(pool), generator=g)[:n_params]]).values
    if strategy == "magnitude":
        theta = flat_params(model)
        return _top(_only(theta.abs().double().cpu(), fittable), n_params)
    if data is None and stats is None:
        raise InputError(f"strategy {strategy!r} needs training data: data=(x, y) or a DataLoader")
    if strategy == "swag":
        score = swag_variance(model, data, swag_epochs, swag_lr, seed=seed)
        return _top(_only(score, fittable), n_params)
    if others and stats is None:
        raise ConfigError(
            f"strategy {strategy!r} ranks every parameter by a diagonal Laplace, whose Jacobians "
            f"support Linear, Conv2d and BatchNorm layers; {', '.join(others)} "
            f"{'is' if len(others) == 1 else 'are'} elsewhere. Freeze "
            f"{'it' if len(others) == 1 else 'them'} (p.requires_grad_(False): the Laplace keeps "
            "such parameters at their MAP values), or use strategy swag, magnitude, random, "
            "names or last_layer, which choose among the supported layers"
        )
    h, q = stats if stats is not None else diagonal_statistics(model, data, memory_budget)
    delta = torch.as_tensor(prior_precision, dtype=torch.float64)
    if delta.numel() not in (1, total) or not bool((delta > 0).all()):
        raise InputError(
            f"prior_precision must be positive: a scalar or one value per parameter ({total}), "
            f"got {delta.numel()} values"
        )
    if strategy != "largest_variance" and delta.numel() > 1:
        raise InputError(f"strategy {strategy!r} takes a scalar prior_precision")
    var = 1.0 / (h + delta)
    var = _only(var, fittable)
    if strategy in ("largest_variance", "largest_variance_naive"):
        return _top(var, n_params)
    if strategy == "predictive_variance":
        return _top(_only(q * var, fittable), n_params)
    informed = h > informed_tol * delta
    n_inf = int(informed.sum())
    if n_inf < n_params:
        raise InputError(
            f"only {n_inf} weights are informed by the data (GGN diagonal > {informed_tol} x prior "
            f"precision); ask for n_params <= {n_inf} or lower informed_tol"
        )
    return _top(torch.where(informed, var, torch.full_like(var, -math.inf)), n_params)


def _only(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``score`` with the entries outside ``mask`` ranked last."""
    if bool(mask.all()):
        return score
    return torch.where(mask.to(score.device), score, torch.full_like(score, -math.inf))


def _fittable(model: nn.Module) -> tuple[torch.Tensor, list[str]]:
    """Which flat parameters a subnetwork Laplace can fit (bool mask; parameters of Linear,
    Conv2d and BatchNorm layers, not tied across a weight and a bias) and the names of the
    others (a custom ``nn.Parameter`` used in a ``forward``, say)."""
    slots = param_slots(model)
    mask = torch.zeros(sum(s.numel for s in slots), dtype=torch.bool)
    others = []
    for s in slots:
        if unsupported(s) is None:
            mask[s.offset : s.offset + s.numel] = True
        else:
            others.append(s.name)
    return mask, others


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    # stable: ties are broken by position, so selections are reproducible
    order = torch.sort(-score, stable=True).indices[:k]
    return check_indices(torch.sort(order).values, score.numel())
