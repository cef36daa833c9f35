"""Operations on whole collections: symmetry removal member by member, and MMD between two
collections in weight space or function space."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .collect import build_from
from .collection import Collection
from .mmd import MMDAggResult, mmd_agg_test
from .permutation import canonicalize
from .scaling import balance, symmetry_specs


def example_input(arch: dict) -> torch.Tensor:
    return torch.full((2, *arch["input_shape"]), 0.5)


def canonical_collection(src: str | Path, dst: str | Path, scaling: bool = True) -> Collection:
    """Write every member of ``src`` into ``dst`` in canonical form: the minimum-norm
    representative of its scaling orbit (ReLU-family networks; ``scaling=False`` skips it),
    then the canonical order of every permutation group. Members already in ``dst`` are kept
    (a killed run continues); the source is never modified."""
    source = Collection.open(src)
    pspec, sspec = symmetry_specs(build_from(source.arch).eval(), example_input(source.arch),
                                  scaling)  # fmt: skip
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
def member_probs(col: Collection, x: torch.Tensor) -> torch.Tensor:
    """``[members, inputs, classes]`` float64: each member's softmax on ``x``."""
    net = build_from(col.arch).eval()
    rows = []
    for _, state in col:
        net.load_state_dict(state)
        rows.append(net(x).softmax(-1).to(torch.float64))
    return torch.stack(rows)


def function_vectors(col: Collection, probe: torch.Tensor) -> torch.Tensor:
    """``[members, probe images x classes]``: each member's softmax on the probe images."""
    p = member_probs(col, probe)
    return p.reshape(len(p), -1)


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


def aligned_collection(src: str | Path, dst: str | Path, to: str | None = None,
                       scaling: bool = True) -> Collection:  # fmt: skip
    """Write every member of ``src`` into ``dst`` aligned with member ``to`` (default: the
    first): balanced (minimum-norm scaling representative, ReLU-family networks; ``scaling=False``
    skips it) and permuted onto the target by weight matching. The functions are unchanged;
    members already in ``dst`` are kept; the source is never modified."""
    from .permutation import align

    source = Collection.open(src)
    if not source.members:
        raise ConfigError(f"{src} holds no members")
    target_id = to if to is not None else source.members[0].id
    if not source.has(target_id):
        raise ConfigError(f"{src} has no member {target_id!r}")
    pspec, sspec = symmetry_specs(build_from(source.arch).eval(), example_input(source.arch),
                                  scaling)  # fmt: skip

    def prepare(state):
        return balance(state, sspec) if sspec is not None else state

    target = prepare(source.load(target_id))
    out = Collection.create(dst, source.arch)
    for m in source.members:
        if out.has(m.id):
            continue
        state = prepare(source.load(m.id))
        state = target if m.id == target_id else align(target, state, pspec)
        info = {**m.info, "aligned": {"to": target_id, "scaling": scaling}}
        out.add(m.id, state, m.method, m.seed, info)
    return out


def pca(fit: torch.Tensor, *others: torch.Tensor, k: int = 2):
    """Principal axes of the rows of ``fit`` (``[n, d]``) and the ``k``-dimensional coordinates
    of ``fit`` and of every tensor in ``others`` on them (centred on ``fit``'s mean); returns
    ``(coords of fit, [coords of each other], explained variance ratio [k])``."""
    if fit.dim() != 2 or len(fit) < 2:
        raise ConfigError(f"PCA needs [n >= 2, d] vectors, got {tuple(fit.shape)}")
    mean = fit.mean(0)
    _, s, vt = torch.linalg.svd(fit - mean, full_matrices=False)
    axes = vt[:k]
    ratio = (s[:k] ** 2) / (s**2).sum()
    return (fit - mean) @ axes.T, [(o - mean) @ axes.T for o in others], ratio
