"""Image corruptions of the CIFAR-10-C / MNIST-C families, vectorised in torch.

Every function takes float images ``[N, C, H, W]`` in [0, 1], a severity 1..5 and a
``torch.Generator``, and returns images in [0, 1]. ``corrupt(x, name, severity, seed)`` is
deterministic for a seed. Severity constants follow Hendrycks & Dietterich (2019) for the
32x32 CIFAR-10-C set; they are used unchanged for 28x28 images.

Differences to the reference implementation, stated plainly: ``brightness`` shifts the HSV
value channel (for grey images: adds to the intensity); ``jpeg`` quantises the 8x8 DCT of
each YCbCr channel with the IJG tables and no chroma subsampling; ``elastic`` uses a
Gaussian-smoothed random displacement field normalised to a pixel standard deviation
(Simard et al., 2003), as in MNIST-C, rather than CIFAR-10-C's affine + elastic mix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import InputError, unknown_name

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def _gauss_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _filter2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2-D filtering with reflect padding."""
    C = x.shape[1]
    kh, kw = kernel.shape
    xp = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    w = kernel.to(x).expand(C, 1, kh, kw)
    return F.conv2d(xp, w, groups=C)


def gaussian_blur_sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = _gauss_kernel1d(sigma)
    return _filter2d(_filter2d(x, k[None, :]), k[:, None])


def gaussian_noise(x, s, g):
    c = [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]
    return (x + c * torch.randn(x.shape, generator=g)).clamp(0, 1)


def shot_noise(x, s, g):
    c = [500, 250, 100, 75, 50][s - 1]
    return (torch.poisson(x * c, generator=g) / c).clamp(0, 1)


def impulse_noise(x, s, g):
    c = [0.01, 0.02, 0.03, 0.05, 0.07][s - 1]
    u = torch.rand(x.shape, generator=g)
    out = x.clone()
    out[u < c / 2] = 0.0
    out[(u >= c / 2) & (u < c)] = 1.0
    return out


def speckle_noise(x, s, g):
    c = [0.06, 0.1, 0.12, 0.16, 0.2][s - 1]
    return (x + x * c * torch.randn(x.shape, generator=g)).clamp(0, 1)


def gaussian_blur(x, s, g):
    return gaussian_blur_sigma(x, [0.4, 0.6, 0.7, 0.8, 1.0][s - 1]).clamp(0, 1)


def defocus_blur(x, s, g):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)][s - 1]
    r = max(1, math.ceil(radius))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).float()
    disk = disk / disk.sum()
    return gaussian_blur_sigma(_filter2d(x, disk), alias).clamp(0, 1)


def contrast(x, s, g):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1)


def brightness(x, s, g):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][s - 1]
    if x.shape[1] == 1:
        return (x + c).clamp(0, 1)
    v = x.max(dim=1, keepdim=True).values
    scale = torch.where(v > 0, (v + c).clamp(max=1) / v.clamp_min(1e-8), torch.zeros_like(v))
    out = torch.where(v > 0, x * scale, torch.full_like(x, c))
    return out.clamp(0, 1)


def pixelate(x, s, g):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    H, W = x.shape[-2:]
    small = F.interpolate(x, size=(int(H * c), int(W * c)), mode="area")
    return F.interpolate(small, size=(H, W), mode="nearest").clamp(0, 1)


_Q_LUMA = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
_Q_CHROMA = torch.full((8, 8), 99.0)
_Q_CHROMA[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]],
    dtype=torch.float32,
)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float32)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def _quality_table(base: torch.Tensor, quality: int) -> torch.Tensor:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return ((base * scale + 50) // 100).clamp(1, 255)


def jpeg_quantize(x: torch.Tensor, quality: int) -> torch.Tensor:
    N, C, H, W = x.shape
    pix = x * 255.0
    if C == 3:
        r, gch, b = pix.unbind(1)
        y = 0.299 * r + 0.587 * gch + 0.114 * b
        cb = 128 - 0.168736 * r - 0.331264 * gch + 0.5 * b
        cr = 128 + 0.5 * r - 0.418688 * gch - 0.081312 * b
        planes = torch.stack([y, cb, cr], 1)
        tables = [_quality_table(_Q_LUMA, quality)] + [_quality_table(_Q_CHROMA, quality)] * 2
    else:
        planes = pix
        tables = [_quality_table(_Q_LUMA, quality)] * C
    ph, pw = (-H) % 8, (-W) % 8
    planes = F.pad(planes, (0, pw, 0, ph), mode="replicate") - 128.0
    Hp, Wp = H + ph, W + pw
    blocks = planes.reshape(N, C, Hp // 8, 8, Wp // 8, 8).permute(0, 1, 2, 4, 3, 5)
    D = _dct_matrix()
    coef = D @ blocks @ D.T
    q = torch.stack(tables).view(1, C, 1, 1, 8, 8)
    coef = torch.round(coef / q) * q
    blocks = D.T @ coef @ D
    planes = blocks.permute(0, 1, 2, 4, 3, 5).reshape(N, C, Hp, Wp)[..., :H, :W] + 128.0
    if C == 3:
        y, cb, cr = planes.unbind(1)
        r = y + 1.402 * (cr - 128)
        gch = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
        b = y + 1.772 * (cb - 128)
        planes = torch.stack([r, gch, b], 1)
    return (torch.round(planes.clamp(0, 255)) / 255.0).to(x.dtype)


def jpeg(x, s, g):
    return jpeg_quantize(x, [80, 65, 58, 50, 40][s - 1])


def _warp(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` at pixel positions displaced by (dx, dy) (pixels), bilinear, zero fill."""
    N, C, H, W = x.shape
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=x.dtype), torch.arange(W, dtype=x.dtype), indexing="ij"
    )
    gx = (xs + dx) * 2 / (W - 1) - 1
    gy = (ys + dy) * 2 / (H - 1) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def elastic(x, s, g):
    disp = [0.5, 1.0, 1.5, 2.0, 2.5][s - 1]  # displacement sd in pixels (28/32 px images)
    N, _, H, W = x.shape
    field = torch.rand((N, 2, H, W), generator=g) * 2 - 1
    field = gaussian_blur_sigma(field, 3.0)
    field = field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-8) * disp
    return _warp(x, field[:, 0], field[:, 1]).clamp(0, 1)


def rotate_by(x: torch.Tensor, angles_deg) -> torch.Tensor:
    """Rotate each image about its centre by ``angles_deg`` (scalar or [N]), zero fill."""
    N = x.shape[0]
    a = torch.as_tensor(angles_deg, dtype=x.dtype).expand(N) * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x, s, g):
    mag = [15.0, 30.0, 45.0, 60.0, 75.0][s - 1]
    sign = torch.randint(0, 2, (x.shape[0],), generator=g).to(x.dtype) * 2 - 1
    return rotate_by(x, sign * mag).clamp(0, 1)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "defocus_blur": defocus_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg": jpeg,
    "elastic": elastic,
    "rotate": rotate,
}


def corrupt(x: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5), deterministically for ``seed``."""
    if name not in CORRUPTIONS:
        raise unknown_name("corruption", name, CORRUPTIONS)
    if not 1 <= int(severity) <= 5:
        raise InputError(f"severity must be an integer in 1..5, got {severity}")
    if x.dim() != 4 or not x.dtype.is_floating_point:
        raise InputError(f"corruptions take float images [N, C, H, W] in [0, 1], got {x.shape}")
    index = list(CORRUPTIONS).index(name)
    g = torch.Generator().manual_seed(int(seed) * 1009 + index * 17 + int(severity))
    with torch.no_grad():
        return CORRUPTIONS[name](x.cpu().float(), int(severity), g).to(x.dtype)
