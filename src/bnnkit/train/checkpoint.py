"""Lightning checkpoints written with :mod:`bnnkit.io` (safetensors + JSON, never pickle)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

from .. import io


class SafeCheckpointIO(CheckpointIO):
    """Full Lightning training state (weights, optimiser, loops, callbacks) without pickle."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        io.save(checkpoint, Path(path), kind="lightning")

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return io.load(Path(path), kind="lightning")

    def remove_checkpoint(self, path) -> None:
        if os.path.exists(path):
            os.unlink(path)
