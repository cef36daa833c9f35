"""Command line: ``bnnkit train | evaluate | bench | search | posterior | data | methods``.

One module per command, each with ``NAME``, ``HELP``, ``arguments(parser)`` and ``run(args)``.
Flags that set a config's option are made from the option tables
(:func:`bnnkit.options.add_arguments`): their types, checks, help and defaults are the
tables', declared once; a flag not given leaves the config's (the table's) default."""

from __future__ import annotations

import argparse
import signal
import sys

from ..errors import BnnkitError
from . import bench, data, evaluate, methods, posterior, search, train
from .common import EXIT_STOPPED, Parser

COMMANDS = (train, evaluate, bench, search, posterior, data, methods)


def build_parser(populate: bool = False) -> argparse.ArgumentParser:
    """The ``bnnkit`` parser. A command's flags are added when it is parsed (``populate``: all
    of them now, e.g. to list every flag)."""
    p = Parser(prog="bnnkit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for cmd in COMMANDS:
        sp = sub.add_parser(cmd.NAME, help=cmd.HELP, populate=cmd.arguments)
        sp.set_defaults(func=cmd.run)
    if populate:
        populate_all(p)
    return p


def populate_all(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every (sub)command's flags now."""
    if isinstance(parser, Parser):
        parser.populate()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                populate_all(sp)
    return parser


def subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    """The populated parser of a (sub)command, e.g. ``subparser(p, "posterior", "report")``."""
    for name in path:
        parser = next(
            a.choices[name]
            for a in parser._actions
            if isinstance(a, argparse._SubParsersAction) and name in a.choices
        )
        if isinstance(parser, Parser):
            parser.populate()
    return parser


def _continue(args) -> str:
    """How to continue a command stopped by a signal (only `bnnkit train` has --resume)."""
    resume = " with --resume" if args.command == "train" else ""
    return f"the work so far is kept: re-run the same command{resume} to continue"


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status is returned (argument errors: 2, with one line)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or an argument error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except BnnkitError as e:
        print(f"bnnkit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path, permission or full disk: the user's to fix, not a bug
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"bnnkit: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bnnkit: interrupted; {_continue(args)}", file=sys.stderr)
        return 130
    except SystemExit as e:
        # Lightning turns SIGTERM into a SystemExit without a code (status 0) and Ctrl-C in a
        # training into a silent exit(1): a stopped run must neither look finished nor failed
        lightning = sys.modules.get("lightning.pytorch.utilities.exceptions")
        if lightning is not None and isinstance(e, lightning.SIGTERMException):
            print(f"bnnkit: terminated (SIGTERM); {_continue(args)}", file=sys.stderr)
            return 128 + signal.SIGTERM
        if isinstance(e.__context__, KeyboardInterrupt):
            print(f"bnnkit: interrupted; {_continue(args)}", file=sys.stderr)
            return 128 + signal.SIGINT
        raise


__all__ = ["main", "build_parser", "subparser", "populate_all", "EXIT_STOPPED"]
