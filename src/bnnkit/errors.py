"""The few exception types bnnkit raises.

Every message says what was expected, what was found, and how to fix it.
All derive from :class:`BnnkitError` so that callers can catch one type.
"""

from __future__ import annotations


class BnnkitError(Exception):
    """Base class of every error bnnkit raises on purpose."""


class InputError(BnnkitError, ValueError):
    """A tensor argument has the wrong shape, dtype, range or contains NaN/inf."""


class ConfigError(BnnkitError, ValueError):
    """An unknown name (method, model, data set, layer kind) or an invalid option."""


class DataError(BnnkitError, FileNotFoundError):
    """A data set is missing, corrupt, or empty."""


class CheckpointError(BnnkitError):
    """A checkpoint is truncated, foreign, or does not match the model."""


def unknown_name(what: str, name: str, valid) -> ConfigError:
    """Build the standard error for an unknown registry name."""
    valid = sorted(valid)
    return ConfigError(f"unknown {what} {name!r}; valid {what}s are: {', '.join(valid)}")
