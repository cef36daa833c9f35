"""MMD: the statistic against brute force; MMDAgg's permutation test holds its level under the
null (binomial slack over 200 repetitions) and has power under a clear shift."""

import math

import pytest
import torch

from bnnkit import InputError
from bnnkit.posterior.mmd import _permuted_statistics, kernels, mmd2, mmd_agg_test


def _brute_mmd2(x, y, k):
    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


@pytest.mark.parametrize("kernel", ["gaussian", "laplace"])
def test_unbiased_mmd_equals_brute_force(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64) + 0.5
    l = 1.3
    if kernel == "gaussian":

        def k(a, b):
            return math.exp(-float(((a - b) ** 2).sum()) / l**2)
    else:

        def k(a, b):
            return math.exp(-float((a - b).abs().sum()) / l)

    assert mmd2(x, y, kernel, l) == pytest.approx(_brute_mmd2(x, y, k), rel=1e-12, abs=1e-14)


def test_permutation_statistic_is_the_signed_quadratic_form():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(10, 2, generator=g, dtype=torch.float64)
    k, _ = kernels(z, 3)
    perm = torch.randperm(10, generator=g)
    got = _permuted_statistics(k, 4, torch.stack([torch.arange(10), perm]))
    for row, p in enumerate([torch.arange(10), perm]):
        v = torch.empty(10, dtype=torch.float64)
        v[p[:4]], v[p[4:]] = 1 / 4, -1 / 6
        for j in range(len(k)):
            brute = sum(v[a] * v[b] * k[j, a, b] for a in range(10) for b in range(10) if a != b)
            assert float(got[row, j]) == pytest.approx(float(brute), rel=1e-12, abs=1e-15)


def test_level_under_the_null_and_power_under_a_shift():
    alpha, reps = 0.05, 200
    g = torch.Generator().manual_seed(2)
    rejected = 0
    for r in range(reps):
        x = torch.randn(20, 3, generator=g, dtype=torch.float64)
        y = torch.randn(20, 3, generator=g, dtype=torch.float64)
        rejected += mmd_agg_test(x, y, alpha, n_bandwidths=3, b1=400, b2=400, seed=r).reject
    slack = 3 * math.sqrt(alpha * (1 - alpha) / reps)
    assert rejected / reps <= alpha + slack  # a level-alpha test (never anti-conservative)
    assert rejected / reps >= 0.005  # and not degenerate
    power = 0
    for r in range(20):
        x = torch.randn(20, 3, generator=g, dtype=torch.float64)
        y = torch.randn(20, 3, generator=g, dtype=torch.float64) + 1.0
        power += mmd_agg_test(x, y, alpha, n_bandwidths=3, b1=400, b2=400, seed=r).reject
    assert power >= 19


def test_bad_samples_are_refused():
    x = torch.randn(5, 3)
    with pytest.raises(InputError, match=r"\[n, d\] and \[m, d\]"):
        mmd2(x, torch.randn(5, 4))
    with pytest.raises(InputError, match="NaN"):
        mmd2(x, torch.full((5, 3), float("nan")))
    with pytest.raises(InputError, match="at least 2"):
        mmd2(x[:1], x)
    with pytest.raises(InputError, match="alpha"):
        mmd_agg_test(x, x, alpha=1.5)
