"""What every command shares: the parser class, exit statuses, ``key=value`` options."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError

#: exit status of a command stopped by its time or epoch budget: the work so far is kept and
#: the same command (with --resume for `bnnkit train`) continues it (EX_TEMPFAIL)
EXIT_STOPPED = 75


class Parser(argparse.ArgumentParser):
    """argparse with bnnkit's error format: one ``bnnkit: error: ...`` line, exit status 2.

    A command's flags are added when the command is used (``populate``: a function of the
    parser), so ``bnnkit data`` does not import what ``bnnkit search`` needs (Optuna,
    Lightning) only to build flags it will not parse."""

    def __init__(self, *args, populate=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populate(self) -> Parser:
        if self._populate is not None:
            fill, self._populate = self._populate, None
            fill(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.populate()
        return super().format_help()

    def error(self, message):
        self.exit(2, f"bnnkit: error: {message} (see `{self.prog} --help`)\n")


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_values(pairs: list[str] | None, flag: str = "--option") -> dict:
    """``key=value`` pairs (values read as JSON where they parse, else as strings)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"{flag} takes key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k] = parse_value(v)
    return out


def train_options(pairs: list[str] | None) -> dict:
    """``--train-option key=value`` pairs, checked against the train config's option table."""
    from ..train.config import TRAIN_OPTIONS

    opts = key_values(pairs, "--train-option")
    TRAIN_OPTIONS.resolve(opts, fill=False)
    return opts


def apply_extras(cfg, a) -> None:
    """``--train-option`` / ``--model-option`` onto a bench or search config."""
    if a.train_option:
        cfg.train_options.update(train_options(a.train_option))
    if a.model_option:
        cfg.model_options.update(key_values(a.model_option, "--model-option"))


def count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {n}")
    return n


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def subset(text: str, flag: str = "--subset"):
    """A number of examples >= 1, or None for 'all' (flags without an option table)."""
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(f"{flag} takes a number >= 1 or 'all', got {text!r}") from None
    if n < 1:
        raise ConfigError(f"{flag} must be >= 1 (or 'all' for every example), got {n}")
    return n


def add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
