"""Modes and diversity of a set of networks: loss along linear paths, loss barriers, modes as
groups of networks joined by low-barrier paths, and the pairwise mutual information of their
predictions ("functional collapse" when it vanishes).

Loss barrier between ``a`` and ``b`` (Frankle et al., 2020; Entezari et al., 2022): the largest
excess of the loss along ``(1 - t) a + t b`` over the straight line between the end losses,
``max_t L(t) - ((1 - t) L(0) + t L(1))``, over a grid of ``t``. BatchNorm's running statistics of
an interpolated network are not interpolated but re-estimated on training batches (otherwise the
barrier measures stale statistics, not the loss landscape). Align the networks first
(:func:`~bnnkit.posterior.permutation.align`) to measure barriers modulo permutations.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


def interpolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float):
    """``(1 - t) a + t b`` for floating-point tensors; integer buffers (BatchNorm's batch
    counter) are taken from ``a``."""
    if set(a) != set(b):
        raise InputError("the two state dicts hold different keys; not the same architecture")
    return {k: (1 - t) * a[k] + t * b[k] if a[k].is_floating_point() else a[k].clone()
            for k in a}  # fmt: skip


@torch.no_grad()
def _reestimate_bn(net: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    net.train()
    for start in range(0, len(x), batch_size):
        net(x[start : start + batch_size])
    net.eval()


@torch.no_grad()
def path_losses(
    net: nn.Module,
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    points: int = 11,
    bn_data: torch.Tensor | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, loss, accuracy)`` along the linear path from ``a`` to ``b`` on ``(x, y)``; with
    BatchNorm, running statistics are re-estimated at every ``t`` on ``bn_data`` (required)."""
    if points < 2:
        raise InputError(f"points must be >= 2, got {points}")
    net = copy.deepcopy(net)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if has_bn and bn_data is None:
        raise InputError("the network has BatchNorm: pass bn_data (training images) so that its "
                         "statistics are re-estimated along the path")  # fmt: skip
    ts = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    losses, accs = [], []
    for t in ts.tolist():
        net.load_state_dict(interpolate(a, b, t))
        if has_bn:
            _reestimate_bn(net, bn_data, batch_size)
        net.eval()
        total, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            logits = net(x[start : start + batch_size]).double()
            yy = y[start : start + batch_size]
            total += float(F.cross_entropy(logits, yy, reduction="sum"))
            correct += int((logits.argmax(1) == yy).sum())
        losses.append(total / len(x))
        accs.append(correct / len(x))
    return ts, torch.tensor(losses, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64)


def barrier(ts: torch.Tensor, losses: torch.Tensor) -> float:
    """``max_t L(t) - ((1 - t) L(0) + t L(1))`` (>= 0 at the end points, so >= 0)."""
    line = (1 - ts) * losses[0] + ts * losses[-1]
    return float((losses - line).max())


def count_modes(barriers: torch.Tensor, threshold: float) -> tuple[int, list[int]]:
    """Modes as connected components of the graph joining two networks whose barrier is below
    ``threshold``: ``(number of modes, mode label per network)`` (labels in order of first
    appearance)."""
    n = barriers.shape[0]
    if barriers.shape != (n, n):
        raise InputError(f"barriers must be a square matrix, got {tuple(barriers.shape)}")
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if max(float(barriers[i, j]), float(barriers[j, i])) < threshold:
                parent[find(j)] = find(i)
    labels, names = [], {}
    for i in range(n):
        labels.append(names.setdefault(find(i), len(names)))
    return len(names), labels


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def pairwise_mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """``[M, M]``: for members ``i, j`` with predictive distributions ``probs[i], probs[j]`` (``[M,
    N, C]``), the mutual information between the member index (uniform over the pair) and the
    label, averaged over the ``N`` inputs: ``H((p_i + p_j) / 2) - (H(p_i) + H(p_j)) / 2`` (the
    Jensen-Shannon divergence, in nats). Zero exactly when two members predict alike."""
    if probs.dim() != 3:
        raise InputError(f"probs must be [members, inputs, classes], got {tuple(probs.shape)}")
    p = probs.to(torch.float64)
    h = _entropy(p).mean(1)  # [M]
    mix = _entropy((p[:, None] + p[None, :]) / 2).mean(-1)  # [M, M]
    return (mix - (h[:, None] + h[None, :]) / 2).clamp_min(0.0)


def largest_weight_index(states: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    """Per network, the flat index of the largest-magnitude entry of tensor ``key``
    (Laurent et al.: across independently trained networks this index is uniform, a symptom of
    the permutation symmetry; after canonicalisation it concentrates)."""
    if not states:
        raise InputError("no networks given")
    return torch.tensor([int(s[key].abs().argmax()) for s in states])


def uniformity_pvalue(indices: torch.Tensor, categories: int) -> float:
    """Chi-square goodness-of-fit p-value of ``indices`` against the uniform distribution over
    ``categories`` values (small: not uniform)."""
    from scipy.stats import chisquare

    counts = torch.bincount(indices, minlength=categories).double()
    return float(chisquare(counts.numpy()).pvalue)
