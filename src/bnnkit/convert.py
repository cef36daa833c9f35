"""``bayesify(model, plan, members=M)``: one mechanism to make any layers Bayesian.

A *placement plan* maps layer names or glob patterns to kinds::

    plan = {"conv*": "batch_ensemble", "fc3": "variational", "*": "deterministic"}

An exact name beats a pattern; among patterns the first in the plan that matches wins.
Nested modules are converted too (``layer2.0.conv1`` is matched like any other name).
The same mechanism serves the methods, the placement search and bench configs.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import ConfigError, unknown_name
from .models.base import Folded
from .nn import (
    BatchEnsembleConv2d,
    BatchEnsembleLinear,
    EnsembleBatchNorm2d,
    LPBNNConv2d,
    LPBNNLinear,
    MCDropoutConv2d,
    MCDropoutLinear,
    Rank1Conv2d,
    Rank1Linear,
    VariationalConv2d,
    VariationalLinear,
)
from .nn.dropout import MC_DROPOUT_OPTIONS
from .nn.ensemble import BATCH_ENSEMBLE_OPTIONS
from .nn.lpbnn import LPBNN_OPTIONS
from .nn.rank1 import RANK1_OPTIONS
from .nn.variational import VARIATIONAL_OPTIONS
from .options import OptionTable

CONVERTIBLE = (nn.Linear, nn.Conv2d)


def _deterministic(layer, members):
    return layer


def _mc_dropout(layer, members, p: float | None = None):
    if isinstance(layer, nn.Linear):
        return MCDropoutLinear(layer, 0.25 if p is None else p)
    return MCDropoutConv2d(layer, 0.1 if p is None else p)


def _batch_ensemble(layer, members, **options):
    cls = BatchEnsembleLinear if isinstance(layer, nn.Linear) else BatchEnsembleConv2d
    return cls.from_dense(layer, members, **options)


def _rank1(layer, members, **options):
    cls = Rank1Linear if isinstance(layer, nn.Linear) else Rank1Conv2d
    return cls.from_dense(layer, members, **options)


def _lpbnn(layer, members, **options):
    cls = LPBNNLinear if isinstance(layer, nn.Linear) else LPBNNConv2d
    return cls.from_dense(layer, members, **options)


def _variational(layer, members, **options):
    cls = VariationalLinear if isinstance(layer, nn.Linear) else VariationalConv2d
    return cls.from_dense(layer, **options)


@dataclass(frozen=True)
class Kind:
    """A layer kind: its factory ``factory(layer, members, **options) -> nn.Module``, its
    declared options, and whether it needs ``members >= 2``."""

    factory: Callable
    options: OptionTable
    ensemble: bool = False


KINDS: dict[str, Kind] = {
    "deterministic": Kind(_deterministic, OptionTable("layer kind 'deterministic'", [])),
    "mc_dropout": Kind(_mc_dropout, MC_DROPOUT_OPTIONS),
    "batch_ensemble": Kind(_batch_ensemble, BATCH_ENSEMBLE_OPTIONS, ensemble=True),
    "variational": Kind(_variational, VARIATIONAL_OPTIONS),
    "rank1": Kind(_rank1, RANK1_OPTIONS, ensemble=True),
    "lpbnn": Kind(_lpbnn, LPBNN_OPTIONS, ensemble=True),
}


def ensemble_kinds() -> set[str]:
    return {name for name, k in KINDS.items() if k.ensemble}


def register_kind(
    name: str, factory: Callable, ensemble: bool = False, options: OptionTable | None = None
) -> None:
    """Add a layer kind: ``factory(layer, members, **options) -> nn.Module``; ``options``
    declares the keyword options it takes (none if omitted)."""
    KINDS[name] = Kind(factory, options or OptionTable(f"layer kind {name!r}", []), ensemble)


def kind_options(kind: str, options: dict | None) -> dict:
    """Validated options of a layer kind (only those given; the layers' defaults fill in)."""
    if kind not in KINDS:
        raise unknown_name("layer kind", kind, KINDS)
    return KINDS[kind].options.resolve(options, fill=False)


def resolve_plan(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """Map every convertible layer name to its kind under ``plan`` (unmatched: deterministic)."""
    if not isinstance(plan, dict) or not plan:
        raise ConfigError("a placement plan must be a non-empty dict {layer name or pattern: kind}")
    for kind in plan.values():
        if not isinstance(kind, str) or kind not in KINDS:
            raise unknown_name("layer kind", kind, KINDS)
    names = [n for n, m in model.named_modules() if isinstance(m, CONVERTIBLE)]
    if not names:
        raise ConfigError("the model has no nn.Linear or nn.Conv2d layer to convert")
    resolved: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        if name in plan:
            resolved[name] = plan[name]
            used.add(name)
            continue
        for pattern, kind in plan.items():
            if fnmatch.fnmatchcase(name, pattern):
                resolved[name] = kind
                used.add(pattern)
                break
        else:
            resolved[name] = "deterministic"
    unused = [p for p in plan if p not in used]
    if unused:
        raise ConfigError(
            f"plan entries {unused} match no Linear/Conv2d layer; the model's layers are: "
            + ", ".join(names)
        )
    return resolved


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def bayesify(
    model: nn.Module,
    plan: dict[str, str],
    members: int = 1,
    *,
    ensemble_batchnorm: bool = False,
    options: dict[str, dict] | None = None,
    inplace: bool = False,
) -> Folded:
    """Swap the layers named in ``plan`` for Bayesian or ensemble kinds.

    Returns a :class:`~bnnkit.models.Folded` network: ``net(x, samples=K)`` gives logits
    ``[members*K, B, C]`` from one forward pass. ``options`` maps a kind to keyword options of
    its factory (e.g. ``{"mc_dropout": {"p": 0.1}, "variational": {"prior_sigma": 0.1}}``).
    With ``ensemble_batchnorm`` every BatchNorm2d gets per-member statistics and affine
    parameters (only meaningful with an ensemble kind).
    """
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ConfigError(f"members must be an int >= 1, got {members!r}")
    if not isinstance(options or {}, dict):
        raise ConfigError("options must map a layer kind to a dict of its options")
    options = {kind: kind_options(kind, opts) for kind, opts in (options or {}).items()}
    resolved = resolve_plan(model, plan)
    uses_ensemble = any(KINDS[k].ensemble for k in resolved.values())
    if uses_ensemble and members < 2:
        raise ConfigError("ensemble kinds (batch_ensemble, ...) need members >= 2")
    if members > 1 and not uses_ensemble:
        raise ConfigError(
            f"members={members} but the plan has no ensemble kind; for independent networks "
            "use the deep_ensemble method, for stochastic layers draw samples instead"
        )
    net = model if inplace else copy.deepcopy(model)
    for name, kind in resolved.items():
        if kind == "deterministic":
            continue
        layer = net.get_submodule(name)
        _set(net, name, KINDS[kind].factory(layer, members, **options.get(kind, {})))
    if ensemble_batchnorm and uses_ensemble:
        for name, module in list(net.named_modules()):
            if isinstance(module, nn.BatchNorm2d):
                _set(net, name, EnsembleBatchNorm2d.from_dense(module, members))
    net.bnnkit_plan = dict(resolved)
    return Folded(net, members)
