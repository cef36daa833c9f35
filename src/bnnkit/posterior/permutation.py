"""Permutation symmetries of a network: which axes of which tensors move together when the hidden
units (features, channels) of a layer are reordered, derived from the traced graph.

A :class:`PermutationSpec` names *groups* of hidden units. A group is created by a ``Linear``
(units on its output's last axis: features of ``[B, D]``, or of every token of ``[B, T, D]``) or
a convolution (channels) and follows the tensor through the ops that are proven equivariant on
the axis its units sit on (:mod:`.graph` walks the graph, the table below holds the rules):
elementwise activations, dropout and softmax on any axis; pooling over other axes; BatchNorm,
LayerNorm and PReLU, whose per-unit parameters and statistics move with the units when they act
on the units' axis (and stay when they act on another); reductions over other axes, or over the
units' axis (a symmetric function of them: the group is complete there); reshapes, flattens and
transposes, which the units follow wherever they land (``flatten(1)`` of a ``[C, H, W]`` map: each
channel spans ``H*W`` consecutive features, ``Axis.repeat``; of tokens ``[T, D]`` with units on
``D``: ``T`` blocks of ``D`` units, ``Axis.outer``); and elementwise arithmetic, where the groups
of the tracked operands become one (a residual stream) and any other operand must be the same for
every unit. The network's input and output are never permuted; a group that reaches any other op
(``torch.cat``, attention, indexing, a weight used outside its module, grouped convolutions, an
op on another axis than the rules allow...) is left fixed, which is always correct, only less
symmetry removed, with a one-time :class:`~.graph.SymmetryWarning` naming the op.
:func:`permutation_spec` derives the spec with ``torch.fx``; a spec can also be written by hand
for untraceable models.

Functions take and return state dicts (never the caller's model): :func:`permute` applies one
permutation per group, :func:`random_permutation` draws them, :func:`canonical_permutation`
returns the permutation that sorts every group into a canonical order, and
:func:`canonicalize` applies it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from . import graph
from .graph import node_shape, traced, unit_rows  # noqa: F401 - node_shape, traced: re-exported


@dataclass(frozen=True)
class Axis:
    """One permuted axis of a tensor: it holds ``outer`` blocks of the units of ``group``, each
    unit spanning ``repeat`` consecutive entries (a flattened ``[C, H, W]`` map: ``repeat = H*W``;
    flattened tokens ``[T, D]`` with units on ``D``: ``outer = T``)."""

    group: str
    repeat: int = 1
    outer: int = 1


@dataclass
class PermutationSpec:
    """``groups``: group name -> number of units, in topological order (inputs first);
    ``axes``: state-dict key -> {axis: Axis}; ``producers``: group -> keys whose axis 0 is the
    group and that hold a unit's *incoming* weights (Linear / Conv weight and bias)."""

    groups: dict[str, int]
    axes: dict[str, dict[int, Axis]]
    producers: dict[str, list[str]] = field(default_factory=dict)

    def check(self, state: dict[str, torch.Tensor]) -> None:
        for key, axes in self.axes.items():
            if key not in state:
                raise InputError(f"the permutation spec names {key!r}, which the state lacks")
            t = state[key]
            for ax, a in axes.items():
                if ax >= t.dim() or t.shape[ax] != self.groups[a.group] * a.repeat * a.outer:
                    raise InputError(
                        f"{key} has shape {tuple(t.shape)}; axis {ax} should hold "
                        f"{a.outer} x {self.groups[a.group]} units x {a.repeat} of group "
                        f"{a.group!r}"
                    )


# ---------------------------------------------------------------------- rules (data)


def _batchnorm(w: graph.Walk, node, mod) -> None:
    """Per-channel (axis 1) affine map with statistics over every other axis: on the channel
    axis its parameters and running statistics move with the units; on another axis it acts
    alike on every unit (statistics over that axis are symmetric in the units)."""
    t = w.unary(node)
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(mod, name, None) is not None:
            if t is not None and t.axis == 1:
                w.mark(f"{node.target}.{name}", 0, t, "with")
            else:
                w.pin(f"{node.target}.{name}", 0)
    w.keep(node, t)


def _layernorm(w: graph.Walk, node, mod) -> None:
    """Normalises the last ``k`` axes: symmetric in units there when ``k == 1`` (the affine
    parameters move with them), and acts alike on every unit of an earlier axis."""
    t, src = w.unary(node), w.shape(node.args[0])
    k = len(mod.normalized_shape)
    moves = t is not None and src is not None and k == 1 and t.axis == len(src) - 1
    for name in ("weight", "bias"):
        if getattr(mod, name, None) is not None:
            w.mark(f"{node.target}.{name}", 0, t, "with") if moves else \
                w.pin(f"{node.target}.{name}", 0)  # fmt: skip
    if t is None or moves or (src is not None and t.axis < len(src) - k):
        return w.keep(node, t)
    w.end(node, f"{graph.describe(node)} normalises the units with other axes")


def _prelu(w: graph.Walk, node, mod) -> None:
    """One slope per channel (axis 1): the slopes move with units on that axis."""
    t = w.unary(node)
    if mod.num_parameters > 1:
        if t is not None and t.axis == 1:
            w.mark(f"{node.target}.weight", 0, t, "with")
        else:
            w.pin(f"{node.target}.weight", 0)
    w.keep(node, t)


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Softmax, nn.LogSoftmax, nn.Softmin,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu,
    F.gelu, F.silu, F.mish, F.softplus, F.hardswish, F.hardsigmoid, F.hardtanh, F.softsign,
    F.logsigmoid, F.softmax, F.log_softmax, F.tanh, F.sigmoid, torch.tanh, torch.sigmoid,
    torch.softmax, torch.log_softmax, torch.abs, torch.neg, operator.neg, operator.pos, torch.exp,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
)  # fmt: skip
_ELEMENTWISE_METHODS = (
    "relu", "relu_", "sigmoid", "tanh", "abs", "neg", "exp", "softmax", "log_softmax", "clone",
    "detach", "float", "double", "half", "to",
)  # fmt: skip
_ARITHMETIC_FUNCTIONS = (
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul,
    torch.div, torch.pow,
)  # fmt: skip
_ARITHMETIC_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow")
_REDUCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin)

RULES = graph.Rules(
    name="permutation_spec",
    modules=[
        ((nn.Linear,), graph.linear),
        (graph.CONVS, graph.conv),
        (graph.BATCHNORMS, _batchnorm),
        ((nn.LayerNorm,), _layernorm),
        ((nn.PReLU,), _prelu),
        (_ELEMENTWISE_MODULES, graph.elementwise),
        *[(types, graph.pooling(k)) for types, k in graph.POOLS],
        ((nn.Flatten, nn.Unflatten), graph.reshape),
    ],
    functions={f: graph.elementwise for f in _ELEMENTWISE_FUNCTIONS}
    | {f: graph.merge_equivariant for f in _ARITHMETIC_FUNCTIONS}
    | {f: graph.reduction("invariant") for f in _REDUCTIONS}
    | graph.pooling_functions()
    | graph.structural_functions(),
    methods={m: graph.elementwise for m in _ELEMENTWISE_METHODS}
    | {m: graph.merge_equivariant for m in _ARITHMETIC_METHODS}
    | {m: graph.reduction("invariant") for m in ("mean", "sum", "amax", "amin")}
    | graph.structural_methods(),
)


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Derive the permutation groups of ``model`` by tracing it with ``torch.fx`` on
    ``example_input`` (shapes tell where the units sit). Refuses, with the reason, a model
    ``torch.fx`` cannot trace: write a :class:`PermutationSpec` by hand for it."""
    gm = traced(model, example_input, "PermutationSpec")
    walked = graph.walk(model, gm, RULES)
    axes: dict[str, dict[int, Axis]] = {}
    producers: dict[str, list[str]] = {}
    for name, m in walked.marks:
        axes.setdefault(m.key, {})[m.axis] = Axis(name, m.repeat, m.outer)
        if m.role == "in" and m.key not in producers.get(name, []):
            producers.setdefault(name, []).append(m.key)
    return PermutationSpec(walked.groups, axes, producers)


# ---------------------------------------------------------------------- applying permutations


def _permute_axis(t: torch.Tensor, axis: int, perm: torch.Tensor, a: Axis) -> torch.Tensor:
    if a.repeat == 1 and a.outer == 1:
        return t.index_select(axis, perm)
    shape = t.shape
    v = t.reshape(*shape[:axis], a.outer, len(perm), a.repeat, *shape[axis + 1 :])
    return v.index_select(axis + 1, perm).reshape(shape)


def permute(
    state: dict[str, torch.Tensor], spec: PermutationSpec, perms: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict with every group's units reordered: unit ``i`` of group ``g`` in the
    result is unit ``perms[g][i]`` of the input (groups absent from ``perms`` stay)."""
    for g, p in perms.items():
        if g not in spec.groups:
            raise InputError(f"unknown permutation group {g!r}; the spec has {list(spec.groups)}")
        n = spec.groups[g]
        if p.shape != (n,) or not torch.equal(torch.sort(p).values, torch.arange(n)):
            raise InputError(f"the permutation of group {g!r} must reorder 0..{n - 1}")
    spec.check(state)
    out = {}
    for key, t in state.items():
        for axis, a in spec.axes.get(key, {}).items():
            if a.group in perms:
                t = _permute_axis(t, axis, perms[a.group].to(t.device), a)
        out[key] = t.clone() if t is state[key] else t  # never shares the caller's storage
    return out


def random_permutation(
    spec: PermutationSpec, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    return {g: torch.randperm(n, generator=generator) for g, n in spec.groups.items()}


def compose(outer: dict[str, torch.Tensor], inner: dict[str, torch.Tensor]):
    """The permutation applying ``inner`` then ``outer``: ``permute(permute(s, inner), outer)
    == permute(s, compose(outer, inner))``."""
    return {g: inner[g][outer[g]] if g in inner else outer[g] for g in outer} | {
        g: p for g, p in inner.items() if g not in outer
    }


def invert(perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {g: torch.argsort(p) for g, p in perms.items()}


# ---------------------------------------------------------------------- canonical order


def _unit_rows(t: torch.Tensor, axis: int, a: Axis) -> torch.Tensor:
    """``[units, rest]``: the entries of each unit of ``axis`` of ``t``."""
    return unit_rows(t, axis, t.shape[axis] // (a.repeat * a.outer), a.repeat, a.outer)


def canonical_permutation(
    state: dict[str, torch.Tensor], spec: PermutationSpec
) -> dict[str, torch.Tensor]:
    """The permutation that puts every group into canonical order.

    Forward pass, groups in order from the input side: a unit's key is its incoming weights and
    bias (rows of its producers, over the already canonical order of their inputs; producers fed
    by groups not yet ordered, as in a residual stream, contribute their row's sorted values),
    its BatchNorm parameters and statistics, then the sorted values of its outgoing weights.
    Units are sorted by the L2 norm of the key, then by the key lexicographically. Units whose
    keys are equal in every entry are *tied*: their mutual order is arbitrary so far, and later
    groups read their entries symmetrised (sorted within the tie), so no later order depends
    on it. Backward pass, groups in reverse order: each tie is ordered by the units' outgoing
    weights, now over the final order of the groups they feed. What is still tied then is an
    exact duplicate (same incoming and outgoing weights), whose order changes nothing. The
    result is invariant to any permutation of the input network."""
    spec.check(state)
    cur = {k: v.detach().to(torch.float64) for k, v in state.items()}
    ties: dict[str, list[torch.Tensor]] = {}
    result: dict[str, torch.Tensor] = {}
    for g in spec.groups:
        exact, unordered = [], []
        for key, axes in spec.axes.items():
            if 0 not in axes or axes[0].group != g:
                continue
            others = [(ax, a) for ax, a in axes.items() if ax != 0]
            t = cur[key]
            if all(a.group in ties for _, a in others):
                for ax, a in others:
                    t = _symmetrise(t, ax, a, ties[a.group])
                exact.append(_unit_rows(t, 0, axes[0]))
            else:
                unordered.append(torch.sort(_unit_rows(t, 0, axes[0]), dim=1).values)
        outgoing = [torch.sort(t, dim=1).values for t in _outgoing(cur, spec, g)]
        key_mat = torch.cat(exact + unordered + outgoing, dim=1)
        key_mat = torch.cat([key_mat.norm(dim=1, keepdim=True), key_mat], dim=1)
        order = _lexsort(key_mat)
        ties[g] = _equal_runs(key_mat[order])
        result[g] = order
        cur = permute(cur, spec, {g: order})
    for g in reversed(list(spec.groups)):
        cols = _outgoing(cur, spec, g)
        if not ties[g] or not cols:
            continue
        out = torch.cat(cols, dim=1)
        fix = torch.arange(spec.groups[g])
        for block in ties[g]:
            fix[block] = block[_lexsort(out[block])]
        result[g] = result[g][fix]
        cur = permute(cur, spec, {g: fix})
    return result


def _outgoing(cur, spec: PermutationSpec, g: str) -> list[torch.Tensor]:
    """``[units, entries]`` blocks of the weights that read group ``g`` (every entry of a unit
    along the axis: ``outer`` blocks of ``repeat``)."""
    n = spec.groups[g]
    return [unit_rows(cur[key], ax, n, a.repeat, a.outer)
            for key, axes in spec.axes.items() for ax, a in axes.items()
            if ax != 0 and a.group == g]  # fmt: skip


def _symmetrise(t: torch.Tensor, axis: int, a: Axis, blocks: list[torch.Tensor]):
    """``t`` with the units of each tied block along ``axis`` replaced by their values sorted
    across the block (per remaining coordinate): invariant to the order within each tie."""
    if not blocks:
        return t
    shape = t.shape
    n = shape[axis] // (a.repeat * a.outer)
    v = t.reshape(*shape[:axis], a.outer, n, a.repeat, *shape[axis + 1 :]).clone()
    for b in blocks:
        sub = v.index_select(axis + 1, b)
        v.index_copy_(axis + 1, b, torch.sort(sub, dim=axis + 1).values)
    return v.reshape(shape)


def _equal_runs(sorted_keys: torch.Tensor) -> list[torch.Tensor]:
    """Runs of at least two consecutive equal rows: positions in the sorted order."""
    same = (sorted_keys[1:] == sorted_keys[:-1]).all(1).tolist()
    runs, start = [], 0
    for i, eq in enumerate([*same, False]):
        if not eq:
            if i > start:
                runs.append(torch.arange(start, i + 1))
            start = i + 1
    return runs


def _lexsort(m: torch.Tensor) -> torch.Tensor:
    """Row order sorting ``m`` lexicographically by its columns (first column first)."""
    import numpy as np

    a = m.cpu().numpy()
    return torch.from_numpy(np.lexsort(a.T[::-1]).copy()).long()


def canonicalize(state: dict[str, torch.Tensor], spec: PermutationSpec):
    """``state`` with every group in canonical order (a new state dict)."""
    return permute(state, spec, canonical_permutation(state, spec))


# ---------------------------------------------------------------------- alignment


def weight_matching(
    reference: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    spec: PermutationSpec,
    max_sweeps: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The permutation of ``state`` that aligns it with ``reference`` by weight matching (Git
    Re-Basin, Ainsworth et al. 2023): maximise the summed inner product of all permuted tensors
    with the reference's, by coordinate descent over groups, each step an exact linear
    assignment with the other groups fixed, groups visited in a seeded random order, until a
    sweep changes nothing. Apply it with ``permute(state, spec, result)``."""
    from scipy.optimize import linear_sum_assignment

    spec.check(reference)
    spec.check(state)
    ref = {k: v.detach().to(torch.float64) for k, v in reference.items()}
    cur0 = {k: v.detach().to(torch.float64) for k, v in state.items()}
    perms = {g: torch.arange(n) for g, n in spec.groups.items()}
    names = list(spec.groups)
    g_rng = torch.Generator().manual_seed(seed)
    for _ in range(max_sweeps):
        changed = False
        for i in torch.randperm(len(names), generator=g_rng).tolist():
            g = names[i]
            n = spec.groups[g]
            others = permute(cur0, spec, {h: p for h, p in perms.items() if h != g})
            cost = torch.zeros(n, n, dtype=torch.float64)
            for key, axes in spec.axes.items():
                for ax, a in axes.items():
                    if a.group == g:
                        A = unit_rows(ref[key], ax, n, a.repeat, a.outer)
                        B = unit_rows(others[key], ax, n, a.repeat, a.outer)
                        cost += A @ B.T
            _, col = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(col, dtype=torch.long)
            idx = torch.arange(n)
            if cost[idx, new].sum() > cost[idx, perms[g]].sum() + 1e-12 * cost.abs().max():
                perms[g] = new
                changed = True
        if not changed:
            break
    return perms


def align(reference, state, spec: PermutationSpec, **kw) -> dict[str, torch.Tensor]:
    """``state`` permuted to match ``reference`` (a new state dict): see :func:`weight_matching`."""
    return permute(state, spec, weight_matching(reference, state, spec, **kw))
