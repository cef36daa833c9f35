"""UQ methods: each builds a :class:`UQModel` whose ``predict`` returns a Predictive."""

from . import laplace, temperature  # noqa: F401  (register post-hoc methods)
from .base import (
    METHODS,
    Method,
    ModelSpec,
    UQModel,
    build_method,
    get_method,
    method_options,
    register,
)
from .temperature import fit_temperature

__all__ = [
    "METHODS",
    "Method",
    "ModelSpec",
    "UQModel",
    "build_method",
    "get_method",
    "method_options",
    "register",
    "fit_temperature",
]
