"""Maximum mean discrepancy between two sets of samples (networks as weight vectors, or their
predictions on a probe set), with the aggregated multi-bandwidth test of MMDAgg (Schrab et al.,
JMLR 2023).

- :func:`mmd2` is the unbiased U-statistic for one kernel (it can be negative: it estimates a
  non-negative quantity without bias).
- Kernels: Gaussian ``exp(-||x-y||_2^2 / l^2)`` and Laplace ``exp(-||x-y||_1 / l)`` over a
  geometric grid of bandwidths spanning the inter-sample distances of the pooled samples (from
  half the 5% quantile to twice the largest), as MMDAgg builds its collection.
- :func:`mmd_agg_test` aggregates them: per kernel a permutation statistic, per kernel a level
  ``u * w_k`` with ``u`` the largest value whose family-wise rejection rate under permutations
  stays at ``alpha`` (estimated on a second, independent set of permutations), and the null is
  rejected if any kernel's statistic exceeds its adjusted quantile. Uniform weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


def _check(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise InputError(f"samples must be [n, d] and [m, d], got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}; flatten each sample to one row")  # fmt: skip
    if len(x) < 2 or len(y) < 2:
        raise InputError("each set needs at least 2 samples for the unbiased MMD")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise InputError("samples hold NaN or inf")
    return x.to(torch.float64), y.to(torch.float64)


def pairwise(z: torch.Tensor, p: int) -> torch.Tensor:
    """Pairwise L1 (``p=1``) or squared-L2 (``p=2``) distances of the rows of ``z``."""
    if p == 2:
        sq = (z * z).sum(1)
        return (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min_(0.0)
    return torch.cdist(z, z, p=1)


def bandwidths(dist: torch.Tensor, n: int = 10, squared: bool = False) -> torch.Tensor:
    """A geometric grid of ``n`` bandwidths spanning the off-diagonal entries of ``dist``."""
    d = dist[~torch.eye(len(dist), dtype=torch.bool)]
    d = d.sqrt() if squared else d
    d = d[d > 0]
    if len(d) == 0:
        return torch.ones(n, dtype=torch.float64)
    lo = torch.quantile(d, 0.05) / 2
    hi = d.max() * 2
    return torch.exp(torch.linspace(float(lo.log()), float(hi.log()), n, dtype=torch.float64))


def kernels(z: torch.Tensor, n_bandwidths: int = 10) -> tuple[torch.Tensor, list[str]]:
    """``[K, N, N]`` kernel matrices of the pooled samples (Gaussian then Laplace, each over its
    bandwidth grid) and their names."""
    d2, d1 = pairwise(z, 2), pairwise(z, 1)
    mats, names = [], []
    for l in bandwidths(d2, n_bandwidths, squared=True):
        mats.append(torch.exp(-d2 / l**2))
        names.append(f"gaussian l={float(l):.3g}")
    for l in bandwidths(d1, n_bandwidths):
        mats.append(torch.exp(-d1 / l))
        names.append(f"laplace l={float(l):.3g}")
    return torch.stack(mats), names


def mmd2(x: torch.Tensor, y: torch.Tensor, kernel: str = "gaussian", bandwidth: float = 1.0):
    """The unbiased estimate of MMD^2 between the rows of ``x`` and ``y`` for one kernel."""
    x, y = _check(x, y)
    z = torch.cat([x, y])
    if kernel == "gaussian":
        k = torch.exp(-pairwise(z, 2) / bandwidth**2)
    elif kernel == "laplace":
        k = torch.exp(-pairwise(z, 1) / bandwidth)
    else:
        raise InputError(f"unknown kernel {kernel!r}; use gaussian or laplace")
    return float(_u_statistic(k, len(x)))


def _u_statistic(k: torch.Tensor, n: int) -> torch.Tensor:
    m = k.shape[-1] - n
    kxx, kyy, kxy = k[..., :n, :n], k[..., n:, n:], k[..., :n, n:]
    sxx = (kxx.sum((-1, -2)) - kxx.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    syy = (kyy.sum((-1, -2)) - kyy.diagonal(dim1=-2, dim2=-1).sum(-1)) / (m * (m - 1))
    return sxx + syy - 2 * kxy.sum((-1, -2)) / (n * m)


def _permuted_statistics(k: torch.Tensor, n: int, perms: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: the statistic ``v^T K v`` (zero diagonal) with signs ``v`` = +1/n on the
    first ``n`` pooled indices and -1/m on the rest, after each permutation of the pool; the
    first row of ``perms`` is the identity (the observed statistic)."""
    N = k.shape[-1]
    m = N - n
    base = torch.cat(
        [torch.full((n,), 1.0 / n, dtype=k.dtype), torch.full((m,), -1.0 / m, dtype=k.dtype)]
    )
    v = torch.empty(perms.shape, dtype=k.dtype)
    v.scatter_(1, perms, base.expand_as(v))  # v[b, perm[b, i]] = base[i]
    k0 = k - torch.diag_embed(k.diagonal(dim1=-2, dim2=-1))
    kv = torch.einsum("kij,bj->bki", k0, v)
    return torch.einsum("bki,bi->bk", kv, v)


@dataclass
class MMDAggResult:
    reject: bool
    alpha: float
    statistics: dict[str, float]  # the unbiased MMD^2 per kernel
    adjusted_level: float  # u: kernel k is tested at level u * w_k
    p_values: dict[str, float]  # single-kernel permutation p-values, for reading only


def mmd_agg_test(
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float = 0.05,
    n_bandwidths: int = 10,
    b1: int = 2000,
    b2: int = 2000,
    bisection_steps: int = 30,
    seed: int = 0,
) -> MMDAggResult:
    """MMDAgg's permutation test of ``x`` and ``y`` coming from one distribution."""
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")
    x, y = _check(x, y)
    n, m = len(x), len(y)
    z = torch.cat([x, y])
    k, names = kernels(z, n_bandwidths)
    g = torch.Generator().manual_seed(seed)
    N = n + m
    perms = torch.stack([torch.arange(N)] + [torch.randperm(N, generator=g)
                                            for _ in range(b1 + b2)])  # fmt: skip
    stats = _permuted_statistics(k, n, perms)  # [1 + b1 + b2, K]
    observed, null1, null2 = stats[0], stats[1 : 1 + b1], stats[1 + b1 :]
    K = len(names)
    w = torch.full((K,), 1.0 / K, dtype=torch.float64)
    sorted1 = torch.sort(torch.cat([null1, observed[None]]), dim=0).values  # MMDAgg keeps it

    def quantiles(u: float) -> torch.Tensor:
        level = (u * w).clamp(max=1.0)
        idx = torch.ceil((b1 + 1) * (1 - level)).long().clamp(1, b1 + 1) - 1
        return sorted1[idx, torch.arange(K)]

    lo, hi = 0.0, float(1.0 / w.max())
    for _ in range(bisection_steps):
        u = (lo + hi) / 2
        rate = float((null2 > quantiles(u)).any(1).double().mean())
        lo, hi = (u, hi) if rate <= alpha else (lo, u)
    q = quantiles(lo)
    reject = bool((observed > q).any())
    unbiased = _u_statistic(k, n)
    pv = ((null1 >= observed).sum(0) + 1).double() / (b1 + 1)
    return MMDAggResult(
        reject,
        alpha,
        {nm: float(v) for nm, v in zip(names, unbiased)},
        lo,
        {nm: float(p) for nm, p in zip(names, pv)},
    )
