"""SWAG (Maddox et al., NeurIPS 2019): a Gaussian over weights from the iterates of SGD with a
constant learning rate started at a trained solution,

    theta = mean + diag(var)^(1/2) z1 / sqrt(2) + D z2 / sqrt(2 (K - 1)),

with ``mean`` and ``var`` the running first and second moments of the iterates, ``D`` the
deviations ``theta_k - mean_k`` of the last ``K`` snapshots, ``z1``, ``z2`` standard normal.
``rank=0`` gives SWAG-diagonal. The moments are float64; the network is never modified (SGD runs
on a copy); draws are seeded.

BatchNorm: a sampled network's running statistics must be re-estimated on training data before
use (the SWAG paper does the same); :func:`swag_states` does it when ``bn_data`` is given and
refuses BatchNorm networks without it.
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
            loss = F.cross_entropy(_logits(work(x[idx].to(dev))), y[idx].to(dev))
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


@torch.no_grad()
def swag_states(
    net: nn.Module,
    swag: SWAG,
    n: int,
    seed: int = 0,
    bn_data: torch.Tensor | None = None,
    batch_size: int = 256,
) -> list[dict[str, torch.Tensor]]:
    """``n`` sampled networks as state dicts of ``net``'s architecture (BatchNorm statistics
    re-estimated on ``bn_data``)."""
    from .modes import _reestimate_bn

    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if has_bn and bn_data is None:
        raise InputError("the network has BatchNorm: pass bn_data (training images) so that each "
                         "sample's statistics are re-estimated")  # fmt: skip
    work = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    sizes = [s.numel() for s in swag.shapes]
    out = []
    for _ in range(n):
        theta = swag.sample(g)
        state = {k: v.clone() for k, v in work.state_dict().items()}
        for key, part, shape in zip(swag.keys, torch.split(theta, sizes), swag.shapes):
            state[key] = part.view(shape).to(state[key].dtype)
        if has_bn:
            work.load_state_dict(state)
            _reestimate_bn(work, bn_data, batch_size)
            state = {k: v.clone() for k, v in work.state_dict().items()}
        out.append(state)
    return out
