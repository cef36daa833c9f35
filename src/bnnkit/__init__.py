"""bnnkit: efficient Bayesian neural networks and uncertainty quantification in PyTorch."""

from .convert import bayesify, register_kind
from .errors import BnnkitError, CheckpointError, ConfigError, DataError, InputError
from .predictive import Predictive

__version__ = "0.1.0"

__all__ = [
    "bayesify",
    "register_kind",
    "Predictive",
    "BnnkitError",
    "InputError",
    "ConfigError",
    "DataError",
    "CheckpointError",
]
