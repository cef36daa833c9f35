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


#: ITU-R BT.601 luma weights (what PIL's ``convert("L")`` uses)
LUMA = (0.299, 0.587, 0.114)


def grey_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RGB uint8 images ``[N, 3, H, W]`` to grey uint8 ``[N, 1, *size]``: BT.601 luma, then an
    antialiased bilinear resize (so a 32x32 CIFAR image becomes a 28x28 Fashion-MNIST-shaped
    one without aliasing), rounded back to uint8."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"grey_resize expects uint8 [N, 3, H, W] images, got {x.dtype} {x.shape}")
    w = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    grey = (x.float() * w).sum(1, keepdim=True)
    if tuple(grey.shape[-2:]) != tuple(size):
        grey = F.interpolate(grey, size=size, mode="bilinear", antialias=True, align_corners=False)
    return grey.round().clamp_(0, 255).to(torch.uint8)
