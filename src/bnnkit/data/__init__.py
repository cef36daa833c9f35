"""Real data sets, splits, OOD pairs and corruptions (plain torch, no torchvision); segmentation
label maps with a held-out-class anomaly protocol (:mod:`bnnkit.data.segmentation`)."""

from .bundle import OOD_PAIRS, DataBundle, Split, load_bundle, to_float, train_val_indices
from .corruptions import CORRUPTIONS, corrupt, rotate_by
from .segmentation import IGNORE_INDEX, SegSplit, load_camvid
from .sources import DATASETS, download, fetch, get_spec, load_split, locate_split, verify

__all__ = [
    "DATASETS",
    "OOD_PAIRS",
    "CORRUPTIONS",
    "DataBundle",
    "Split",
    "load_bundle",
    "load_split",
    "locate_split",
    "get_spec",
    "to_float",
    "train_val_indices",
    "corrupt",
    "rotate_by",
    "verify",
    "fetch",
    "download",
    "SegSplit",
    "load_camvid",
    "IGNORE_INDEX",
]
