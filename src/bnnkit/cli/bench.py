"""``bnnkit bench``: train and evaluate methods side by side, one table."""

from __future__ import annotations

from dataclasses import fields

from ..errors import ConfigError
from .common import EXIT_STOPPED, add_quiet, apply_extras

NAME, HELP = "bench", "train and evaluate methods; print one table"

#: options of BENCH_OPTIONS without a flag of their own, and why
NO_FLAG = {"progress": "set by --quiet"}
#: flag names that differ from their option's (kept from earlier releases)
RENAME = {"test_size": "test_subset"}


def arguments(b) -> None:
    from ..bench import BENCH_OPTIONS
    from ..options import add_arguments

    b.add_argument("--methods", help="comma-separated method names (see `bnnkit methods`)")
    b.add_argument(
        "--corruptions",
        help="comma-separated corruption names, 'all', or '' / 'none' for none (default: the "
        "bench's six; segmentation: those that keep pixels in place)",
    )
    add_arguments(b, BENCH_OPTIONS, rename=RENAME, exclude=NO_FLAG)
    b.add_argument("--config", help="YAML file with BenchConfig fields (flags given win)")
    b.add_argument(
        "--reuse",
        action="append",
        metavar="DIR",
        help="an earlier bench's output directory: its finished runs made with the same "
        "settings are copied in instead of trained again (repeatable; replaces the config "
        "file's reuse list)",
    )
    b.add_argument("--train-option", action="append", help="train config key=value for every run")
    b.add_argument(
        "--model-option", action="append", help="architecture option key=value, e.g. width=16"
    )
    add_quiet(b)


def bench_config(path: str | None):
    """A BenchConfig from a YAML file of its fields (defaults where the file is silent)."""
    from ..bench import BenchConfig
    from ..train import load_yaml

    base = {}
    if path:
        base = load_yaml(path)
        valid = {f.name for f in fields(BenchConfig)}
        unknown = set(base) - valid
        if unknown:
            raise ConfigError(
                f"unknown key(s) {sorted(unknown)} in {path}; valid: " + ", ".join(sorted(valid))
            )
    return BenchConfig(**base)


def config(a):
    """The BenchConfig of a parsed ``bnnkit bench`` command line: the YAML file's fields (or
    the table's defaults), then every flag given."""
    from ..bench import BENCH_OPTIONS
    from ..options import given

    cfg = bench_config(a.config)
    if a.methods:
        cfg.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.corruptions is not None:
        cfg.corruptions = a.corruptions  # names, 'all' or '' / 'none': resolved by validate()
    for k, v in given(a, BENCH_OPTIONS).items():
        setattr(cfg, k, v)
    if a.reuse:
        cfg.reuse = list(a.reuse)
    if a.quiet:
        cfg.progress = False
    apply_extras(cfg, a)
    return cfg


def run(a) -> int:
    from ..bench import run_bench

    return 0 if run_bench(config(a)) is not None else EXIT_STOPPED
