"""Semantic segmentation data: images with label maps, and a held-out-class anomaly protocol.

CamVid (``camvid.npz``, SegNet split at 180x240: train 367 / val 101 / test 233 images, 11
classes, source label 11 = void) is read by :func:`load_camvid`. The anomaly protocol follows
BDD-Anomaly: the held-out classes (default: Bicyclist) are never learned, so

- train / val: their pixels become void (``IGNORE_INDEX``), like unlabelled pixels;
- test: their pixels are the anomalies, returned as a separate boolean mask ``anomaly``, and in
  the in-distribution masks ``y`` they are void too, so in-distribution metrics exclude them.

The remaining classes are renumbered contiguously in their source order: new label ``k`` is
source label ``source_labels[k]`` and is called ``class_names[k]``. With the default
(Bicyclist, source label 10, held out) the 10 other classes keep their labels 0..9. Masks are
uint8 (``.long()`` them for ``cross_entropy(..., ignore_index=IGNORE_INDEX)``); void is 255 for
every choice of held-out classes, so it never collides with a class.

Limits of the protocol: CamVid's held-out objects are small and rare (Bicyclist: 76 of 233 test
images, 0.2% of the test pixels) and appear next to in-distribution classes the network has
learned (Pedestrian), so it measures near-anomalies in a familiar street, not novel scenes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError, InputError
from .sources import locate_split, read_npz

#: the label of pixels that are not scored and not trained on (void, held-out classes)
IGNORE_INDEX = 255

_SPLITS = ("train", "val", "test")


@dataclass
class SegSplit:
    """One split of a segmentation data set.

    ``x``: images uint8 ``[N, 3, H, W]``; ``y``: in-distribution label maps uint8 ``[N, H, W]``
    with values ``0..num_classes-1`` or ``ignore_index``; ``anomaly``: bool ``[N, H, W]`` of
    held-out-class pixels (test split only, else ``None``); ``class_names[k]`` names label ``k``,
    which is ``source_labels[k]`` in the file."""

    x: torch.Tensor
    y: torch.Tensor
    names: list[str]
    class_names: list[str]
    source_labels: tuple[int, ...]
    anomaly_classes: tuple[str, ...]
    anomaly: torch.Tensor | None = None
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.x.shape[0]

    @classmethod
    def from_arrays(
        cls,
        images,
        masks,
        class_names: Sequence[str],
        *,
        anomaly_classes: Sequence[str] = (),
        split: str = "test",
        names: Sequence[str] | None = None,
    ) -> SegSplit:
        """Build a split from label maps whose source labels are ``0..len(class_names)-1`` and
        ``len(class_names)`` = void (CamVid's layout), applying the anomaly protocol.

        ``images``: uint8 ``[N, H, W, 3]`` (as stored) or ``[N, 3, H, W]`` (read as such when
        both axes are 3); ``masks``: integer
        ``[N, H, W]``. ``split == "test"`` returns the anomaly mask. Bad arrays raise
        :class:`InputError`."""
        return _build(images, masks, class_names, anomaly_classes, split, names, InputError)


def load_camvid(split: str, anomaly_classes: Sequence[str] = ("Bicyclist",), root=None) -> SegSplit:
    """CamVid ``split`` ("train", "val" or "test") under the anomaly protocol above.

    ``anomaly_classes``: class names held out (``()`` holds none out: then the test anomaly
    mask is all False). ``root``: a folder holding ``camvid.npz`` or the file itself; by default
    the data search path (``$BNNKIT_DATA``, ``~/.cache/bnnkit``, ...). The file is read once per
    process while it stays the same; every call gets its own tensors."""
    if split not in _SPLITS:
        raise DataError(f"CamVid has no {split!r} split; use one of {', '.join(_SPLITS)}")
    path = _camvid_path(split, root)
    x, y, names, class_names = _read_camvid(path, split)
    try:
        return _build(x, y, class_names, anomaly_classes, split, names, DataError)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def _camvid_path(split: str, root) -> Path:
    if root is None:
        return locate_split("camvid", split)[0]
    p = Path(root).expanduser()
    if p.is_dir():
        p = p / "camvid.npz"
    if not p.is_file():
        raise DataError(
            f"{p} not found; pass root= a folder holding camvid.npz (or the file itself), "
            "or leave root unset to search $BNNKIT_DATA and ~/.cache/bnnkit"
        )
    return p


#: (resolved path, split) -> (file fingerprint, images NHWC, masks, names, class names)
_CACHE: dict[tuple[str, str], tuple] = {}


def _read_camvid(path: Path, split: str):
    st = path.stat()
    key = (str(path.resolve()), split)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _CACHE.get(key)
    if hit is None or hit[0] != stamp:
        d = read_npz(path, [f"x_{split}", f"y_{split}", f"names_{split}", "class_names"])
        hit = (
            stamp,
            d[f"x_{split}"],
            d[f"y_{split}"],
            [str(n) for n in d[f"names_{split}"]],
            [str(n) for n in d["class_names"]],
        )
        _CACHE[key] = hit
    return hit[1:]


def _build(images, masks, class_names, anomaly_classes, split, names, error) -> SegSplit:
    """Check the arrays (raising ``error``), apply the anomaly protocol and renumber."""
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    y = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    class_names = [str(c) for c in class_names]
    if x.dtype != np.uint8 or x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise error(
            f"images must be uint8 [N, H, W, 3] or [N, 3, H, W], got {x.dtype} "
            f"{tuple(x.shape)}; convert them to 8-bit RGB"
        )
    if x.shape[-1] == 3 and x.shape[1] != 3:  # channels last, as stored
        x = x.transpose(0, 3, 1, 2)
    if y.ndim != 3 or y.shape != (x.shape[0], *x.shape[2:]):
        raise error(
            f"images {tuple(x.shape)} (as [N, 3, H, W]) and masks {tuple(y.shape)} do not match: "
            "each image needs one label map [H, W] of its own size"
        )
    if y.dtype.kind not in "iu":
        raise error(f"masks must hold integer labels, got dtype {y.dtype}")
    n = len(class_names)
    if n < 2 or len(set(class_names)) != n:
        raise error(f"class_names must name at least 2 distinct classes, got {class_names}")
    if y.size and (y.min() < 0 or y.max() > n):
        bad = np.unique(y[(y < 0) | (y > n)])[:5].tolist()
        raise error(
            f"mask labels must lie in 0..{n - 1} (the {n} classes) or be {n} (void); found "
            f"{bad}: the label maps use another encoding, map it to this one first"
        )
    if names is None:
        names = [str(i) for i in range(x.shape[0])]
    names = [str(s) for s in names]
    if len(names) != x.shape[0]:
        raise error(f"{len(names)} names for {x.shape[0]} images")
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    if isinstance(anomaly_classes, str):
        anomaly_classes = (anomaly_classes,)
    held = tuple(dict.fromkeys(str(c) for c in anomaly_classes))
    unknown = [c for c in held if c not in class_names]
    if unknown:
        raise ConfigError(
            f"unknown anomaly class {unknown[0]!r}; valid class names are: {', '.join(class_names)}"
        )
    kept = [i for i, c in enumerate(class_names) if c not in held]
    if len(kept) < 2:
        raise ConfigError(
            f"holding out {list(held)} leaves {len(kept)} class; keep at least 2 to segment"
        )
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # source label -> new label; void -> 255
    lut[kept] = np.arange(len(kept), dtype=np.uint8)
    anomaly = None
    if split == "test":
        is_held = np.zeros(256, dtype=bool)
        is_held[[class_names.index(c) for c in held]] = True
        anomaly = torch.from_numpy(is_held[y])
    return SegSplit(
        x=torch.from_numpy(np.array(x, order="C", copy=True)),
        y=torch.from_numpy(lut[y]),  # a new array: never the cached one
        names=names,
        class_names=[class_names[i] for i in kept],
        source_labels=tuple(kept),
        anomaly_classes=held,
        anomaly=anomaly,
    )
