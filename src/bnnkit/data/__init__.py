"""Real data sets, splits, OOD pairs, corruptions and the 15 MNIST-C corruptions (plain torch,
no torchvision); segmentation label maps with a held-out-class anomaly protocol
(:mod:`bnnkit.data.segmentation`)."""

from .bundle import OOD_PAIRS, DataBundle, Split, load_bundle, to_float, train_val_indices
from .corruptions import CORRUPTIONS, corrupt, rotate_by
from .mnist_c import MNIST_C, corrupt_mnist_c
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
    "MNIST_C",
    "corrupt_mnist_c",
    "verify",
    "fetch",
    "download",
    "SegSplit",
    "load_camvid",
    "IGNORE_INDEX",
]
