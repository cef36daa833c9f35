"""Train/validation/test splits, OOD partners and subsets for one in-distribution data set."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, DataError
from .segmentation import IGNORE_INDEX, SegSplit, load_camvid
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
    y: torch.Tensor  # int64 [N]; segmentation: uint8 label maps [N, H, W]
    #: segmentation test split: bool [N, H, W], the held-out-class (anomalous) pixels
    anomaly: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    def float(self) -> torch.Tensor:
        return to_float(self.x)

    def head(self, n: int | None) -> Split:
        if n is None or n >= len(self):
            return self
        anomaly = None if self.anomaly is None else self.anomaly[:n]
        return Split(self.x[:n], self.y[:n], anomaly)


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
    #: "classification" (one label per image) or "segmentation" (label maps; ``ignore_index``
    #: pixels are neither trained on nor scored; the test split carries the anomaly mask)
    task: str = "classification"
    class_names: list[str] | None = None
    anomaly_classes: tuple[str, ...] = ()
    ignore_index: int = IGNORE_INDEX

    @property
    def dense(self) -> bool:
        return self.task == "segmentation"


def segmentation_bundle(
    name: str,
    train: SegSplit,
    val: SegSplit,
    test: SegSplit,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
) -> DataBundle:
    """A segmentation :class:`DataBundle` from three :class:`SegSplit` (e.g. your own arrays
    through ``SegSplit.from_arrays``); they must share classes, channels and the held-out
    classes. ``mean`` / ``std``: per-channel statistics the models normalise with."""
    for what, s in (("val", val), ("test", test)):
        if s.class_names != train.class_names or s.anomaly_classes != train.anomaly_classes:
            raise ConfigError(
                f"the {what} split has classes {s.class_names} (held out "
                f"{list(s.anomaly_classes)}), the train split {train.class_names} (held out "
                f"{list(train.anomaly_classes)}); build all three with the same classes"
            )
        if s.x.shape[1] != train.x.shape[1]:
            raise ConfigError(
                f"the {what} images have {s.x.shape[1]} channels, train's {train.x.shape[1]}"
            )
    if test.anomaly is None:
        raise ConfigError("the test split needs its anomaly mask: build it with split='test'")
    if len(mean) != train.x.shape[1] or len(std) != train.x.shape[1]:
        raise ConfigError(
            f"mean {tuple(mean)} and std {tuple(std)} need one value per channel "
            f"({train.x.shape[1]})"
        )
    if any(not 0.0 <= float(m) <= 1.0 for m in mean) or any(not float(v) > 0 for v in std):
        raise ConfigError(
            f"mean {tuple(mean)} must lie in [0, 1] and std {tuple(std)} be > 0: they are the "
            "per-channel statistics of images scaled to [0, 1] (divide 0-255 values by 255)"
        )
    if not bool((train.y != train.ignore_index).any()):
        raise ConfigError(
            "every training pixel is void (or a held-out class): there is nothing to train on; "
            "check the label encoding and anomaly_classes"
        )
    return DataBundle(
        name,
        tuple(int(v) for v in train.x.shape[1:]),
        train.num_classes,
        tuple(mean),
        tuple(std),
        Split(train.x, train.y),
        Split(val.x, val.y),
        Split(test.x, test.y, test.anomaly),
        task="segmentation",
        class_names=list(train.class_names),
        anomaly_classes=tuple(train.anomaly_classes),
        ignore_index=train.ignore_index,
    )


#: segmentation data sets: name -> loader(split, anomaly_classes)
SEGMENTATION_LOADERS = {"camvid": load_camvid}


def parse_classes(value) -> tuple[str, ...]:
    """Held-out class names from ``"A,B"``, ``["A", "B"]`` or ``""`` (none)."""
    if isinstance(value, str):
        return tuple(c.strip() for c in value.split(",") if c.strip())
    return tuple(str(c) for c in value)


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
    anomaly_classes="Bicyclist",
) -> DataBundle:
    """Load ``name`` with a seeded train/validation split and its OOD partners.

    ``subset`` keeps the first N of the (shuffled) training part, for quick runs; the
    validation set is carved first, so it is the same whatever the subset.
    ``ood=None`` uses :data:`OOD_PAIRS`; partners that are not installed are listed in
    ``missing_ood`` with the reason rather than failing the whole run.

    A segmentation data set (CamVid) keeps its own validation split (``val_size`` and
    ``split_seed`` do not apply), has no OOD partners, and holds ``anomaly_classes`` (names,
    comma-separated or a list) out as the test split's anomalies
    (:mod:`bnnkit.data.segmentation`).
    """
    spec = get_spec(name)
    if spec.task == "segmentation":
        if ood:
            raise ConfigError(f"{name!r} is a segmentation data set: it has no OOD partners")
        if subset is not None and subset < 1:
            raise ConfigError(f"subset must be >= 1, got {subset}")
        held = parse_classes(anomaly_classes)
        load = SEGMENTATION_LOADERS[name]
        tr, va, te = (load(s, anomaly_classes=held) for s in ("train", "val", "test"))
        bundle = segmentation_bundle(name, tr, va, te, spec.mean, spec.std)
        bundle.train = bundle.train.head(subset)
        bundle.test = bundle.test.head(test_size)
        return bundle
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
