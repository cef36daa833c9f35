"""One ``torch.fx`` walk for the symmetries of a network (unit permutations, positive per-unit
scalings); each symmetry brings its rules as a table.

A symmetry acts on the *units* of a layer: the output features of a ``Linear``, the channels of
a convolution. The walk follows every traced value and records on which axis its units sit
(:class:`Track`): the axis holds ``outer`` blocks of ``units x repeat`` entries (a ``[C, H, W]``
map flattened to ``C*H*W`` features: ``repeat = H*W``; tokens ``[T, D]`` with units on ``D``
flattened to ``T*D``: ``outer = T``). For each op that reads a tracked value the symmetry's table
gives the rule, and the rule looks at the axis: an op keeps the group only where it is proven to
commute with the symmetry on that axis (equivariant under a permutation of the axis; positively
homogeneous of degree 1 per unit for scalings). Any other op, and any op the table lacks, *ends*
the group: its units stay fixed and the weights around them are never transformed, which is
always correct, only less symmetry removed. A one-time :class:`SymmetryWarning` names the op when
that removes a group that would otherwise have been kept (not for groups that reach the network's
output or are fixed by design). Input and output values never move.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import ConfigError


class SymmetryWarning(UserWarning):
    """Part of a network's symmetry is left unused, and why."""


_WARNED: set[str] = set()


def warn_once(message: str, category: type[Warning] = SymmetryWarning) -> None:
    """Warn with ``message`` the first time it is seen in this process (called from the walk:
    the warning points at the caller of ``permutation_spec`` / ``scaling_spec``)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, category, stacklevel=6)  # the caller of the spec function


@dataclass(frozen=True)
class Track:
    """Group ``gid``'s units sit on ``axis`` of a value: ``outer`` blocks of ``units x repeat``
    consecutive entries."""

    gid: int
    axis: int
    repeat: int = 1
    outer: int = 1


@dataclass(frozen=True)
class Mark:
    """Axis ``axis`` of state-dict entry ``key`` is laid out as group ``gid``'s units (``outer``
    blocks of ``units x repeat``). ``role``: ``"in"`` a unit's own incoming weights (axis 0 of the
    layer that creates the group), ``"out"`` weights that read the units, ``"with"`` per-unit
    parameters and statistics that move with them (BatchNorm, LayerNorm, PReLU), ``"pin"`` an
    axis that a rule relies on staying put (``gid`` -1): every group marked on it too is fixed
    (a layer applied once to moving units and once to fixed ones)."""

    key: str
    axis: int
    gid: int
    role: str
    repeat: int = 1
    outer: int = 1


def unit_rows(t: torch.Tensor, axis: int, n: int, repeat: int = 1, outer: int = 1):
    """``[n, rest]``: every entry of ``t`` that belongs to each of the ``n`` units on ``axis``."""
    return t.movedim(axis, 0).reshape(outer, n, -1).transpose(0, 1).reshape(n, -1)


def unit_factor(factor: torch.Tensor, repeat: int = 1, outer: int = 1) -> torch.Tensor:
    """A per-unit ``factor`` spread over an axis laid out as ``outer x units x repeat``."""
    return factor.repeat_interleave(repeat).repeat(outer)


class Groups:
    """Union-find over groups of units. A group is *fixed* (never transformed) when it touches
    the input or the output, or when an op ends it; ``reasons`` keeps the ops that ended it and
    ``expected`` whether it is fixed anyway (output, by design), so no warning is needed."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.name: list[str] = []
        self.fixed: list[bool] = []
        self.expected: list[bool] = []
        self.reasons: list[list[str]] = []

    def new(self, name: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.name.append(name)
        self.fixed.append(False)
        self.expected.append(False)
        self.reasons.append([])
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
        self.expected[a] = self.expected[a] or self.expected[b]
        self.reasons[a] += self.reasons[b]
        if self.size[a] != self.size[b]:  # cannot happen in a valid graph; stay safe
            self.fix(a, f"groups {self.name[a]!r} and {self.name[b]!r} differ in size")
        return a

    def fix(self, g: int, reason: str | None = None) -> None:
        """Fix ``g``'s group; ``reason`` None: fixed by design (the output), no warning."""
        r = self.find(g)
        self.fixed[r] = True
        if reason is None:
            self.expected[r] = True
        elif reason not in self.reasons[r]:
            self.reasons[r].append(reason)


def node_shape(node) -> tuple | None:
    """The traced output shape of an fx node (None for non-tensors)."""
    if not isinstance(node, torch.fx.Node):
        return None
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


# ---------------------------------------------------------------------- the walk

Rule = Callable[["Walk", object, "nn.Module | None"], None]


@dataclass
class Rules:
    """One symmetry's rules: ``modules`` (a list of (module types, rule), first match wins),
    ``functions`` (callable -> rule) and ``methods`` (tensor method name -> rule). A rule is
    called as ``rule(walk, node, module)`` and either sets ``walk.val[node]`` (the group goes
    on) or ends the groups of its inputs. Ops missing from the tables end every group they read.
    """

    name: str
    modules: list[tuple[tuple[type, ...], Rule]]
    functions: dict
    methods: dict
    check: Callable[[Walk], None] | None = None  # after the walk: may refuse, with the reason


@dataclass
class Walked:
    """The groups left free (name -> units, in order from the input side) and the marks of the
    state-dict entries laid out as their units (with the group's name)."""

    groups: dict[str, int]
    marks: list[tuple[str, Mark]] = field(default_factory=list)


class Walk:
    """The state of one walk; rules read and write it through the helpers below."""

    def __init__(self, model: nn.Module, gm, rules: Rules) -> None:
        self.gm, self.rules = gm, rules
        self.modules = dict(gm.named_modules())
        self.G = Groups()
        self.val: dict = {}  # node -> Track; untracked values (absent) never move
        self.marks: list[Mark] = []
        self.frozen: dict[str, str] = {}  # key -> why none of its axes may move
        self.created: set = set()  # nodes that create a group
        self.ended: list = []  # (node, group ids) where an op ended groups
        seen: dict[int, str] = {}
        for k, p in [*model.named_parameters(remove_duplicate=False),
                     *model.named_buffers(remove_duplicate=False)]:  # fmt: skip
            if id(p) in seen:  # one tensor under two names (tied weights)
                self.frozen[k] = self.frozen[seen[id(p)]] = (
                    f"{k} shares its tensor with {seen[id(p)]}"
                )
            else:
                seen[id(p)] = k

    # -- helpers for rules
    def track(self, a) -> Track | None:
        return self.val.get(a) if isinstance(a, torch.fx.Node) else None

    def shape(self, a) -> tuple | None:
        return node_shape(a)

    def tracked_inputs(self, node) -> list[Track]:
        return [self.val[a] for a in node.all_input_nodes if a in self.val]

    def end(self, node, why: str | None = None) -> None:
        """``node`` ends the groups of its inputs; its output is not tracked."""
        why = why or f"{describe(node)} is not known to keep units on their axis"
        gids = [t.gid for t in self.tracked_inputs(node)]
        for g in gids:
            self.G.fix(g, why)
        self.ended.append((node, gids))
        self.val.pop(node, None)

    def keep(self, node, t: Track | None) -> None:
        if t is None:
            self.val.pop(node, None)
        else:
            self.val[node] = t

    def new_group(self, node, size: int, axis: int) -> int:
        name = node.target if isinstance(node.target, str) else node.name
        gid = self.G.new(name, size)
        self.val[node] = Track(gid, axis)
        self.created.add(node)
        return gid

    def mark(self, key: str, axis: int, t: Track | int, role: str) -> None:
        if isinstance(t, int):
            t = Track(t, axis)
        self.marks.append(Mark(key, axis, t.gid, role, t.repeat, t.outer))

    def pin(self, key: str, axis: int) -> None:
        """Axis ``axis`` of ``key`` must not move (see :class:`Mark`)."""
        self.marks.append(Mark(key, axis, -1, "pin"))

    def unary(self, node) -> Track | None:
        """The track of ``node``'s first argument, if no other argument is tracked (else the
        op ends every group it reads and None is returned with ``node`` untracked)."""
        first = node.args[0] if node.args else None
        others = [a for a in node.all_input_nodes if a is not first and a in self.val]
        if others:
            self.end(node)
            return None
        return self.track(first)

    # -- the walk
    def run(self) -> Walked:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                self.frozen.setdefault(node.target, f"{node.target} is used outside its module")
                continue
            if node.op == "output":
                for t in self.tracked_inputs(node):
                    self.G.fix(t.gid)
                continue
            mod = self.modules[node.target] if node.op == "call_module" else None
            rule = self._rule(node, mod)
            if rule is not None and (mod is not None or self.tracked_inputs(node)):
                rule(self, node, mod)
            elif mod is not None:  # a module the rules do not know: its weights never move
                for k, _ in mod.named_parameters(prefix=node.target):
                    self.frozen.setdefault(k, f"{describe(node)} is not known to the rules")
                self.end(node)
            elif self.tracked_inputs(node):
                self.end(node)
        return self._finish()

    def _rule(self, node, mod):
        if mod is not None:
            for types, rule in self.rules.modules:
                if isinstance(mod, types):
                    return rule
            return None
        if node.op == "call_function":
            try:
                return self.rules.functions.get(node.target)
            except TypeError:  # unhashable target
                return None
        if node.op == "call_method":
            return self.rules.methods.get(node.target)
        return None

    def _finish(self) -> Walked:
        G = self.G
        # an op that ends groups on the way to the output (a final log_softmax, a sum of heads)
        # removes nothing: those units reach the output, fixed anyway
        direct: set = set()
        for node in reversed(self.gm.graph.nodes):
            for u in node.users:
                mod = self.modules[u.target] if u.op == "call_module" else None
                if u.op == "output" or (u in direct and u not in self.created
                                        and self._rule(u, mod) is not None):  # fmt: skip
                    direct.add(node)
                    break
        for node, gids in self.ended:
            if node in direct:
                for g in gids:
                    G.fix(g)
        for key, why in self.frozen.items():
            for m in self.marks:
                if m.key == key and m.role != "pin":
                    G.fix(m.gid, why)
        # one entry read by several calls (a module applied twice): its axis must move the
        # same way for all of them, so their groups become one
        by_axis: dict[tuple[str, int], list[Mark]] = {}
        for m in self.marks:
            by_axis.setdefault((m.key, m.axis), []).append(m)
        for (key, axis), ms in by_axis.items():
            if any(m.role == "pin" for m in ms):
                for m in ms:
                    if m.role != "pin":
                        G.fix(m.gid)
                continue
            if len({(m.repeat, m.outer) for m in ms}) > 1:
                for m in ms:
                    G.fix(m.gid, f"{key} is read with two layouts of its axis {axis}")
            else:
                for m in ms[1:]:
                    G.union(ms[0].gid, m.gid)
        if self.rules.check is not None:
            self.rules.check(self)
        roots: dict[int, str] = {}
        lost: dict[str, list[str]] = {}
        taken: set[str] = set()
        for gid in range(len(G.parent)):
            r = G.find(gid)
            if r != gid:
                continue
            if not G.fixed[r]:
                name, i = G.name[r], 2
                while name in taken:
                    name, i = f"{G.name[r]}#{i}", i + 1
                taken.add(name)
                roots[r] = name
            elif G.reasons[r] and not G.expected[r]:
                lost.setdefault("; ".join(G.reasons[r]), []).append(G.name[r])
        if lost:
            warn_once(
                f"{self.rules.name} leaves units fixed, so less symmetry is removed than the "
                f"layers suggest: "
                + "; ".join(f"{', '.join(names)}: {why}" for why, names in lost.items())
                + ". If an op does keep them, write the spec by hand"
            )
        out = Walked({roots[r]: G.size[r] for r in roots})
        for m in self.marks:
            if m.role != "pin" and G.find(m.gid) in roots:
                out.marks.append((roots[G.find(m.gid)], m))
        return out


def walk(model: nn.Module, gm, rules: Rules) -> Walked:
    return Walk(model, gm, rules).run()


def describe(node) -> str:
    """The op of ``node`` as a user reads it in their model."""
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(node.target)
        return f"{type(mod).__name__} at {node.target!r}"
    if node.op == "call_method":
        return f"the method .{node.target}() ({node.name})"
    t = node.target
    name = getattr(t, "__name__", str(t))
    for prefix, space in (("F.", torch.nn.functional), ("torch.", torch), ("operator.", operator)):
        if getattr(space, name, None) is t:
            return f"{prefix}{name} ({node.name})"
    return f"{name} ({node.name})"


# ---------------------------------------------------------------------- generic rules


def _args(node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def elementwise(w: Walk, node, mod=None) -> None:
    """Acts on every entry alike (or, like softmax or a channel dropout, alike across every
    unit): commutes with the symmetry on any axis, as long as any other tensor argument is the
    same for every unit."""
    t = w.unary(node)
    if t is not None:
        first, src = node.args[0], w.shape(node.args[0])
        others = [a for a in node.all_input_nodes if a is not first]
        if src is None or not all(constant_along(w, a, t.axis - len(src)) for a in others):
            return w.end(node, f"{describe(node)} applies a tensor that differs across the units")
    w.keep(node, t)


def pooling(k: int) -> Rule:
    """Acts per channel over the last ``k`` axes: keeps units on any earlier axis."""

    def rule(w: Walk, node, mod=None) -> None:
        t, src = w.unary(node), w.shape(node.args[0])
        if t is None or src is None:
            return w.keep(node, None)
        dst = w.shape(node)
        if getattr(mod, "return_indices", False) or dst is None or t.axis >= len(src) - k:
            return w.end(node, f"{describe(node)} pools over the units' axis")
        w.keep(node, t)

    return rule


def reshape_track(t: Track, src: tuple, dst: tuple) -> Track | None:
    """Where units laid out as ``t`` on a tensor of shape ``src`` sit after a row-major reshape
    to ``dst`` (flatten, view, unflatten, squeeze...), or None if they do not make up one axis.

    Leading and trailing axes equal in both shapes keep their coordinates; the middle is one
    run of entries regrouped. The units' axis in ``dst`` is ``k`` with ``P = prod(dst_mid[:k])``
    dividing the blocks before them, ``Q = prod(dst_mid[k+1:])`` dividing the entries after, and
    ``dst_mid[k] == (before / P) * units * (after / Q)``."""
    p = 0
    while p < min(len(src), len(dst)) and src[p] == dst[p]:
        p += 1
    if t.axis < p:
        return t
    q = 0
    while q < min(len(src), len(dst)) - p and src[-1 - q] == dst[-1 - q]:
        q += 1
    if t.axis >= len(src) - q:
        return replace(t, axis=t.axis - len(src) + len(dst))
    smid, dmid = src[p : len(src) - q], dst[p : len(dst) - q]
    u = t.axis - p
    n = src[t.axis] // (t.outer * t.repeat)
    before = t.outer * math.prod(smid[:u])
    after = t.repeat * math.prod(smid[u + 1 :])
    for k, d in enumerate(dmid):
        P, Q = math.prod(dmid[:k]), math.prod(dmid[k + 1 :])
        if before % P == 0 and after % Q == 0 and d == (before // P) * n * (after // Q):
            return Track(t.gid, p + k, after // Q, before // P)
    return None


def reshape(w: Walk, node, mod=None) -> None:
    """Any op that keeps the row-major order of the entries (flatten, view, reshape, squeeze,
    unsqueeze, unflatten, contiguous): the units move to where :func:`reshape_track` puts them.
    """
    t, src, dst = w.unary(node), w.shape(node.args[0]), w.shape(node)
    if t is None:
        return w.keep(node, None)
    new = reshape_track(t, src, dst) if src is not None and dst is not None else None
    if new is None:
        return w.end(node, f"{describe(node)} spreads the units over several axes")
    w.keep(node, new)


def transpose(w: Walk, node, mod=None) -> None:
    """``transpose`` / ``permute`` / ``t`` / ``movedim``: the units follow their axis."""
    t, src = w.unary(node), w.shape(node.args[0])
    if t is None:
        return w.keep(node, None)
    if src is None:
        return w.end(node)
    nd = len(src)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    given = [*node.args[1:], *node.kwargs.values()]
    if not all(_static(g) for g in given):
        return w.end(node)
    order = list(range(nd))
    if name == "t":
        order.reverse()
    elif name in ("transpose", "swapaxes", "swapdims"):
        a, b = given[0] % nd, given[1] % nd
        order[a], order[b] = order[b], order[a]
    elif name == "permute":
        dims = given[0] if len(given) == 1 and isinstance(given[0], (list, tuple)) else given
        order = [d % nd for d in dims]
    else:  # movedim(source, destination)
        s, d = ([g] if isinstance(g, int) else list(g) for g in given[:2])
        s, d = [i % nd for i in s], [i % nd for i in d]
        order = [-1] * nd
        for i, j in zip(s, d):
            order[j] = i
        rest = iter(i for i in range(nd) if i not in s)
        order = [o if o >= 0 else next(rest) for o in order]
    w.keep(node, replace(t, axis=order.index(t.axis)))


def _static(v) -> bool:
    """``v`` is a dimension (list) known when tracing, not computed in the graph."""
    if isinstance(v, (list, tuple)):
        return all(_static(x) for x in v)
    return v is None or isinstance(v, int)


def reduce_dims(node, nd: int) -> tuple[set[int], bool]:
    """The axes a ``mean`` / ``sum`` / ``amax`` call reduces, and ``keepdim``."""
    dims = _args(node, 1, "dim")
    keep = bool(_args(node, 2, "keepdim", False))
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return set(range(nd)), keep
    dims = [dims] if isinstance(dims, int) else list(dims)
    return {d % nd for d in dims}, keep


def reduction(over_units: str) -> Rule:
    """``mean`` / ``sum`` / ``amax`` / ``amin`` (the ``dim`` form): over other axes the units stay
    (their axis shifts when dims are dropped). Over the units' axis: ``over_units="invariant"``
    (permutations: a symmetric function of the units, untouched by any reordering), or
    ``"end"`` (scalings: the units' scales mix)."""

    def rule(w: Walk, node, mod=None) -> None:
        t, src = w.unary(node), w.shape(node.args[0])
        if t is None:
            return w.keep(node, None)
        if src is None or not _static(_args(node, 1, "dim")):
            return w.end(node)
        dims, keep = reduce_dims(node, len(src))
        if t.axis in dims:
            if over_units == "invariant":
                return w.keep(node, None)
            return w.end(node, f"{describe(node)} reduces over the units' axis {t.axis}")
        axis = t.axis if keep else t.axis - sum(d < t.axis for d in dims)
        w.keep(node, replace(t, axis=axis))

    return rule


def operands(node) -> list:
    """The tensor-or-number operands of a binary op (``x + y``, ``torch.add(x, y)``,
    ``x.add(y)``)."""
    ops = list(node.args[:2])
    for k in ("input", "other"):
        if k in node.kwargs:
            ops.append(node.kwargs[k])
    return ops


def aligned(w: Walk, node) -> tuple[list[tuple[object, Track | None]], int] | None:
    """The operands with their tracks, and the units' axis counted from the end (broadcasting
    aligns trailing axes); None if the tracked operands disagree on where their units sit or an
    operand is tracked that is not an operand (then the op ends)."""
    ops = operands(node)
    if any(a not in ops for a in node.all_input_nodes if a in w.val):
        return None
    pairs = [(a, w.track(a)) for a in ops]
    layout = set()
    for a, t in pairs:
        if t is not None:
            s = w.shape(a)
            if s is None:
                return None
            layout.add((t.axis - len(s), t.repeat, t.outer, s[t.axis]))
    if len(layout) != 1:
        return None
    neg = next(iter(layout))[0]
    out = w.shape(node)
    if out is None or len(out) < -neg or out[neg] != next(iter(layout))[3]:
        return None  # the units' axis is broadcast against a larger one
    return pairs, neg


def constant_along(w: Walk, a, neg: int) -> bool:
    """Operand ``a`` (untracked) is the same for every unit: a number, or a tensor of size 1
    (or absent) on the units' axis."""
    if not isinstance(a, torch.fx.Node):
        return isinstance(a, (int, float, bool)) or a is None
    if a.meta.get("type") in (int, float, bool):  # a number computed in the graph (a size)
        return True
    s = w.shape(a)
    return s is not None and (len(s) < -neg or s[neg] == 1)


def _join(w: Walk, node, pairs, neg: int) -> None:
    ts = [t for _, t in pairs if t is not None]
    for t in ts[1:]:
        w.G.union(ts[0].gid, t.gid)
    w.keep(node, replace(ts[0], axis=len(w.shape(node)) + neg))


def merge_equivariant(w: Walk, node, mod=None) -> None:
    """Elementwise arithmetic (``+ - * / **``, residual connections): the tracked operands'
    groups become one (all must reorder alike); other operands must be the same for every unit
    (numbers, or tensors broadcast along the units' axis)."""
    got = aligned(w, node)
    if got is None:
        return w.end(node, f"{describe(node)} combines values whose units sit on other axes")
    pairs, neg = got
    if not all(t is not None or constant_along(w, a, neg) for a, t in pairs):
        return w.end(node, f"{describe(node)} adds a value that differs across the units")
    _join(w, node, pairs, neg)


def sum_homogeneous(w: Walk, node, mod=None) -> None:
    """``x + y`` / ``x - y`` is homogeneous of degree 1 only when every operand is scaled alike
    (tracked, the groups become one) or zero: a constant or an untracked tensor ends it."""
    got = aligned(w, node)
    if got is None:
        return w.end(node, f"{describe(node)} combines values whose units sit on other axes")
    pairs, neg = got
    if not all(t is not None or (not isinstance(a, torch.fx.Node) and a == 0) for a, t in pairs):
        return w.end(node, f"{describe(node)} adds a term that is not scaled with the units")
    _join(w, node, pairs, neg)


def product_homogeneous(w: Walk, node, mod=None) -> None:
    """``x * c`` (one tracked factor, the others numbers or untracked tensors): degree 1."""
    got = aligned(w, node)
    if got is None:
        return w.end(node, f"{describe(node)} combines values whose units sit on other axes")
    pairs, neg = got
    if sum(t is not None for _, t in pairs) != 1:
        return w.end(node, f"{describe(node)} multiplies two scaled values (degree 2)")
    _join(w, node, pairs, neg)


def quotient_homogeneous(w: Walk, node, mod=None) -> None:
    """``x / c`` with only the numerator tracked: degree 1."""
    got = aligned(w, node)
    if got is None or w.track(node.args[0]) is None or w.track(_args(node, 1, "other")) is not None:
        return w.end(node, f"{describe(node)} divides by a scaled value")
    _join(w, node, got[0], got[1])


def shape_query(w: Walk, node, mod=None) -> None:
    """``x.size()``, ``x.shape``, ``x.dim()``: numbers, not a tensor op."""
    if node.op == "call_function" and _args(node, 1, "name") not in SHAPE_ATTRIBUTES:
        return w.end(node)  # x.T, x.mT, ... are tensors
    w.keep(node, None)


def linear(w: Walk, node, mod) -> None:
    """A ``Linear`` reads units on its input's last axis (its weight's axis 1) and creates a
    group on its output's last axis (weight and bias axis 0)."""
    t, src, dst = w.unary(node), w.shape(node.args[0]), w.shape(node)
    p = node.target + "."
    if t is not None and src is not None and t.axis == len(src) - 1:
        w.mark(p + "weight", 1, t, "out")
    else:
        if t is not None:
            w.G.fix(t.gid, f"{describe(node)} mixes another axis than the units' one")
        w.pin(p + "weight", 1)
    if dst is None:
        return w.keep(node, None)
    gid = w.new_group(node, mod.out_features, len(dst) - 1)
    w.mark(p + "weight", 0, gid, "in")
    if mod.bias is not None:
        w.mark(p + "bias", 0, gid, "in")


def conv(w: Walk, node, mod) -> None:
    """A convolution reads and creates channels (the axis before its spatial ones); grouped
    convolutions end both."""
    t, src, dst = w.unary(node), w.shape(node.args[0]), w.shape(node)
    p = node.target + "."
    k = len(mod.kernel_size)
    grouped = mod.groups != 1
    reads = src is not None and t is not None and t.axis == len(src) - k - 1
    if reads and not grouped and t.repeat == t.outer == 1:
        w.mark(p + "weight", 1, t, "out")
    else:
        if t is not None:
            w.G.fix(
                t.gid,
                f"{describe(node)} is a grouped convolution"
                if grouped
                else f"{describe(node)} reads the units on another axis than its channels",
            )
        w.pin(p + "weight", 1)
    if dst is None:
        return w.keep(node, None)
    gid = w.new_group(node, mod.out_channels, len(dst) - k - 1)
    if grouped:
        w.G.fix(gid, f"{describe(node)} is a grouped convolution")
    w.mark(p + "weight", 0, gid, "in")
    if mod.bias is not None:
        w.mark(p + "bias", 0, gid, "in")


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
POOLS = [
    ((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d), 1),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), 2),
    ((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), 3),
]
RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                   "contiguous", "view_as", "reshape_as")  # fmt: skip
TRANSPOSE_METHODS = ("transpose", "permute", "t", "swapaxes", "swapdims", "movedim")
SHAPE_METHODS = ("size", "dim", "numel", "nelement")
SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device", "is_cuda")


def pooling_functions() -> dict:
    F = torch.nn.functional
    return {
        F.max_pool1d: pooling(1), F.avg_pool1d: pooling(1), F.adaptive_avg_pool1d: pooling(1),
        F.adaptive_max_pool1d: pooling(1), F.max_pool2d: pooling(2), F.avg_pool2d: pooling(2),
        F.adaptive_avg_pool2d: pooling(2), F.adaptive_max_pool2d: pooling(2),
        F.max_pool3d: pooling(3), F.avg_pool3d: pooling(3), F.adaptive_avg_pool3d: pooling(3),
    }  # fmt: skip


def structural_functions() -> dict:
    """Reshapes, transposes and shape queries: the same for every symmetry."""
    import builtins

    return {
        torch.flatten: reshape, torch.reshape: reshape, torch.squeeze: reshape,
        torch.unsqueeze: reshape, torch.unflatten: reshape, torch.transpose: transpose,
        torch.permute: transpose, torch.movedim: transpose, torch.swapaxes: transpose,
        builtins.getattr: shape_query,
    }  # fmt: skip


def structural_methods() -> dict:
    return ({m: reshape for m in RESHAPE_METHODS} | {m: transpose for m in TRANSPOSE_METHODS}
            | {m: shape_query for m in SHAPE_METHODS})  # fmt: skip
