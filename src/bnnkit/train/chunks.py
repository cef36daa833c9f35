"""Training in chunks: stop at an epoch boundary when a time or epoch budget runs out, resume
later exactly where it stopped, and keep a record of every chunk in the run directory.

``progress.json`` (rewritten atomically after every epoch)::

    {"epochs": 200, "epochs_done": 37, "status": "stopped",
     "chunks": [{"start_epoch": 0, "end_epoch": 37, "seconds": 512.3,
                 "train_images": 1665000, "train_seconds": 455.1, "images_per_s": 3658.5,
                 "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "precision": "bf16-mixed",
                 "loader": "tensor", "compile": "max-autotune", "channels_last": true,
                 "stop": "time budget", "started": "2026-11-24T10:00:00+00:00"}, ...]}

``images_per_s`` counts training images (every ensemble member sees each one; a deep ensemble's
per-member batches count once) over the time of the training batches alone (validation
excluded; CUDA synchronised at the boundaries).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from .. import io


@dataclass
class Budget:
    """How much of a run one call may train: ``deadline`` (a ``time.time()`` value by which
    the call should be done: an epoch is only started when the last one's duration still fits)
    and ``stop_epoch`` (stop once this many epochs are done). A stopped run keeps its last
    checkpoint; ``--resume`` continues it bitwise as if it had never stopped (CPU)."""

    deadline: float | None = None
    stop_epoch: int | None = None

    @classmethod
    def minutes(cls, minutes: float | None, stop_epoch: int | None = None) -> Budget:
        return cls(None if minutes is None else time.time() + 60.0 * minutes, stop_epoch)

    def exhausted(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{device.type} ({platform.machine()}, {n} thread{'' if n == 1 else 's'})"


def read_progress(run_dir: Path) -> dict:
    path = Path(run_dir) / "progress.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a record, not state: a damaged one is started afresh


class ChunkControl(L.Callback):
    """Stops training at an epoch boundary when ``budget`` runs out and writes
    ``progress.json``; measures training images per second."""

    def __init__(self, run_dir: Path, budget: Budget | None, epochs: int, info: dict) -> None:
        self.path = Path(run_dir) / "progress.json"
        self.budget = budget or Budget()
        self.epochs = epochs
        self.info = info
        self.reason = ""
        self._chunks: list[dict] = []  # earlier chunks' records, kept
        self._chunk: dict | None = None
        self._t_epoch = self._t_train = 0.0
        self._in_train = False

    @staticmethod
    def _sync(trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_start(self, trainer, pl_module) -> None:
        record = read_progress(self.path.parent)
        chunks = record.get("chunks", [])
        start = trainer.current_epoch
        self._chunk = {
            "start_epoch": start,
            "end_epoch": start,
            "seconds": 0.0,
            "train_images": 0,
            "train_seconds": 0.0,
            "images_per_s": None,
            "device": device_name(trainer.strategy.root_device),
            "torch": torch.__version__,
            **self.info,
            "stop": "",
            "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        # a chunk killed before its first epoch ended left nothing to keep
        self._chunks = [c for c in chunks if c.get("end_epoch", 0) <= start and
                        c.get("end_epoch") != c.get("start_epoch")]  # fmt: skip
        self._t0 = time.time()
        stop = self.budget.stop_epoch
        if stop is not None and start >= stop:  # already there: train nothing more
            self.reason = f"stop at epoch {stop}"
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync(trainer)
        self._t_epoch = self._t_train = time.perf_counter()
        self._in_train = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # images of the data set, not rows: a deep ensemble's batch stacks one per member
        streams = getattr(getattr(pl_module, "model", None), "data_streams", 1)
        self._chunk["train_images"] += len(batch[-1]) // streams

    def _end_train_part(self, trainer) -> None:
        if self._in_train:
            self._sync(trainer)
            self._chunk["train_seconds"] += time.perf_counter() - self._t_train
            self._in_train = False

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._end_train_part(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._end_train_part(trainer)
        epoch_seconds = time.perf_counter() - self._t_epoch
        done = trainer.current_epoch + 1
        if done < self.epochs:
            b = self.budget
            if b.stop_epoch is not None and done >= b.stop_epoch:
                self.reason = f"stop at epoch {b.stop_epoch}"
            elif b.deadline is not None and time.time() + 1.05 * epoch_seconds > b.deadline:
                self.reason = "time budget"
            if self.reason:
                trainer.should_stop = True
        self._write(trainer, done, "complete" if done >= self.epochs else
                    ("stopped" if self.reason else "training"))  # fmt: skip

    def _write(self, trainer, done: int, status: str) -> None:
        c = self._chunk
        c["end_epoch"] = done
        c["seconds"] = round(time.time() - self._t0, 3)
        c["train_seconds"] = round(c["train_seconds"], 3)
        if c["train_seconds"] > 0:
            c["images_per_s"] = round(c["train_images"] / c["train_seconds"], 1)
        c["stop"] = self.reason
        if not trainer.is_global_zero:
            return
        record = {
            "epochs": self.epochs,
            "epochs_done": done,
            "status": status,
            "chunks": [*self._chunks, c],
        }
        io.atomic_write_text(self.path, json.dumps(record, indent=1))
