"""The dense-prediction data path: images and label maps held on the training device, augmented
together on whole batches.

:class:`SegTensorLoader` is :class:`~bnnkit.data.loader.TensorLoader` for segmentation: the
images (uint8 ``[N, 3, H, W]``) and label maps (``[N, H, W]``) live on the training device, each
batch is one gather, and :class:`SegAugment` draws, per image, a horizontal flip, a scale in
``[s_min, s_max]`` and a crop of a fixed size, then applies them to the whole batch with one
``F.grid_sample`` for the images (bilinear) and one for the masks (nearest): no per-image Python
loop. Order and augmentation come from generators seeded by ``(seed, epoch)``, as for
``TensorLoader``, so a resumed run sees the batches of the uninterrupted one.

Geometry of one image ``H x W`` with scale ``s``: the scaled image is ``Hs x Ws`` with
``Hs = round(H * s)``, ``Ws = round(W * s)`` (at least 1), resized with ``align_corners=False``
(output pixel ``u`` reads source coordinate ``(u + 0.5) * H / Hs - 0.5``, clamped to the image,
as ``F.interpolate`` does). The crop's top-left corner ``(top, left)`` is uniform over the
positions that keep the crop inside the scaled image; where the scaled image is smaller than the
crop it sits at the top left and the rest is padding (0 for images, ``ignore_index`` for
masks). A flipped crop is the crop mirrored left to right. Masks are sampled nearest, so every
output label is a label of the input or ``ignore_index``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from .loader import TensorLoader, epoch_seed
from .segmentation import IGNORE_INDEX


@dataclass
class CropDraw:
    """One batch's draws, one entry per image: scaled sizes, crop corner (in scaled pixels)
    and whether the crop is mirrored."""

    scaled_h: torch.Tensor  # long [N]
    scaled_w: torch.Tensor  # long [N]
    top: torch.Tensor  # long [N]
    left: torch.Tensor  # long [N]
    flip: torch.Tensor  # bool [N]


@dataclass
class SegAugment:
    """Joint augmentation of images and label maps: random scale in ``scale = (s_min, s_max)``,
    random crop of ``crop = (height, width)`` (None: the input size), random horizontal flip."""

    crop: tuple[int, int] | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.crop is not None:
            crop = tuple(int(c) for c in self.crop)
            if len(crop) != 2 or min(crop) < 1:
                raise ConfigError(f"crop must be (height, width) with both >= 1, got {self.crop}")
            self.crop = crop
        lo, hi = (float(s) for s in self.scale)
        if not 0 < lo <= hi:
            raise ConfigError(
                f"scale must be (s_min, s_max) with 0 < s_min <= s_max, got {self.scale}"
            )
        self.scale = (lo, hi)

    def draw(self, n: int, h: int, w: int, generator=None, device=None) -> CropDraw:
        """The random choices for ``n`` images of ``h x w``, in a fixed order: scales, then
        vertical and horizontal crop positions, then flips."""
        g, dev = generator, device
        ch, cw = self.crop or (h, w)
        lo, hi = self.scale
        s = lo + (hi - lo) * torch.rand(n, generator=g, device=dev, dtype=torch.float64)
        hs = torch.floor(h * s + 0.5).long().clamp_(min=1)
        ws = torch.floor(w * s + 0.5).long().clamp_(min=1)
        top = torch.rand(n, generator=g, device=dev, dtype=torch.float64)
        left = torch.rand(n, generator=g, device=dev, dtype=torch.float64)
        top = (top * ((hs - ch).clamp(min=0) + 1)).long()
        left = (left * ((ws - cw).clamp(min=0) + 1)).long()
        flip = torch.rand(n, generator=g, device=dev) < 0.5
        if not self.flip:
            flip = torch.zeros_like(flip)
        return CropDraw(hs, ws, top, left, flip)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator=None):
        """Augmented ``(x, y)``: ``x`` ``[N, C, H, W]`` (uint8 or float), ``y`` ``[N, H, W]``
        integer labels; the outputs keep the dtypes, sized ``crop``."""
        d = self.draw(x.shape[0], x.shape[-2], x.shape[-1], generator, x.device)
        return apply_crop(x, y, d, self.crop or tuple(x.shape[-2:]), self.ignore_index)


def apply_crop(x: torch.Tensor, y: torch.Tensor, d: CropDraw, crop, ignore_index: int):
    """Scale, crop and flip every image of the batch as ``d`` says (module docstring): one
    ``grid_sample`` for the images, one for the masks."""
    N, C, H, W = x.shape
    ch, cw = crop
    dev = x.device
    # scaled-pixel coordinates every output pixel reads, [N, ch] and [N, cw]
    u = d.top[:, None] + torch.arange(ch, device=dev)
    j = torch.arange(cw, device=dev)
    v = d.left[:, None] + torch.where(d.flip[:, None], cw - 1 - j, j)
    hs, ws = d.scaled_h[:, None], d.scaled_w[:, None]
    inside = (u < hs)[:, :, None] & (v < ws)[:, None, :]  # [N, ch, cw]: not padding
    # normalised source coordinates (align_corners=False): (2u + 1) / Hs - 1, an affine map of
    # the output pixel per image; x first, as grid_sample expects
    gy = ((2 * u + 1).double() / hs - 1).float()
    gx = ((2 * v + 1).double() / ws - 1).float()
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
    work = torch.float32 if not x.is_floating_point() else x.dtype
    xo = F.grid_sample(x.to(work), grid.to(work), mode="bilinear", padding_mode="border",
                       align_corners=False)  # fmt: skip
    xo = xo.masked_fill(~inside[:, None], 0)
    if x.dtype == torch.uint8:
        xo = xo.round_().clamp_(0, 255)
    xo = xo.to(x.dtype)
    yo = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="border",
                       align_corners=False)[:, 0]  # fmt: skip
    yo = yo.masked_fill(~inside, ignore_index).to(y.dtype)
    return xo, yo


class SegTensorLoader(TensorLoader):
    """Batches ``(x[idx], y[idx])`` of images ``[N, C, H, W]`` and label maps ``[N, H, W]`` held
    on ``device``; with ``augment`` (a :class:`SegAugment`) both are scaled, cropped and
    flipped together on the batch. Without it (evaluation) the batches are the stored images
    at full size. Everything else (seeded epochs, ``set_epoch``, ``sampler``, ``drop_last``,
    equal shares per rank, ``streams``) is :class:`TensorLoader`'s."""

    def __init__(self, x, y, batch_size: int, *, augment: SegAugment | None = None, **kwargs):
        if "augment" in kwargs:
            raise ConfigError("pass a SegAugment as augment=")
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.dim() != 4:
                raise InputError(f"images must be [N, C, H, W], got {tuple(x.shape)}")
            if y.dim() != 3 or y.shape != (x.shape[0], *x.shape[2:]):
                raise InputError(
                    f"images {tuple(x.shape)} and masks {tuple(y.shape)} do not match: each "
                    "image needs one label map [H, W] of its own size"
                )
            if y.is_floating_point() or y.dtype == torch.bool:
                raise InputError(f"masks must hold integer labels, got dtype {y.dtype}")
        if augment is not None and not isinstance(augment, SegAugment):
            raise ConfigError(f"augment must be a SegAugment, got {type(augment).__name__}")
        super().__init__(x, y, batch_size, **kwargs)
        self.seg_augment = augment

    def __iter__(self):
        if self.seg_augment is None:
            yield from super().__iter__()
            return
        g = torch.Generator(device=self.device)
        g.manual_seed(epoch_seed(self.seed, self.sampler.epoch, 1 + self.world()[0]))
        for xb, yb in super().__iter__():
            yield self.seg_augment(xb, yb, g)
