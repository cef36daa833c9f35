"""Many independently trained networks at once: the reference posterior of a collection.

``train_independent`` trains ``n`` copies of one architecture, each from its own initialisation
(seed ``seeds[i]``) on its own data order (a permutation per member and epoch from the same
seed), vectorised with ``torch.func`` (``stack_module_state`` + ``vmap`` over
``functional_call``): one forward and backward pass serves all members, and because the loss is
a sum of per-member losses and Adam is elementwise, every member follows exactly the trajectory
it would follow alone (tested). BatchNorm in training mode keeps per-member running statistics
only through in-place updates that ``vmap`` does not support: models with BatchNorm are refused
here (train them one by one with ``bnnkit train``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..errors import ConfigError


def member_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of a member in one epoch (a permutation of ``n`` examples)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def train_independent(
    build: Callable[[], nn.Module],
    seeds: list[int],
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
) -> list[dict[str, torch.Tensor]]:
    """Train one network per seed (``torch.manual_seed(seed); build()``) with Adam and a cosine
    learning-rate schedule (bnnkit's recipe) on ``(x, y)``; return their state dicts. ``x`` is
    the model's input (floats), ``y`` class labels."""
    if not seeds:
        raise ConfigError("train_independent needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds must be distinct: equal seeds give identical networks")
    models = []
    for s in seeds:
        torch.manual_seed(s)
        m = build()
        if any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules()):
            raise ConfigError(
                "train_independent cannot vectorise BatchNorm's running statistics; train "
                "networks with BatchNorm one by one (bnnkit train) and add them to the collection"
            )
        models.append(m.train())
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    leaves = list(params.values())
    for p in leaves:
        p.requires_grad_(True)
    opt = torch.optim.Adam(leaves, lr=lr, weight_decay=weight_decay)
    # the learning-rate schedule of bnnkit's training (cosine over the epochs, stepped per
    # epoch), so a reference of independent networks follows the methods' recipe
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    device = leaves[0].device
    n = len(x)

    def loss_one(p, b, xb, yb):
        logits = functional_call(base, (p, b), (xb,))
        return F.cross_entropy(logits, yb)

    batched_loss = vmap(loss_one, in_dims=(0, 0, 0, 0), randomness="different")
    for epoch in range(epochs):
        orders = torch.stack([member_order(s, epoch, n) for s in seeds]).to(device)
        for start in range(0, n, batch_size):
            idx = orders[:, start : start + batch_size]  # [members, B]
            xb, yb = x.to(device)[idx], y.to(device)[idx]
            opt.zero_grad(set_to_none=True)
            batched_loss(params, buffers, xb, yb).sum().backward()
            opt.step()
        sched.step()
    out = []
    for i in range(len(seeds)):
        state = {k: v[i].detach().clone() for k, v in params.items()}
        state.update({k: v[i].detach().clone() for k, v in buffers.items()})
        out.append(state)
    return out
