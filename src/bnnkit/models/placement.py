"""Placement-aware inference: the deterministic prefix runs once per input.

A network whose stochastic layers (ensemble members, MC dropout, variational weights, rank-1
factors) sit late computes the same prefix for every member and sample. The body is traced with
``torch.fx`` (stochastic layers are leaves) and its graph split in two: the *prefix* holds every
node that does not depend on a stochastic layer, the *tail* the rest. At prediction the prefix
runs once on the ``[B, ...]`` batch; each prefix value the tail reads (the activations entering
the first stochastic layer, and any skip connection that bypasses it, e.g. the identity of a
residual block whose first convolution is stochastic) is repeated member-major to ``[R*B, ...]``
at the boundary, and the tail runs as before. The result equals the naive computation (input
repeated at the entry) exactly, random draws included: the prefix draws none.

Only in eval mode: in training, BatchNorm's running variance is updated with the unbiased batch
variance, whose correction depends on the batch size, so the naive path is kept. A body that
``torch.fx`` cannot trace (data-dependent control flow), or whose prefix hands a non-tensor or a
tensor that is not ``[B, ...]`` to the tail (e.g. ``x.size(0)`` used in a later reshape), runs
the naive way. A custom layer kind marks itself stochastic with ``bnnkit_stochastic = True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..nn.dropout import MCDropout
from ..nn.ensemble import EnsembleModule
from ..nn.variational import _Variational


def is_stochastic(module: nn.Module) -> bool:
    """A layer whose output differs between members or samples."""
    return isinstance(module, (EnsembleModule, MCDropout, _Variational)) or bool(
        getattr(module, "bnnkit_stochastic", False)
    )


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_stochastic(m) or super().is_leaf_module(m, qualname)


@dataclass
class PrefixSplit:
    """``prefix(x) -> tuple`` of boundary values; ``tail(*values) -> output``."""

    prefix: fx.GraphModule
    tail: fx.GraphModule
    n_prefix_ops: int  # call nodes in the prefix (0: nothing to save)


def split_prefix(body: nn.Module) -> PrefixSplit | None:
    """The prefix/tail split of ``body``, or None (untraceable, or no stochastic layer)."""
    try:
        graph = _Tracer().trace(body)
    except Exception:  # noqa: BLE001 - any tracing failure means: run the naive way
        return None
    modules = dict(body.named_modules())
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    # nodes that depend on the input, and nodes that depend on a stochastic layer (the tail)
    on_input, tail = set(placeholders), set()
    for n in nodes:
        ins = n.all_input_nodes
        if any(i in on_input for i in ins):
            on_input.add(n)
        stochastic_call = n.op == "call_module" and is_stochastic(modules[n.target])
        if stochastic_call or any(i in tail for i in ins):
            tail.add(n)
    if not any(n.op == "call_module" and is_stochastic(modules[n.target]) for n in nodes):
        return None
    # prefix values the tail reads and that depend on the input: the boundary
    boundary: list[fx.Node] = []
    for n in nodes:
        if n in tail or n.op == "output":
            for i in n.all_input_nodes:
                if i not in tail and i in on_input and i not in boundary:
                    boundary.append(i)
    prefix_graph, env = fx.Graph(), {}
    for n in nodes:
        if n in tail or n.op == "output":
            continue
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(tuple(env[b] for b in boundary))
    # the tail: boundary placeholders, the tail nodes, and copies of the input-independent
    # nodes (attributes, constants) it reads; what it does not read is dropped
    tail_graph, tenv = fx.Graph(), {}
    for k, b in enumerate(boundary):
        tenv[b] = tail_graph.placeholder(f"boundary_{k}")
    for n in nodes:
        if n in tenv or n.op == "placeholder":
            continue
        if n in tail or n.op == "output" or n not in on_input:
            tenv[n] = tail_graph.node_copy(n, lambda a: tenv[a])
    calls = ("call_module", "call_function", "call_method")
    n_ops = sum(n.op in calls for n in prefix_graph.nodes)
    return PrefixSplit(fx.GraphModule(body, prefix_graph), fx.GraphModule(body, tail_graph), n_ops)


def run_prefix(split: PrefixSplit, x: torch.Tensor) -> list[torch.Tensor] | None:
    """Boundary values for ``x``, or None when they cannot be repeated (not all ``[B, ...]``
    tensors): the caller then runs the naive way."""
    values = split.prefix(x)
    B = x.shape[0]
    if not all(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B for v in values):
        return None
    return list(values)
