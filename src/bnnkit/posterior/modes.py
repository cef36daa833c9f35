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
        loss, acc = _loss_acc(net, x, y, batch_size)
        losses.append(loss)
        accs.append(acc)
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


@torch.no_grad()
def _loss_acc(net: nn.Module, x, y, batch_size: int) -> tuple[float, float]:
    total, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = net(x[start : start + batch_size]).double()
        yy = y[start : start + batch_size]
        total += float(F.cross_entropy(logits, yy, reduction="sum"))
        correct += int((logits.argmax(1) == yy).sum())
    return total / len(x), correct / len(x)


def barrier_matrix(
    net: nn.Module,
    states: list[dict[str, torch.Tensor]],
    x: torch.Tensor,
    y: torch.Tensor,
    aligned: bool = True,
    points: int = 11,
    bn_data: torch.Tensor | None = None,
    batch_size: int = 256,
    example_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[n, n]`` symmetric loss barriers between every pair of ``states`` on ``(x, y)``.

    ``aligned=True`` measures barriers modulo symmetries: both networks are first balanced (the
    minimum-norm representative of their scaling orbits, ReLU-family networks only; skipped for
    others) and the second is permuted onto the first by weight matching. The matrix is what
    :func:`count_modes` groups into modes. ``n (n - 1) / 2`` paths of ``points`` evaluations.
    """
    from .permutation import align
    from .scaling import balance, symmetry_specs

    n = len(states)
    if n < 1:
        raise InputError("no networks given")
    if aligned:
        ex = example_input if example_input is not None else x[:2]
        pspec, sspec = symmetry_specs(net, ex, scaling="auto")
        if sspec is not None:
            states = [balance(s, sspec) for s in states]
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            b = align(states[i], states[j], pspec) if aligned else states[j]
            ts, losses, _ = path_losses(net, states[i], b, x, y, points, bn_data, batch_size)
            out[i, j] = out[j, i] = barrier(ts, losses)
    return out


@torch.no_grad()
def loss_plane(
    net: nn.Module,
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    c: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    grid: int = 21,
    margin: float = 0.25,
    bn_data: torch.Tensor | None = None,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Loss and accuracy on the plane through three networks (Garipov et al., 2018): origin
    ``a``, unit axes ``u = (b - a) / |b - a|`` and ``v`` = the part of ``c - a`` orthogonal to
    ``u``, normalised; every floating-point tensor (weights, biases, BatchNorm affine) takes part.
    Returns ``{"u", "v"}`` grid coordinates ``[grid]`` (spanning the three points with a
    ``margin`` fraction on each side), ``"loss"``, ``"accuracy"`` ``[grid, grid]`` (row = v,
    column = u) and ``"points"`` ``[3, 2]``, the coordinates of ``a, b, c``. BatchNorm
    statistics are re-estimated at every grid point on ``bn_data``."""
    if grid < 2:
        raise InputError(f"grid must be >= 2, got {grid}")
    if not (set(a) == set(b) == set(c)):
        raise InputError("the three state dicts hold different keys; not the same architecture")
    stats = ("running_mean", "running_var")
    keys = [k for k in a if a[k].is_floating_point() and not k.endswith(stats)]
    flat = {n: torch.cat([s[k].reshape(-1).double() for k in keys]) for n, s in
            (("a", a), ("b", b), ("c", c))}  # fmt: skip
    d1, d2 = flat["b"] - flat["a"], flat["c"] - flat["a"]
    nu = d1.norm()
    if nu == 0:
        raise InputError("a and b are the same network; the plane is undefined")
    u = d1 / nu
    w = d2 - (d2 @ u) * u
    nv = w.norm()
    if nv <= 1e-12 * nu:
        raise InputError("the three networks are collinear; the plane is undefined")
    v = w / nv
    pts = torch.tensor([[0.0, 0.0], [float(nu), 0.0], [float(d2 @ u), float(nv)]],
                       dtype=torch.float64)  # fmt: skip
    lo, hi = pts.min(0).values, pts.max(0).values
    span = hi - lo
    gu = torch.linspace(lo[0] - margin * span[0], hi[0] + margin * span[0], grid,
                        dtype=torch.float64)  # fmt: skip
    gv = torch.linspace(lo[1] - margin * span[1], hi[1] + margin * span[1], grid,
                        dtype=torch.float64)  # fmt: skip
    net = copy.deepcopy(net)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if has_bn and bn_data is None:
        raise InputError("the network has BatchNorm: pass bn_data (training images) so that its "
                         "statistics are re-estimated on the plane")  # fmt: skip
    sizes = [a[k].numel() for k in keys]
    loss = torch.zeros(grid, grid, dtype=torch.float64)
    acc = torch.zeros(grid, grid, dtype=torch.float64)
    for i, cv in enumerate(gv.tolist()):
        for j, cu in enumerate(gu.tolist()):
            theta = flat["a"] + cu * u + cv * v
            state = {k: t.clone() for k, t in a.items()}
            for k, part in zip(keys, torch.split(theta, sizes)):
                state[k] = part.view_as(a[k]).to(a[k].dtype)
            net.load_state_dict(state)
            if has_bn:
                _reestimate_bn(net, bn_data, batch_size)
            net.eval()
            loss[i, j], acc[i, j] = _loss_acc(net, x, y, batch_size)
    return {"u": gu, "v": gv, "loss": loss, "accuracy": acc, "points": pts}
