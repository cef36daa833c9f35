"""SWAG (Maddox et al., NeurIPS 2019): a Gaussian over weights from the iterates of SGD with a
constant learning rate started at a trained solution,

    theta = mean + diag(var)^(1/2) z1 / sqrt(2) + D z2 / sqrt(2 (K - 1)),

with ``mean`` and ``var`` the running first and second moments of the iterates, ``D`` the
deviations ``theta_k - mean_k`` of the last ``K`` snapshots, ``z1``, ``z2`` standard normal.
``rank=0`` gives SWAG-diagonal. The moments are float64; the network is never modified (SGD runs
on a copy); draws are seeded.

The moments feed two users: the SWAG subnetwork-selection rule
(:func:`bnnkit.laplace.selection.swag_variance`, the diagonal) and the posterior collections
(:func:`bnnkit.posterior.swag.swag_states`, sampled networks with BatchNorm statistics
re-estimated).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


@dataclass
class SWAG:
    keys: list[str]  # state-dict keys of the parameters, in flat order
    shapes: list[torch.Size]
    mean: torch.Tensor  # [P] float64
    sq_mean: torch.Tensor  # [P]
    deviations: torch.Tensor  # [K, P] float64 (K = 0 for SWAG-diagonal)
    n_snapshots: int

    @property
    def variance(self) -> torch.Tensor:
        return (self.sq_mean - self.mean**2).clamp_min(0.0)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One flat weight vector (float64)."""
        z1 = torch.randn(self.mean.shape, generator=generator, dtype=torch.float64)
        theta = self.mean + self.variance.sqrt() * z1 / 2**0.5
        k = len(self.deviations)
        if k >= 2:
            z2 = torch.randn(k, generator=generator, dtype=torch.float64)
            theta = theta + (self.deviations.T @ z2) / (2 * (k - 1)) ** 0.5
        return theta


def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out.get("logits", next(iter(out.values())))
    return out[0]


def fit_swag(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 5,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 128,
    snapshots_per_epoch: int = 4,
    rank: int = 20,
    seed: int = 0,
) -> SWAG:
    """SGD from ``net``'s weights (on a copy) for ``epochs`` on ``(x, y)``; the moments are
    updated at ``snapshots_per_epoch`` evenly spaced steps of every epoch (every step when
    that exceeds the steps per epoch); the last ``rank`` snapshots' deviations are kept."""
    for name, v, low in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("snapshots_per_epoch", snapshots_per_epoch, 1),
        ("rank", rank, 0),
    ):
        if not isinstance(v, int) or v < low:
            raise InputError(f"{name} must be an int >= {low}, got {v!r}")  # fmt: skip
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr}")
    if len(x) != len(y) or len(x) == 0:
        raise InputError(f"x and y must hold the same number (> 0) of examples: {len(x)}, {len(y)}")
    work = copy.deepcopy(net).train()
    named = [(k, p) for k, p in work.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    steps = -(-len(x) // batch_size)
    every = max(1, steps // snapshots_per_epoch)
    mean = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    sq = torch.zeros_like(mean)
    devs: list[torch.Tensor] = []
    k = 0
    dev = params[0].device
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for step in range(steps):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(_logits(work(x[idx].to(dev))), y[idx].long().to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % every == 0:
                with torch.no_grad():
                    v = torch.cat([p.detach().reshape(-1) for p in params]).double().cpu()
                k += 1
                mean += (v - mean) / k
                sq += (v * v - sq) / k
                if rank:
                    devs.append(v - mean)
                    devs = devs[-rank:]
    if k < 2:
        raise InputError("SWAG needs at least two snapshots; give more data or epochs")
    return SWAG([n for n, _ in named], [p.shape for p in params], mean, sq,
                torch.stack(devs) if devs else torch.zeros(0, len(mean), dtype=torch.float64),
                k)  # fmt: skip
