"""The few image transforms bnnkit needs, on batches, in plain torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    x: torch.Tensor,
    pad: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch ``[N, C, H, W]`` of any dtype: zero-pad, random
    crop, h-flip. ``generator``: where the draws come from (default: torch's global one)."""
    N, C, H, W = x.shape
    dev, g = x.device, generator
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    oy = torch.randint(0, 2 * pad + 1, (N,), device=dev, generator=g)
    ox = torch.randint(0, 2 * pad + 1, (N,), device=dev, generator=g)
    rows = oy[:, None] + torch.arange(H, device=dev)  # [N, H]
    cols = ox[:, None] + torch.arange(W, device=dev)  # [N, W]
    if flip:
        mirrored = torch.rand(N, device=dev, generator=g) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    n = torch.arange(N, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def cutout(
    x: torch.Tensor,
    size: int,
    fill: tuple[float, ...] | float = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017) on a batch ``[N, C, H, W]``: one ``size`` x ``size``
    square per image, centred on a uniformly drawn pixel and clipped at the border (so near
    the edges less than ``size``² pixels are covered, as in the paper), set to ``fill`` (one
    value, or one per channel)."""
    N, C, H, W = x.shape
    dev, g = x.device, generator
    cy = torch.randint(0, H, (N, 1), device=dev, generator=g) - size // 2
    cx = torch.randint(0, W, (N, 1), device=dev, generator=g) - size // 2
    r, c = torch.arange(H, device=dev), torch.arange(W, device=dev)
    in_r = (r >= cy) & (r < cy + size)  # [N, H]
    in_c = (c >= cx) & (c < cx + size)  # [N, W]
    mask = (in_r[:, :, None] & in_c[:, None, :])[:, None]  # [N, 1, H, W]
    values = torch.as_tensor(fill, device=dev).to(x.dtype).reshape(-1)
    if values.numel() not in (1, C):
        raise ValueError(f"cutout fill needs 1 or {C} values, got {values.numel()}")
    return torch.where(mask, values.view(1, -1, 1, 1), x)


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
