"""A data loader for data sets that fit in device memory: whole batches, no per-image Python.

:class:`TensorLoader` keeps the images as uint8 on the training device (CIFAR-10's 50,000
training images are 150 MB) and yields ready batches: one index gather per batch, then the
augmentation on the whole batch on that device. A ``torch.utils.data.DataLoader`` over a
``TensorDataset`` instead indexes and collates one image at a time in Python and copies every
batch from host memory, which starves a GPU that runs a ResNet-18 step in a few milliseconds.

Every random draw of an epoch (the order and the augmentation) comes from generators seeded
by ``(seed, epoch)`` alone, so an epoch's batches do not depend on what ran before it: a run
resumed at any epoch boundary sees exactly the batches of the uninterrupted run, on any device
(given that device's generator). Lightning calls ``sampler.set_epoch`` at every epoch start,
as it does for a distributed sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .transforms import cutout, random_crop_flip


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A 63-bit seed for one (run seed, epoch, stream) triple; streams keep the order and the
    augmentation draws independent of each other."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))


@dataclass
class Augment:
    """Batch augmentation of images (uint8 in 0..255 or float in [0, 1]): zero-padded random
    crop, horizontal flip and cutout (DeVries & Taylor, 2017) filled with ``fill`` (values in
    [0, 1], one or one per channel; the data set's mean pixel is what a zero is after
    normalisation, the cutout paper's choice)."""

    crop_pad: int = 4
    flip: bool = True
    cutout: int = 0
    fill: tuple[float, ...] = (0.0,)

    def __post_init__(self) -> None:
        if self.crop_pad < 0 or self.cutout < 0:
            raise ConfigError(
                f"crop padding and cutout size must be >= 0, got {self.crop_pad}, {self.cutout}"
            )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.crop_pad or self.flip:
            x = random_crop_flip(x, self.crop_pad, self.flip, generator=generator)
        if self.cutout:
            scale = 255.0 if x.dtype == torch.uint8 else 1.0
            fill = tuple(round(v * scale) if scale > 1 else v for v in self.fill)
            x = cutout(x, self.cutout, fill, generator=generator)
        return x


class EpochSampler:
    """The seeded order of one epoch; ``set_epoch`` selects the epoch (Lightning calls it).
    ``order(k)``: the order of stream ``k`` (independent streams, stream 0 the usual one)."""

    def __init__(self, n: int, shuffle: bool, seed: int) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, stream: int = 0) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        key = 0 if stream == 0 else 1000 + stream  # 1..999: augmentation streams per rank
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, key))
        return torch.randperm(self.n, generator=g)


class TensorLoader:
    """Batches ``(x[idx], y[idx])`` of tensors held on ``device``, augmented there.

    ``x``: uint8 (or float) images ``[N, C, H, W]``; ``y``: labels ``[N]``. ``rank`` /
    ``world_size`` (default: from ``torch.distributed`` when it is initialised) give each
    process an equal, disjoint share of every epoch's order.

    ``streams=K``: every batch holds K batches, one from each of K independent orders of the
    data, stacked stream-major (rows ``k*B .. (k+1)*B - 1`` from stream ``k``): K ensemble
    members each see the whole data set every epoch, each in its own order (the deep-ensemble
    protocol), in one step over ``K*B`` rows.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        augment: Augment | None = None,
        device: torch.device | str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        streams: int = 1,
    ) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise ConfigError(
                f"TensorLoader takes torch tensors, got {type(x).__name__} / {type(y).__name__}; "
                "convert with torch.from_numpy"
            )
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"{x.shape[0]} images but {y.shape[0]} labels")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if streams < 1:
            raise ConfigError(f"streams must be >= 1, got {streams}")
        self.streams = int(streams)
        if augment is not None and x.dim() != 4:
            raise ConfigError(f"augmentation needs images [N, C, H, W], got {tuple(x.shape)}")
        device = torch.device(device) if device is not None else x.device
        self.x = x.to(device)
        self.y = y.to(device)
        self.device = device
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.sampler = EpochSampler(len(y), shuffle, seed)
        self.batch_sampler = None  # what Lightning looks for beside ``sampler``
        if (rank is None) != (world_size is None):
            raise ConfigError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside a world of {world_size}")
        self._world = None if world_size is None else (rank, world_size)

    def world(self) -> tuple[int, int]:
        """``(rank, world_size)``: as given, else torch.distributed's once it is initialised
        (Lightning initialises it after the loaders are made)."""
        if self._world is not None:
            return self._world
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.y) // self.world()[1]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        rank, world = self.world()
        orders = []
        for k in range(self.streams):
            order = self.sampler.order(k)
            if world > 1:  # equal disjoint shares; the remainder is left out of this epoch
                order = order[: (len(order) // world) * world][rank::world]
            orders.append(order.to(self.device))
        g = None
        if self.augment is not None:
            g = torch.Generator(device=self.device)
            g.manual_seed(epoch_seed(self.seed, self.sampler.epoch, 1 + rank))
        B = self.batch_size
        for b in range(len(self)):
            idx = torch.cat([o[b * B : (b + 1) * B] for o in orders]) if self.streams > 1 else (
                orders[0][b * B : (b + 1) * B])  # fmt: skip
            xb = self.x.index_select(0, idx)
            if self.augment is not None:
                xb = self.augment(xb, g)
            yield xb, self.y.index_select(0, idx)
