"""Scaling symmetries of ReLU-family networks and their minimum-norm representative.

For a positively homogeneous activation (ReLU, leaky ReLU, PReLU; max and average pooling,
dropout and flattening commute too), multiplying a hidden unit's incoming weights and bias by
``a > 0`` and dividing its outgoing weights by ``a`` leaves the function unchanged. A *scale
group* is a set of units sharing one ``a`` per unit: the output units of a ``Linear`` /
``Conv2d``, or of a BatchNorm's affine map, with everything that reads them; a residual
addition joins the groups it adds (both sides must scale alike).

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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError

_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten,
)  # fmt: skip
_HOMOGENEOUS_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.dropout, F.dropout2d,
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.flatten,
}  # fmt: skip
_HOMOGENEOUS_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "contiguous", "clone",
                        "mean", "float", "double"}  # fmt: skip
_NOT_HOMOGENEOUS_MODULES = (nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU,
                            nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                            nn.ReLU6)  # fmt: skip
_NOT_HOMOGENEOUS_FUNCTIONS = {torch.tanh, torch.sigmoid, F.gelu, F.silu, F.elu, F.selu,
                              F.softplus, F.mish, F.hardswish, F.relu6, F.hardtanh}  # fmt: skip
_ADD = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class Site:
    """Where a scale group's ``a`` acts: ``key``'s ``axis`` (units of ``repeat`` entries)."""

    key: str
    axis: int
    repeat: int = 1


@dataclass
class ScalingSpec:
    """``groups``: name -> units; ``incoming`` / ``outgoing``: name -> sites multiplied /
    divided by the unit's scale."""

    groups: dict[str, int]
    incoming: dict[str, list[Site]] = field(default_factory=dict)
    outgoing: dict[str, list[Site]] = field(default_factory=dict)


def scaling_spec(model: nn.Module, example_input: torch.Tensor) -> ScalingSpec:
    """The scale groups of a ReLU-family ``model`` (traced with ``torch.fx``); refuses a model
    with an activation that is not positively homogeneous, naming it."""
    import torch.fx

    from .permutation import _flatten, _Groups, node_shape, traced

    gm = traced(model, example_input, "ScalingSpec")
    modules = dict(gm.named_modules())
    G = _Groups()
    val: dict = {}  # node -> (scale group, repeat)
    inc: dict[int, list[Site]] = {}
    out: dict[int, list[Site]] = {}

    shape = node_shape

    def fixed(node):
        G.fix_output(val, node)

    def fix_inputs(node):
        G.fix_inputs(val, node)

    def refuse(what):
        raise ConfigError(
            f"scaling symmetries need positively homogeneous activations (ReLU family); the "
            f"model applies {what}, whose symmetries differ: remove only permutations for it"
        )

    for node in gm.graph.nodes:
        first = val.get(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) \
            else None  # fmt: skip
        if node.op in ("placeholder", "get_attr"):
            fixed(node)
        elif node.op == "output":
            fix_inputs(node)
        elif node.op == "call_module":
            mod = modules[node.target]
            p = node.target + "."
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                size = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
                ok = getattr(mod, "groups", 1) == 1
                gid = G.new(node.target, size, fixed=not ok)
                if first is not None:
                    if ok:
                        out.setdefault(first[0], []).append(Site(p + "weight", 1, first[1]))
                    else:
                        G.fix(first[0])
                inc[gid] = [Site(p + "weight", 0)] + ([Site(p + "bias", 0)] if mod.bias is not
                                                      None else [])  # fmt: skip
                val[node] = (gid, 1)
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if first is not None:
                    G.fix(first[0])  # pre-norm scale: degenerate, left at 1
                n = mod.num_features
                gid = G.new(node.target, n, fixed=not mod.affine)
                if mod.affine:
                    inc[gid] = [Site(p + "weight", 0), Site(p + "bias", 0)]
                val[node] = (gid, 1)
            elif isinstance(mod, nn.Flatten) and first is not None:
                val[node] = _flatten(G, first, shape(node.args[0]), mod.start_dim, mod.end_dim)
            elif isinstance(mod, _HOMOGENEOUS_MODULES) and first is not None:
                if isinstance(mod, nn.PReLU):
                    pass  # slope per channel: unchanged by positive scaling
                val[node] = first
            elif isinstance(mod, _NOT_HOMOGENEOUS_MODULES):
                refuse(f"{type(mod).__name__} at {node.target}")
            else:
                fix_inputs(node)
                fixed(node)
        elif node.op == "call_function":
            fn = node.target
            if fn in _NOT_HOMOGENEOUS_FUNCTIONS:
                refuse(getattr(fn, "__name__", str(fn)))
            if fn is torch.flatten and first is not None:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                val[node] = _flatten(G, first, shape(node.args[0]), start, end)
            elif fn in _HOMOGENEOUS_FUNCTIONS and first is not None:
                val[node] = first
            elif fn in _ADD:
                tracked = [val[a] for a in node.all_input_nodes if a in val]
                if len(tracked) < 2 or len({t[1] for t in tracked}) > 1:
                    fix_inputs(node)
                    fixed(node)
                    continue
                gid = tracked[0][0]
                for t in tracked[1:]:
                    gid = G.union(gid, t[0])
                val[node] = (gid, tracked[0][1])
            elif fn is operator.getitem and first is None:
                continue
            else:
                fix_inputs(node)
                if shape(node) is not None:
                    fixed(node)
        elif node.op == "call_method":
            m = node.target
            if m in ("tanh", "sigmoid"):
                refuse(m)
            if m in ("size", "dim"):
                continue
            if m in ("view", "reshape", "flatten") and first is not None:
                src, dst = shape(node.args[0]), shape(node)
                if m == "flatten" or (dst is not None and src is not None and len(dst) == 2):
                    val[node] = _flatten(G, first, src, 1, -1)
                elif src == dst:
                    val[node] = first
                else:
                    fix_inputs(node)
                    fixed(node)
            elif m in ("add", "add_"):
                tracked = [val[a] for a in node.all_input_nodes if a in val]
                if not tracked:
                    continue
                gid = tracked[0][0]
                for t in tracked[1:]:
                    gid = G.union(gid, t[0])
                val[node] = (gid, tracked[0][1])
            elif m in _HOMOGENEOUS_METHODS and first is not None:
                val[node] = first
            else:
                fix_inputs(node)
                if shape(node) is not None:
                    fixed(node)

    names: dict[int, str] = {}
    for gid in range(len(G.parent)):
        r = G.find(gid)
        if not G.fixed[r] and G.size[r] is not None and r not in names:
            names[r] = G.name[r]
    spec = ScalingSpec({names[r]: G.size[r] for r in names})
    for src, sites in ((inc, spec.incoming), (out, spec.outgoing)):
        for gid, ss in src.items():
            r = G.find(gid)
            if r in names:
                sites.setdefault(names[r], []).extend(ss)
    for g in spec.groups:  # a group nothing reads or nothing writes is not a symmetry
        if not spec.incoming.get(g) or not spec.outgoing.get(g):
            spec.incoming.pop(g, None)
            spec.outgoing.pop(g, None)
    spec.groups = {g: n for g, n in spec.groups.items() if g in spec.incoming}
    return spec


def _unit_view(t: torch.Tensor, site: Site, n: int) -> torch.Tensor:
    """``t`` as ``[n units, rest]`` along the site's axis."""
    return t.movedim(site.axis, 0).reshape(n, -1)


def _scale_site(t: torch.Tensor, site: Site, factor: torch.Tensor) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[site.axis] = -1
    f = factor.repeat_interleave(site.repeat).to(t.dtype)
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


def balancing_scales(
    state: dict[str, torch.Tensor], spec: ScalingSpec, tol: float = 1e-12, max_sweeps: int = 10_000
) -> dict[str, torch.Tensor]:
    """The scales of the minimum-L2 representative (float64): block coordinate descent, one
    closed-form update per group per sweep, until every unit's incoming and outgoing squared
    masses agree to ``tol`` (relative)."""
    cur = {k: v.detach().to(torch.float64) for k, v in state.items()}
    total = {g: torch.ones(n, dtype=torch.float64) for g, n in spec.groups.items()}
    for _ in range(max_sweeps):
        worst = 0.0
        for g in spec.groups:
            a, b = _masses(cur, spec, g)
            live = (a > 0) & (b > 0)
            step = torch.ones_like(a)
            step[live] = (b[live] / a[live]).pow(0.25)
            worst = max(worst, float((a[live] - b[live]).abs().div(a[live] + b[live]).max())
                        if live.any() else 0.0)  # fmt: skip
            for site in spec.incoming[g]:  # only the touched tensors, no full copy
                cur[site.key] = _scale_site(cur[site.key], site, step)
            for site in spec.outgoing[g]:
                cur[site.key] = _scale_site(cur[site.key], site, 1.0 / step)
            total[g] = total[g] * step
        if worst < tol:
            break
    return total


def balance(state: dict[str, torch.Tensor], spec: ScalingSpec) -> dict[str, torch.Tensor]:
    """``state`` rescaled to the minimum-L2 representative of its scaling orbit (same dtypes)."""
    scales = balancing_scales(state, spec)
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
