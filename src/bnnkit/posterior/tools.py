"""Operations on whole collections: symmetry removal member by member, and MMD between two
collections in weight space or function space."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .collect import build_from
from .collection import Collection
from .mmd import MMDAggResult, mmd_agg_test
from .permutation import canonicalize, permutation_spec
from .scaling import balance, scaling_spec


def example_input(arch: dict) -> torch.Tensor:
    return torch.full((2, *arch["input_shape"]), 0.5)


def canonical_collection(src: str | Path, dst: str | Path, scaling: bool = True) -> Collection:
    """Write every member of ``src`` into ``dst`` in canonical form: the minimum-norm
    representative of its scaling orbit (ReLU-family networks; ``scaling=False`` skips it),
    then the canonical order of every permutation group. Members already in ``dst`` are kept
    (a killed run continues); the source is never modified."""
    source = Collection.open(src)
    net = build_from(source.arch).eval()
    x = example_input(source.arch)
    pspec = permutation_spec(net, x)
    sspec = scaling_spec(net, x) if scaling else None
    out = Collection.create(dst, source.arch)
    for m in source.members:
        if out.has(m.id):
            continue
        state = source.load(m.id)
        if sspec is not None:
            state = balance(state, sspec)
        state = canonicalize(state, pspec)
        info = {**m.info, "canonical": {"scaling": scaling, "permutation": True}}
        out.add(m.id, state, m.method, m.seed, info)
    return out


@torch.no_grad()
def function_vectors(col: Collection, probe: torch.Tensor) -> torch.Tensor:
    """``[members, probe images x classes]``: each member's softmax on the probe images."""
    net = build_from(col.arch).eval()
    rows = []
    for _, state in col:
        net.load_state_dict(state)
        rows.append(net(probe).softmax(-1).reshape(-1).to(torch.float64))
    return torch.stack(rows)


def compare(
    a: str | Path | Collection,
    b: str | Path | Collection,
    space: str = "weight",
    probe: torch.Tensor | None = None,
    **test_kw,
) -> MMDAggResult:
    """MMDAgg test between two collections of one architecture, on weight vectors or on
    predictive distributions over ``probe`` images (``space='function'``)."""
    ca = a if isinstance(a, Collection) else Collection.open(a)
    cb = b if isinstance(b, Collection) else Collection.open(b)
    if ca.arch != cb.arch:
        raise ConfigError(f"the collections hold different architectures: {ca.arch} vs {cb.arch}")
    if space == "weight":
        return mmd_agg_test(ca.vectors(), cb.vectors(), **test_kw)
    if space == "function":
        if probe is None:
            raise ConfigError("function-space MMD needs probe images")
        return mmd_agg_test(function_vectors(ca, probe), function_vectors(cb, probe), **test_kw)
    raise ConfigError(f"unknown space {space!r}; use weight or function")
