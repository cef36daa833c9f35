"""Train/validation/test splits, OOD partners and subsets for one in-distribution data set."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, DataError
from .sources import get_spec, load_split

#: default OOD partners of each in-distribution set (first available ones are used)
OOD_PAIRS: dict[str, list[str]] = {
    "fashion_mnist": ["mnist", "cifar10_grey"],
    "mnist": ["fashion_mnist"],
    "cifar10": ["cifar100", "svhn"],
}


@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    def float(self) -> torch.Tensor:
        return to_float(self.x)

    def head(self, n: int | None) -> Split:
        return self if n is None or n >= len(self) else Split(self.x[:n], self.y[:n])


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@dataclass
class DataBundle:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    val: Split
    test: Split
    ood: dict[str, Split] = field(default_factory=dict)
    missing_ood: dict[str, str] = field(default_factory=dict)
    #: results derived from this data that methods share while the bundle lives (a diagonal
    #: Laplace fit keyed on a fingerprint of the weights and data): scoped, never global
    derived: dict = field(default_factory=dict, repr=False, compare=False)


def train_val_indices(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded permutation of ``range(n)`` split into (train, validation) indices."""
    if not 0 < val_size < n:
        raise ConfigError(f"val_size must be in (0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:], perm[:val_size]


def load_bundle(
    name: str,
    *,
    val_size: int = 5000,
    subset: int | None = None,
    split_seed: int = 0,
    ood: list[str] | None = None,
    test_size: int | None = None,
) -> DataBundle:
    """Load ``name`` with a seeded train/validation split and its OOD partners.

    ``subset`` keeps the first N of the (shuffled) training part, for quick runs; the
    validation set is carved first, so it is the same whatever the subset.
    ``ood=None`` uses :data:`OOD_PAIRS`; partners that are not installed are listed in
    ``missing_ood`` with the reason rather than failing the whole run.
    """
    spec = get_spec(name)
    x, y = load_split(name, "train")
    tr, va = train_val_indices(len(y), val_size, split_seed)
    if subset is not None:
        if subset < 1:
            raise ConfigError(f"subset must be >= 1, got {subset}")
        tr = tr[:subset]
    xt, yt = load_split(name, "test")
    test = Split(xt, yt).head(test_size)
    bundle = DataBundle(
        name,
        spec.input_shape,
        spec.num_classes,
        spec.mean,
        spec.std,
        Split(x[tr], y[tr]),
        Split(x[va], y[va]),
        test,
    )
    for other in OOD_PAIRS.get(name, []) if ood is None else ood:
        ospec = get_spec(other)
        if ospec.input_shape != spec.input_shape:
            raise ConfigError(
                f"OOD set {other!r} has images {ospec.input_shape}, but {name!r} has "
                f"{spec.input_shape}; pick an OOD set of the same shape"
            )
        try:
            ox, oy = load_split(other, "test")
        except DataError as e:
            if ood is not None:
                raise
            bundle.missing_ood[other] = str(e).splitlines()[0]
            continue
        bundle.ood[other] = Split(ox, oy).head(test_size)
    return bundle
