"""The few image transforms bnnkit needs, on batches, in plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch ``[N, C, H, W]``: zero-pad, random crop, h-flip."""
    N, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (N,), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (N,), device=x.device)
    rows = oy[:, None] + torch.arange(H, device=x.device)  # [N, H]
    cols = ox[:, None] + torch.arange(W, device=x.device)  # [N, W]
    if flip:
        mirrored = torch.rand(N, device=x.device) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    n = torch.arange(N, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()
