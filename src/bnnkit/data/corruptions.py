"""Image corruptions of the CIFAR-10-C / MNIST-C families, vectorised in torch.

Every function takes float images ``[N, C, H, W]`` in [0, 1], a severity 1..5 and a
``torch.Generator``, and returns images in [0, 1]. ``corrupt(x, name, severity, seed)`` is
deterministic for a seed, and image ``i``'s result depends only on the seed, the name, the
severity and image ``i`` (not on the batch it came in): random draws are made in one call whose
leading axis is the image, so a prefix of a batch gets the same draws. Severity constants follow
Hendrycks & Dietterich (2019) for the 32x32 CIFAR-10-C set; they are used unchanged for 28x28
images.

Differences to the reference implementation, stated plainly: ``brightness`` shifts the HSV
value channel (for grey images: adds to the intensity); ``jpeg`` quantises the 8x8 DCT of
each YCbCr channel with the IJG tables and no chroma subsampling; ``elastic`` uses a
Gaussian-smoothed random displacement field normalised to a pixel standard deviation
(Simard et al., 2003), as in MNIST-C, rather than CIFAR-10-C's affine + elastic mix.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


# ------------------------------------------------------------------ checks shared with MNIST-C

#: the largest corruption seed: the generator's seed is derived from it modulo 2**64, which
#: keeps distinct seeds distinct for seeds below 2**63
SEED_MAX = 2**63 - 1
#: how far outside [0, 1] float rounding may put an image's values
RANGE_TOLERANCE = 1e-6


def check_seed(seed) -> int:
    """``seed`` as an int; an :class:`InputError` unless it is an int (not a bool) in
    ``0 .. SEED_MAX``."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(
            f"seed must be an int in 0..2**63-1, got {seed!r} ({type(seed).__name__}); "
            "pass a non-negative int, e.g. seed=0"
        )
    if not 0 <= int(seed) <= SEED_MAX:
        raise InputError(
            f"seed must be an int in 0..2**63-1, got {seed}; pass a non-negative int below "
            "2**63, e.g. seed=0"
        )
    return int(seed)


def derived_seed(seed: int, index: int, offset: int) -> int:
    """The generator seed of corruption number ``index`` of a registry: ``seed * 1009 +
    index * 17 + offset`` modulo 2**64 (odd multiplier: distinct seeds stay distinct)."""
    return (seed * 1009 + index * 17 + offset) % 2**64


def check_unit_range(x: torch.Tensor, what: str) -> None:
    """Refuse images with values outside [0, 1] (beyond :data:`RANGE_TOLERANCE`) or non-finite
    values: one min / max over the batch."""
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(
            f"{what} take images in [0, 1], got non-finite values (NaN or inf; min {lo}, "
            f"max {hi}); replace or drop those images first"
        )
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = (
            "images scaled 0..255: divide by 255 (uint8 images: bnnkit.data.bundle.to_float)"
            if hi > 1 + RANGE_TOLERANCE and lo >= -RANGE_TOLERANCE
            else "rescale them to [0, 1] (normalised images: undo the normalisation first)"
        )
        raise InputError(f"{what} take images in [0, 1], got values in [{lo:g}, {hi:g}]; {hint}")


def per_image_randn(shape, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws of ``shape`` (leading axis: the image) whose values for image ``i``
    do not depend on how many images follow it. torch's CPU sampler turns uniforms into normals
    in groups of 16 and redraws the last group of a tensor whose size is not a multiple of 16,
    so every image's block is drawn as a whole number of such groups and then cut to size."""
    n, per = shape[0], math.prod(shape[1:])
    padded = -(-per // 16) * 16
    return torch.randn((n, padded), generator=g, dtype=dtype)[:, :per].reshape(shape)


def _hint(name: str, registry, other: tuple) -> str:
    """What to tell about an unknown ``name``: that it belongs to the other family, or the
    closest valid name ('' when neither)."""
    key = name.strip().lower()
    if other and key in other[0]:
        return f"{name.strip()!r} is {other[1]}"
    near = difflib.get_close_matches(key, list(registry), n=1)
    return f"did you mean {near[0]!r} for {name.strip()!r}?" if near else ""


def lookup_name(name, registry: dict, what: str, other: tuple = ()) -> str:
    """The registry key of one corruption ``name``, matched case-insensitively with surrounding
    spaces stripped; a :class:`ConfigError` listing the valid names (in the registry's order)
    otherwise. ``other``: ``(names, hint)`` of the other corruption family, whose names get
    the hint instead of a near match."""
    if not isinstance(name, str):
        raise ConfigError(f"a {what} name must be a string, got {name!r}")
    key = name.strip().lower()
    if key in registry:
        return key
    hint = _hint(name, registry, other)
    hint = f" ({hint})" if hint else ""
    raise ConfigError(f"unknown {what} {name!r}{hint}; valid {what}s are: {', '.join(registry)}")


def select_names(value, registry: dict, what: str, option: str, other: tuple = ()) -> list[str]:
    """The names of ``registry`` that ``value`` selects: a comma-separated string or a list of
    names, matched case-insensitively with surrounding spaces stripped, duplicates dropped
    (first kept); ``'all'`` alone: every name in the registry's order; ``''``, ``'none'`` or
    ``[]``: none. ``other``: ``(names, hint)`` of the other corruption family (unknown names
    that belong to it get the hint). Anything else is a :class:`ConfigError` naming the
    option, the bad names and the valid ones."""
    if isinstance(value, str):
        parts = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        parts = list(value)
    else:
        raise ConfigError(
            f"option {option!r} must be a list of {what} names or a comma-separated string "
            f"('all' for every one, '' or 'none' for none), got {value!r}"
        )
    given = [p.strip() for p in parts if p.strip()]
    keys = [p.lower() for p in given]
    special = [k for k in keys if k in ("all", "none")]
    if special:
        if len(set(keys)) > 1:
            raise ConfigError(
                f"option {option!r}: {special[0]!r} cannot be combined with other names, got "
                f"{value!r}; give 'all', 'none' or a list of names"
            )
        return list(registry) if special[0] == "all" else []
    bad = [g for g, k in zip(given, keys, strict=True) if k not in registry]
    if bad:
        hints = [h for h in (_hint(b, registry, other) for b in bad) if h]
        raise ConfigError(
            f"option {option!r}: unknown {what}(s) {bad}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f"; valid: {', '.join(registry)} (or 'all', or '' / 'none' for none)"
        )
    return list(dict.fromkeys(keys))


def _mnist_c_hint() -> tuple:
    from .mnist_c import MNIST_C  # imported here: mnist_c imports this module

    return (set(MNIST_C) - set(CORRUPTIONS), "an MNIST-C corruption (option mnist_c, --mnist-c)")


def corruption_names(value) -> list[str]:
    """Corruption names (:data:`CORRUPTIONS`) from a list of names, a comma-separated string,
    ``'all'`` (the 12, in the registry's order) or ``''`` / ``'none'`` / ``[]`` (none):
    :func:`select_names` for option ``corruptions``."""
    return select_names(value, CORRUPTIONS, "corruption", "corruptions", _mnist_c_hint())


def check_images(x, what: str, layout: str) -> None:
    """Refuse what is not a float image batch ``[N, C, H, W]`` in [0, 1], with a hint that
    fits the problem found."""
    head = f"{what} take float images {layout} in [0, 1]"
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{head}, got a {type(x).__name__}; convert it with torch.as_tensor")
    shape = tuple(x.shape)
    if x.dim() != 4:
        if x.dim() == 3:
            hint = (
                "add the missing axis: x[:, None] for a batch of grey images [N, H, W], "
                "x[None] for one image [C, H, W]"
            )
        elif x.dim() == 2:
            hint = "one grey image [H, W]: use x[None, None]"
        else:
            hint = "give a batch of images [N, C, H, W]"
        raise InputError(f"{head}, got a {x.dim()}-D tensor of shape {shape}; {hint}")
    if not x.dtype.is_floating_point:
        hint = (
            "convert uint8 images with bnnkit.data.to_float (divides by 255)"
            if x.dtype == torch.uint8
            else "convert them to float and scale to [0, 1]"
        )
        raise InputError(f"{head}, got {x.dtype} images of shape {shape}; {hint}")


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
    return (x + c * per_image_randn(x.shape, g)).clamp(0, 1)


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
    return (x + x * c * per_image_randn(x.shape, g)).clamp(0, 1)


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
    if N == 0:
        return x.clone()
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
    if N == 0:  # nothing to warp (and no standard deviation of an empty field)
        return x.clone()
    field = torch.rand((N, 2, H, W), generator=g) * 2 - 1
    field = gaussian_blur_sigma(field, 3.0)
    field = field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-8) * disp
    return _warp(x, field[:, 0], field[:, 1]).clamp(0, 1)


def rotate_by(x: torch.Tensor, angles_deg) -> torch.Tensor:
    """Rotate each image about its centre by ``angles_deg`` (scalar or [N]), zero fill."""
    N = x.shape[0]
    if N == 0:
        return x.clone()
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
    """Apply corruption ``name`` (case-insensitive) at ``severity`` (1..5) to float images
    ``[N, C, H, W]`` in [0, 1], deterministically for ``seed`` (an int in 0..2**63-1); image
    ``i``'s result does not depend on the other images of the batch."""
    key = lookup_name(name, CORRUPTIONS, "corruption", _mnist_c_hint())
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral):
        raise InputError(f"severity must be an integer in 1..5, got {severity!r}")
    if not 1 <= int(severity) <= 5:
        raise InputError(f"severity must be an integer in 1..5, got {severity}")
    seed = check_seed(seed)
    check_images(x, "corruptions", "[N, C, H, W]")
    check_unit_range(x, "corruptions")
    if x.shape[0] == 0:
        return x.detach().cpu().clone()
    index = list(CORRUPTIONS).index(key)
    g = torch.Generator().manual_seed(derived_seed(seed, index, int(severity)))
    with torch.no_grad():
        return CORRUPTIONS[key](x.detach().cpu().float(), int(severity), g).to(x.dtype)
