"""Real data sets, splits, OOD pairs and corruptions (plain torch, no torchvision)."""

from .bundle import OOD_PAIRS, DataBundle, Split, load_bundle, to_float, train_val_indices
from .corruptions import CORRUPTIONS, corrupt, rotate_by
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
]
