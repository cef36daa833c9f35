"""Permutation symmetries of a network: which axes of which tensors move together when the hidden
units (features, channels) of a layer are reordered, derived from the traced graph.

A :class:`PermutationSpec` names *groups* of hidden units. A group is created by a ``Linear`` or
``Conv2d`` output and follows the tensor through operations that act per channel (activations,
dropout, pooling, BatchNorm, which moves its affine parameters and running statistics with its
channels); ``Flatten`` of a ``[C, H, W]`` map turns a channel group into one whose units span
``H*W`` consecutive features (``Axis.repeat``); adding two tensors (a residual connection) merges
their groups into one, the residual stream. The network's input and output are never permuted:
a group that reaches either, or any operation the rules do not know (``torch.cat``, attention,
a parameter used outside its module, grouped convolutions, ...), is left fixed, which is always
correct, only less symmetry removed. :func:`permutation_spec` derives the spec with
``torch.fx``; a spec can also be written by hand for untraceable models.

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

from ..errors import ConfigError, InputError

# modules and functions that act per channel: a permutation of channels commutes with them
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu,
    F.silu, F.mish, torch.tanh, torch.sigmoid, F.softplus, F.hardswish, F.hardtanh, F.dropout,
    F.dropout2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.abs, operator.neg,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "abs", "neg", "contiguous", "clone",
                        "detach", "float", "double"}  # fmt: skip
_MERGING = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub,
            operator.mul, operator.imul, torch.mul}  # fmt: skip
_MERGING_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_PARAMETER_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Axis:
    """One permuted axis of a tensor: its units belong to ``group``; each unit spans ``repeat``
    consecutive entries (a flattened ``[C, H, W]`` map: ``repeat = H*W``)."""

    group: str
    repeat: int = 1


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
                if ax >= t.dim() or t.shape[ax] != self.groups[a.group] * a.repeat:
                    raise InputError(
                        f"{key} has shape {tuple(t.shape)}; axis {ax} should hold "
                        f"{self.groups[a.group]} units x {a.repeat} of group {a.group!r}"
                    )


class _Groups:
    """Union-find over group ids; a group touching the input, the output or an unknown op is
    fixed (never permuted)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.size: list[int | None] = []
        self.name: list[str] = []

    def new(self, name: str, size: int | None, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(fixed)
        self.size.append(size)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if b < a:
            a, b = b, a
        self.parent[b] = a  # the earlier group names the merged one
        self.fixed[a] = self.fixed[a] or self.fixed[b]
        if self.size[a] is not None and self.size[b] is not None and self.size[a] != self.size[b]:
            self.fixed[a] = True  # cannot happen in a valid graph; stay safe
        self.size[a] = self.size[a] if self.size[a] is not None else self.size[b]
        return a

    def fix(self, g: int) -> None:
        self.fixed[self.find(g)] = True

    def fix_output(self, val: dict, node) -> None:
        """``node``'s output is tracked by a new fixed group."""
        val[node] = (self.new(node.name, None, fixed=True), 1)

    def fix_inputs(self, val: dict, node) -> None:
        """Every tracked input of ``node`` (an op the rules do not know) is fixed."""
        for a in node.all_input_nodes:
            if a in val:
                self.fix(val[a][0])


def node_shape(node) -> tuple | None:
    """The traced output shape of an fx node (None for non-tensors)."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def traced(model: nn.Module, example_input: torch.Tensor, spec_name: str):
    """``model`` traced by ``torch.fx`` with tensor shapes recorded on ``example_input`` (eval
    mode, no gradients; the model's mode is restored); a clear error if it cannot be traced."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many types; the message is what matters
        raise ConfigError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); write its {spec_name} by hand"
        ) from e
    was = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    gm.train(was)
    return gm


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Derive the permutation groups of ``model`` by tracing it with ``torch.fx`` on
    ``example_input`` (shapes are needed for ``Flatten``). Refuses, with the reason, a model
    ``torch.fx`` cannot trace: write a :class:`PermutationSpec` by hand for it."""
    import torch.fx

    gm = traced(model, example_input, "PermutationSpec")
    modules = dict(gm.named_modules())
    G = _Groups()
    val: dict = {}  # node -> (group id, repeat) for tensors whose dim 1 / last dim is tracked
    key_axes: dict[str, list[tuple[int, int, int]]] = {}  # key -> [(axis, gid, repeat)]
    producers: dict[int, list[str]] = {}
    frozen: set[str] = set()

    shape = node_shape

    def fixed_output(node):
        G.fix_output(val, node)

    def fix_inputs(node):
        G.fix_inputs(val, node)

    def merge(node, ins):
        """Elementwise ops of several tensors (a residual add): their groups become one."""
        tracked = [v for v in ins if v is not None]
        if not tracked:  # arithmetic on sizes or other non-tensors
            return
        if len({v[1] for v in tracked}) > 1:
            fix_inputs(node)
            fixed_output(node)
            return
        gid = tracked[0][0]
        for v in tracked[1:]:
            gid = G.union(gid, v[0])
        val[node] = (gid, tracked[0][1])

    def mark(key, axis, gid, repeat=1):
        key_axes.setdefault(key, []).append((axis, gid, repeat))

    for node in gm.graph.nodes:
        ins = [val.get(a) for a in node.all_input_nodes]
        first = val.get(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) \
            else None  # fmt: skip
        if node.op == "placeholder":
            fixed_output(node)
        elif node.op == "output":
            fix_inputs(node)
        elif node.op == "get_attr":
            # a parameter or buffer used by a function, not (only) by its module: it cannot be
            # permuted along any axis, so every group on its axes is fixed at the end; whatever
            # consumes it is an unknown op (fixed below)
            frozen.add(node.target)
            fixed_output(node)
        elif node.op == "call_module":
            mod = modules[node.target]
            prefix = node.target + "." if node.target else ""
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                groups_ok = getattr(mod, "groups", 1) == 1
                out_size = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
                gid = G.new(node.target, out_size, fixed=not groups_ok)
                if first is not None:
                    if groups_ok:
                        mark(prefix + "weight", 1, first[0], first[1])
                    else:
                        G.fix(first[0])
                mark(prefix + "weight", 0, gid)
                if mod.bias is not None:
                    mark(prefix + "bias", 0, gid)
                producers.setdefault(gid, []).extend(
                    [prefix + "weight"] + ([prefix + "bias"] if mod.bias is not None else [])
                )
                val[node] = (gid, 1)
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if first is None:
                    fixed_output(node)
                    continue
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(mod, name, None) is not None:
                        mark(prefix + name, 0, first[0], first[1])
                val[node] = first
            elif isinstance(mod, _ELEMENTWISE_MODULES) and first is not None:
                if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:
                    mark(prefix + "weight", 0, first[0], first[1])
                val[node] = first
            elif isinstance(mod, nn.Flatten) and first is not None:
                val[node] = _flatten(G, first, shape(node.args[0]), mod.start_dim, mod.end_dim)
            else:
                fix_inputs(node)
                fixed_output(node)
                for k, _ in mod.named_parameters(prefix=node.target):
                    mark(k, -1, G.new(k, None, fixed=True))
        elif node.op == "call_function":
            fn = node.target
            if fn in _ELEMENTWISE_FUNCTIONS and first is not None:
                val[node] = first
            elif fn in _MERGING:
                merge(node, ins)
            elif fn is torch.flatten and first is not None:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                val[node] = _flatten(G, first, shape(node.args[0]), start, end)
            elif fn is operator.getitem and first is None:
                continue  # indexing a shape tuple or similar: no tensor to track
            else:
                fix_inputs(node)
                if shape(node) is not None:
                    fixed_output(node)
        elif node.op == "call_method":
            m = node.target
            if m in _ELEMENTWISE_METHODS and first is not None:
                val[node] = first
            elif m in _MERGING_METHODS:
                merge(node, ins)
            elif m in ("view", "reshape", "flatten") and first is not None:
                src, dst = shape(node.args[0]), shape(node)
                if m == "flatten":
                    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                    val[node] = _flatten(G, first, src, start, -1)
                elif src is not None and dst is not None and len(dst) == 2 and dst[0] == src[0]:
                    val[node] = _flatten(G, first, src, 1, -1)
                elif src == dst:
                    val[node] = first
                else:
                    fix_inputs(node)
                    fixed_output(node)
            elif m == "size" or m == "dim":
                continue
            elif m == "mean" and first is not None and _reduces_spatial_only(node):
                val[node] = first
            else:
                fix_inputs(node)
                if shape(node) is not None:
                    fixed_output(node)

    for key in frozen:
        for _, gid, _ in key_axes.get(key, []):
            G.fix(gid)
    # assemble: roots that are not fixed, in order of creation (topological)
    roots = {}
    for gid in range(len(G.parent)):
        r = G.find(gid)
        if not G.fixed[r] and G.size[r] is not None and r not in roots:
            roots[r] = G.name[r]
    axes: dict[str, dict[int, Axis]] = {}
    for key, entries in key_axes.items():
        for axis, gid, repeat in entries:
            r = G.find(gid)
            if axis < 0 or r not in roots:
                continue
            prev = axes.setdefault(key, {}).get(axis)
            new = Axis(roots[r], repeat)
            if prev is not None and prev != new:  # a module applied twice with other groups
                raise ConfigError(
                    f"{key} is used with two different permutation groups ({prev.group}, "
                    f"{new.group}); write the PermutationSpec by hand"
                )
            axes[key][axis] = new
    # a key some use of which is fixed must not be permuted on that axis
    for key, entries in key_axes.items():
        for axis, gid, _ in entries:
            if axis >= 0 and G.find(gid) not in roots and key in axes:
                axes[key].pop(axis, None)
    axes = {k: v for k, v in axes.items() if v}
    prods = {roots[G.find(g)]: [] for g in producers if G.find(g) in roots}
    for g, keys in producers.items():
        if G.find(g) in roots:
            prods[roots[G.find(g)]].extend(keys)
    groups = {name: G.size[r] for r, name in roots.items()}
    return PermutationSpec(groups, axes, prods)


def _flatten(G: _Groups, first, src_shape, start, end):
    gid, repeat = first
    if src_shape is None:
        G.fix(gid)
        return (G.new("flatten", None, fixed=True), 1)
    nd = len(src_shape)
    start, end = start % nd, end % nd
    if start == end:
        return first
    if start != 1 or end != nd - 1:
        G.fix(gid)
        return (G.new("flatten", None, fixed=True), 1)
    spatial = 1
    for d in src_shape[2:]:
        spatial *= d
    return (gid, repeat * spatial)


def _reduces_spatial_only(node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    meta = node.args[0].meta.get("tensor_meta")
    nd = len(meta.shape) if meta is not None else 4
    return all(d % nd >= 2 for d in dims)


# ---------------------------------------------------------------------- applying permutations


def _permute_axis(t: torch.Tensor, axis: int, perm: torch.Tensor, repeat: int) -> torch.Tensor:
    if repeat == 1:
        return t.index_select(axis, perm)
    shape = t.shape
    v = t.reshape(*shape[:axis], len(perm), repeat, *shape[axis + 1 :])
    return v.index_select(axis, perm).reshape(shape)


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
                t = _permute_axis(t, axis, perms[a.group].to(t.device), a.repeat)
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


def _unit_rows(t: torch.Tensor, axis: int, repeat: int) -> torch.Tensor:
    """``[units, rest]``: the entries of each unit of ``axis`` of ``t``."""
    return t.movedim(axis, 0).reshape(t.shape[axis] // repeat, -1)


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
                    t = _symmetrise(t, ax, a.repeat, ties[a.group])
                exact.append(_unit_rows(t, 0, axes[0].repeat))
            else:
                unordered.append(torch.sort(_unit_rows(t, 0, axes[0].repeat), dim=1).values)
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
    """``[units, entries]`` blocks of the weights that read group ``g`` (a unit's entries are
    contiguous along the axis, ``repeat`` of them per unit)."""
    n = spec.groups[g]
    return [cur[key].movedim(ax, 0).reshape(n, -1)
            for key, axes in spec.axes.items() for ax, a in axes.items()
            if ax != 0 and a.group == g]  # fmt: skip


def _symmetrise(t: torch.Tensor, axis: int, repeat: int, blocks: list[torch.Tensor]):
    """``t`` with the units of each tied block along ``axis`` replaced by their values sorted
    across the block (per remaining coordinate): invariant to the order within each tie."""
    if not blocks:
        return t
    shape = t.shape
    n = shape[axis] // repeat
    v = t.reshape(*shape[:axis], n, repeat, *shape[axis + 1 :]).clone()
    for b in blocks:
        sub = v.index_select(axis, b)
        v.index_copy_(axis, b, torch.sort(sub, dim=axis).values)
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
                        A = ref[key].movedim(ax, 0).reshape(n, -1)
                        B = others[key].movedim(ax, 0).reshape(n, -1)
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
