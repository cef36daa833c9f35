"""Training through Lightning: one routine for every method, safe checkpoints, resume."""

from .chunks import Budget, read_progress
from .config import DataConfig, RunConfig, TrainConfig, load_yaml
from .run import check_writable, is_complete, model_spec, train_run

__all__ = [
    "DataConfig",
    "RunConfig",
    "TrainConfig",
    "load_yaml",
    "train_run",
    "is_complete",
    "check_writable",
    "model_spec",
    "Budget",
    "read_progress",
]
