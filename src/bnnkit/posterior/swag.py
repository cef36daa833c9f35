"""SWAG samples as networks: the moments and the Gaussian live in :mod:`bnnkit.laplace.swag`
(:class:`SWAG`, :func:`fit_swag`); this module draws networks from it.

BatchNorm: a sampled network's running statistics must be re-estimated on training data before
use (the SWAG paper does the same); :func:`swag_states` does it when ``bn_data`` is given and
refuses BatchNorm networks without it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import InputError
from ..laplace.swag import SWAG, fit_swag

__all__ = ["SWAG", "fit_swag", "swag_states"]


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
