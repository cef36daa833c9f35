"""Batches per second of the two training data paths, without a model, on CIFAR-10's 45,000
training images (batch 128, random crop + flip, as training uses them):

- ``DataLoader``: torch's ``DataLoader`` over a ``TensorDataset`` (one ``__getitem__`` per image,
  collated in Python), then the batch augmentation of the training step;
- ``TensorLoader``: bnnkit's device-resident loader (one gather per batch, augmentation on the
  uint8 batch), optionally with cutout.

    python benchmarks/loader_speed.py [--device cpu|cuda] [--epochs 2]

Each path is timed over whole epochs after one warm-up epoch, the batch moved to ``--device``
and converted to float there (what the training step sees). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from bnnkit.data import load_bundle
from bnnkit.data.loader import Augment, TensorLoader


def _epoch(batches, device, augment=None) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for x, y in batches:
        x = x.to(device, non_blocking=True).float().div_(255)
        if augment is not None:
            x = augment(x, None)
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    device = torch.device(a.device)
    b = load_bundle("cifar10", ood=[])
    x, y = b.train.x, b.train.y
    crop_flip = Augment(crop_pad=4, flip=True)
    paths = {
        "DataLoader + step augmentation": lambda: _epoch(
            DataLoader(TensorDataset(x, y), batch_size=a.batch, shuffle=True), device, crop_flip
        ),
        "TensorLoader (crop + flip)": lambda: _epoch(
            TensorLoader(x, y, a.batch, augment=crop_flip, device=device), device
        ),
        "TensorLoader (crop + flip + cutout 16)": lambda: _epoch(
            TensorLoader(
                x, y, a.batch, device=device, augment=Augment(4, True, 16, (0.49, 0.48, 0.45))
            ),
            device,
        ),  # fmt: skip
    }
    rates = {}
    for name, run in paths.items():
        run()  # warm-up
        secs, n = zip(*(run() for _ in range(a.epochs)))
        rates[name] = sum(n) / sum(secs)
    base = rates["DataLoader + step augmentation"]
    print(f"CIFAR-10 train ({len(y):,} images), batch {a.batch}, {device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads\n")  # fmt: skip
    print("| data path | images/s | x DataLoader |\n|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {r:,.0f} | {r / base:.1f} |")


if __name__ == "__main__":
    main()
