"""Scaling symmetries of ReLU-family networks and their minimum-norm representative.

For a positively homogeneous activation (ReLU, leaky ReLU, PReLU), multiplying a hidden unit's
incoming weights and bias by ``a > 0`` and dividing its outgoing weights by ``a`` leaves the
function unchanged. A *scale group* is a set of units sharing one ``a`` per unit: the output
units of a ``Linear`` / convolution, or of a BatchNorm's or LayerNorm's affine map, with
everything that reads them. The group follows a value only through ops proven positively
homogeneous of degree 1 per unit *on the axis its units sit on* (:mod:`.graph` walks the graph,
the table below holds the rules): those activations, dropout, ``abs``, negation; max and average
pooling, ``mean`` / ``sum`` / ``amax`` over other axes; reshapes, flattens and transposes;
multiplication or division by numbers or by tensors that are not scaled; a sum of values scaled
alike (a residual addition joins the groups it adds). Anything else ends the group, its units
keep scale 1 (always correct), with a one-time warning naming the op: adding a constant
(``x + 1``), a mean over the units' axis, an op the rules do not know.

BatchNorm: scaling the units *before* a BatchNorm is absorbed by the normalisation, exactly only
up to ``eps``; that direction is degenerate, and it is left alone (scale 1, deterministic; the
caller's ``eps`` is never touched). The BatchNorm's affine output (``weight``, ``bias``) is a
proper scale group. Activations that are not positively homogeneous (tanh, sigmoid, GELU, SiLU,
ELU, softplus, ...) have other symmetries (sign flips for odd ones), and are refused.

The minimum-L2 representative: ``min_a sum_params ||rescaled||^2`` is convex in ``log a`` with
the optimum where every unit's incoming squared mass equals its outgoing squared mass. Block
coordinate descent solves it exactly per group (for fixed other groups a unit's objective is
``A a^2 + B / a^2``, minimal at ``a^4 = B / A``) and converges to the global optimum. Units
with no incoming or no outgoing mass (dead units) have no minimiser; they keep scale 1.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from . import graph
from .graph import traced, unit_factor, unit_rows


@dataclass(frozen=True)
class Site:
    """Where a scale group's ``a`` acts: ``key``'s ``axis``, laid out as ``outer`` blocks of
    ``units x repeat`` entries."""

    key: str
    axis: int
    repeat: int = 1
    outer: int = 1


@dataclass
class ScalingSpec:
    """``groups``: name -> units; ``incoming`` / ``outgoing``: name -> sites multiplied /
    divided by the unit's scale."""

    groups: dict[str, int]
    incoming: dict[str, list[Site]] = field(default_factory=dict)
    outgoing: dict[str, list[Site]] = field(default_factory=dict)


# ---------------------------------------------------------------------- rules (data)

_REFUSED = "not positively homogeneous: "


def _batchnorm(w: graph.Walk, node, mod) -> None:
    """Scales on the channels before a BatchNorm are the degenerate direction (left at 1, by
    design); on another axis they are shifted by per-channel statistics (the group ends). The
    affine output (``weight``, ``bias``) creates a group on the channel axis."""
    t, dst = w.unary(node), w.shape(node)
    if t is not None:
        if t.axis == 1:
            w.G.fix(t.gid)
        else:
            w.G.fix(t.gid, f"{graph.describe(node)} shifts the units by per-channel statistics")
    if not mod.affine or dst is None or len(dst) < 2:
        return w.keep(node, None)
    gid = w.new_group(node, mod.num_features, 1)
    w.mark(f"{node.target}.weight", 0, gid, "in")
    w.mark(f"{node.target}.bias", 0, gid, "in")


def _layernorm(w: graph.Walk, node, mod) -> None:
    """Normalisation absorbs or mixes the scales of its input (left at 1, by design); the affine
    output over one normalised axis creates a group on the last axis."""
    t, dst = w.unary(node), w.shape(node)
    if t is not None:
        w.G.fix(t.gid)
    if not mod.elementwise_affine or len(mod.normalized_shape) != 1 or dst is None:
        return w.keep(node, None)
    gid = w.new_group(node, mod.normalized_shape[0], len(dst) - 1)
    w.mark(f"{node.target}.weight", 0, gid, "in")
    if getattr(mod, "bias", None) is not None:
        w.mark(f"{node.target}.bias", 0, gid, "in")


def _refused(w: graph.Walk, node, mod=None) -> None:
    """An activation that is not positively homogeneous: refused (see :func:`_refuse`) when the
    group it ends would otherwise be kept."""
    w.end(node, _REFUSED + graph.describe(node))


def _refuse(w: graph.Walk) -> None:
    G = w.G
    for r in range(len(G.parent)):
        if G.find(r) == r and not G.expected[r]:
            for why in G.reasons[r]:
                if why.startswith(_REFUSED):
                    raise ConfigError(
                        f"scaling symmetries need positively homogeneous activations (ReLU "
                        f"family); the model applies {why[len(_REFUSED) :]}, whose symmetries "
                        f"differ: remove only permutations for it"
                    )


_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                        nn.Dropout3d, nn.Identity)  # fmt: skip
_NOT_HOMOGENEOUS_MODULES = (
    nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softmax, nn.LogSoftmax, nn.Softmin,
)  # fmt: skip
_HOMOGENEOUS_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.dropout,
                          F.dropout1d, F.dropout2d, F.dropout3d, torch.abs, torch.neg,
                          operator.neg, operator.pos)  # fmt: skip
_NOT_HOMOGENEOUS_FUNCTIONS = (
    torch.tanh, torch.sigmoid, F.tanh, F.sigmoid, F.gelu, F.silu, F.elu, F.selu, F.celu,
    F.softplus, F.mish, F.hardswish, F.hardsigmoid, F.relu6, F.hardtanh, F.softsign,
    F.logsigmoid, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.exp,
)  # fmt: skip
_HOMOGENEOUS_METHODS = ("relu", "relu_", "abs", "neg", "clone", "detach", "float", "double",
                        "half", "to")  # fmt: skip
_NOT_HOMOGENEOUS_METHODS = ("tanh", "sigmoid", "exp", "softmax", "log_softmax")
_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin)

RULES = graph.Rules(
    name="scaling_spec",
    modules=[
        ((nn.Linear,), graph.linear),
        (graph.CONVS, graph.conv),
        (graph.BATCHNORMS, _batchnorm),
        ((nn.LayerNorm,), _layernorm),
        (_HOMOGENEOUS_MODULES, graph.elementwise),
        (_NOT_HOMOGENEOUS_MODULES, _refused),
        *[(types, graph.pooling(k)) for types, k in graph.POOLS],
        ((nn.Flatten, nn.Unflatten), graph.reshape),
    ],
    functions={f: graph.elementwise for f in _HOMOGENEOUS_FUNCTIONS}
    | {f: _refused for f in _NOT_HOMOGENEOUS_FUNCTIONS}
    | {f: graph.sum_homogeneous for f in (operator.add, operator.iadd, operator.sub,
                                          operator.isub, torch.add, torch.sub)}
    | {f: graph.product_homogeneous for f in (operator.mul, operator.imul, torch.mul)}
    | {f: graph.quotient_homogeneous for f in (operator.truediv, operator.itruediv, torch.div)}
    | {f: graph.reduction("end") for f in _REDUCTIONS}
    | graph.pooling_functions()
    | graph.structural_functions(),
    methods={m: graph.elementwise for m in _HOMOGENEOUS_METHODS}
    | {m: _refused for m in _NOT_HOMOGENEOUS_METHODS}
    | {m: graph.sum_homogeneous for m in ("add", "add_", "sub", "sub_")}
    | {m: graph.product_homogeneous for m in ("mul", "mul_")}
    | {m: graph.quotient_homogeneous for m in ("div", "div_")}
    | {m: graph.reduction("end") for m in ("mean", "sum", "amax", "amin")}
    | graph.structural_methods(),
    check=_refuse,
)  # fmt: skip


def scaling_spec(model: nn.Module, example_input: torch.Tensor) -> ScalingSpec:
    """The scale groups of a ReLU-family ``model`` (traced with ``torch.fx``); refuses a model
    with an activation that is not positively homogeneous on hidden units, naming it."""
    gm = traced(model, example_input, "ScalingSpec")
    walked = graph.walk(model, gm, RULES)
    spec = ScalingSpec({})
    for name, m in walked.marks:
        sites = (spec.incoming if m.role == "in" else spec.outgoing).setdefault(name, [])
        site = Site(m.key, m.axis, m.repeat, m.outer)
        if site not in sites:
            sites.append(site)
    for g in walked.groups:
        inc = {s.key for s in spec.incoming.get(g, [])}
        out = {s.key for s in spec.outgoing.get(g, [])}
        # a group nothing reads or nothing writes is not a symmetry; a weight both scaled and
        # unscaled by the same units (a module applied to its own output) has no closed form
        if not inc or not out or inc & out:
            spec.incoming.pop(g, None)
            spec.outgoing.pop(g, None)
    spec.groups = {g: n for g, n in walked.groups.items() if g in spec.incoming}
    return spec


def _unit_view(t: torch.Tensor, site: Site, n: int) -> torch.Tensor:
    """``t`` as ``[n units, rest]`` along the site's axis."""
    return unit_rows(t, site.axis, n, site.repeat, site.outer)


def _scale_site(t: torch.Tensor, site: Site, factor: torch.Tensor) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[site.axis] = -1
    f = unit_factor(factor, site.repeat, site.outer).to(t.dtype)
    return t * f.view(shape)


def rescale(
    state: dict[str, torch.Tensor], spec: ScalingSpec, scales: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict: incoming sites of group ``g`` times ``scales[g]``, outgoing sites
    divided by it (positive scales only)."""
    for g, a in scales.items():
        if g not in spec.groups:
            raise InputError(f"unknown scale group {g!r}; the spec has {list(spec.groups)}")
        if a.shape != (spec.groups[g],) or not bool((a > 0).all()) or not bool(a.isfinite().all()):
            raise InputError(f"the scales of group {g!r} must be {spec.groups[g]} positive numbers")
    out = {k: v.clone() for k, v in state.items()}
    for g, a in scales.items():
        for s in spec.incoming[g]:
            out[s.key] = _scale_site(out[s.key], s, a)
        for s in spec.outgoing[g]:
            out[s.key] = _scale_site(out[s.key], s, 1.0 / a)
    return out


def random_scales(spec: ScalingSpec, generator=None, spread: float = 1.0):
    """Log-normal positive scales per unit (``exp(spread * N(0, 1))``)."""
    return {g: torch.exp(spread * torch.randn(n, generator=generator, dtype=torch.float64))
            for g, n in spec.groups.items()}  # fmt: skip


def _masses(cur, spec: ScalingSpec, g: str):
    n = spec.groups[g]
    a = sum(_unit_view(cur[s.key], s, n).pow(2).sum(1) for s in spec.incoming[g])
    b = sum(_unit_view(cur[s.key], s, n).pow(2).sum(1) for s in spec.outgoing[g])
    return a, b


class BalanceWarning(RuntimeWarning):
    """Balancing stopped at ``max_sweeps`` before every unit was balanced to ``tol``."""


def _imbalance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative difference of live units' incoming and outgoing squared masses."""
    live = (a > 0) & (b > 0)
    return float((a[live] - b[live]).abs().div(a[live] + b[live]).max()) if live.any() else 0.0


def balancing_scales(
    state: dict[str, torch.Tensor], spec: ScalingSpec, tol: float = 1e-12, max_sweeps: int = 10_000
) -> dict[str, torch.Tensor]:
    """The scales of the minimum-L2 representative (float64): block coordinate descent, one
    closed-form update per group per sweep, until every unit's incoming and outgoing squared
    masses agree to ``tol`` (relative). If ``max_sweeps`` sweeps do not get there, a
    :class:`BalanceWarning` says how far off the result is: the scales still keep the function,
    but the representative is not the minimum-norm one (pass a larger ``max_sweeps``)."""
    cur = {k: v.detach().to(torch.float64) for k, v in state.items()}
    total = {g: torch.ones(n, dtype=torch.float64) for g, n in spec.groups.items()}
    for _ in range(max_sweeps):
        worst = 0.0
        for g in spec.groups:
            a, b = _masses(cur, spec, g)
            live = (a > 0) & (b > 0)
            step = torch.ones_like(a)
            step[live] = (b[live] / a[live]).pow(0.25)
            worst = max(worst, _imbalance(a, b))
            for site in spec.incoming[g]:  # only the touched tensors, no full copy
                cur[site.key] = _scale_site(cur[site.key], site, step)
            for site in spec.outgoing[g]:
                cur[site.key] = _scale_site(cur[site.key], site, 1.0 / step)
            total[g] = total[g] * step
        if worst < tol:
            return total
    worst = max((_imbalance(*_masses(cur, spec, g)) for g in spec.groups), default=0.0)
    if worst >= tol:
        warnings.warn(
            f"balancing did not converge in {max_sweeps} sweeps: a unit's incoming and outgoing "
            f"squared masses still differ by {worst:.1e} (relative; tol {tol:.0e}); the scales "
            f"keep the function but are not the minimum-norm representative, so a canonical "
            f"form from them is not unique: pass a larger max_sweeps",
            BalanceWarning,
            stacklevel=2,
        )
    return total


def balance(
    state: dict[str, torch.Tensor], spec: ScalingSpec, tol: float = 1e-12, max_sweeps: int = 10_000
) -> dict[str, torch.Tensor]:
    """``state`` rescaled to the minimum-L2 representative of its scaling orbit (same dtypes);
    ``tol`` and ``max_sweeps`` as in :func:`balancing_scales`."""
    scales = balancing_scales(state, spec, tol, max_sweeps)
    out = rescale({k: v.to(torch.float64) if v.is_floating_point() else v
                   for k, v in state.items()}, spec, scales)  # fmt: skip
    return {k: out[k].to(state[k].dtype) for k in state}


def symmetry_specs(model: nn.Module, example_input: torch.Tensor, scaling: bool | str = True):
    """``(permutation spec, scaling spec or None)`` of ``model``. ``scaling=True``: the scaling
    spec, refusing activations that are not positively homogeneous; ``"auto"``: None for those
    (permutations only); ``False``: None."""
    from .permutation import permutation_spec

    pspec = permutation_spec(model, example_input)
    if scaling is False:
        return pspec, None
    try:
        return pspec, scaling_spec(model, example_input)
    except ConfigError:
        if scaling == "auto":
            return pspec, None
        raise
