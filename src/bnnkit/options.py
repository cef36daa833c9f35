"""Every option of every method, layer kind, model and run setting, declared once.

An :class:`Option` says the name, type, default, range or choices and a help line; an
:class:`OptionTable` resolves a user's dict against its declarations: unknown keys (with a
close-match suggestion), wrong types and out-of-range values are refused with a
:class:`~bnnkit.ConfigError` that names the option, the value and what is valid, before any
work starts. The CLI, YAML configs, :func:`bnnkit.bayesify`, the methods and the placement
search all read the same tables, so a value is checked the same way wherever it comes from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

KINDS = ("int", "float", "bool", "str", "choice", "size", "int_list", "json")


def parse_size(value) -> int:
    """Bytes from a positive int or a string like '512MB', '2GB' (-1 when unparsable)."""
    if isinstance(value, bool):
        return -1
    if isinstance(value, (int, float)):
        return int(value) if math.isfinite(value) else -1
    s = str(value).strip().upper()
    for unit, mult in (("KB", 2**10), ("MB", 2**20), ("GB", 2**30), ("TB", 2**40), ("B", 1)):
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                return -1
    try:
        return int(s)
    except ValueError:
        return -1


@dataclass(frozen=True)
class Option:
    """One declared option. Ranges are inclusive unless ``low_open`` / ``high_open``."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    #: an int_list may be empty (e.g. no rotation angles)
    empty: bool = False
    nullable: bool = False  # None is a valid value (meaning "all" / "automatic")
    log: bool = False  # a search over this option samples it on a log scale
    #: kind "json": a function that returns the checked value or raises ConfigError
    validator: Callable[[Any], Any] | None = None
    #: no default: the user must give a value (``default`` must then be None)
    required: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: unknown kind {self.kind!r}")
        if self.required and self.default is not None:
            raise ValueError(f"option {self.name}: a required option has no default")

    def with_default(self, default: Any) -> Option:
        """The same declaration with another default (e.g. a bench's shorter training)."""
        return dataclasses.replace(self, default=default)

    def describe(self) -> str:
        """What is valid, in words: 'an int >= 1', 'one of a, b', ..."""
        if self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "size":
            text = "a positive size like '512MB' or '2GB'"
        elif self.kind == "str":
            text = "a string"
        elif self.kind == "json":
            text = "a valid " + self.name
        else:
            what = {"int": "an int", "float": "a number", "int_list": "a list of ints"}[self.kind]
            lo = "" if self.low is None else ("(" if self.low_open else "[") + f"{self.low:g}"
            hi = "" if self.high is None else f"{self.high:g}" + (")" if self.high_open else "]")
            if lo and hi:
                text = f"{what} in {lo}, {hi}"
            elif lo:
                text = f"{what} {'>' if self.low_open else '>='} {self.low:g}"
            elif hi:
                text = f"{what} {'<' if self.high_open else '<='} {self.high:g}"
            else:
                text = what
        return text + (" (or null)" if self.nullable else "")

    def _in_range(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        if self.high is not None and (x >= self.high if self.high_open else x > self.high):
            return False
        return True

    def check(self, value, where: str = ""):
        """The validated value (ints accepted for floats); ConfigError otherwise."""
        if value is None and self.nullable:
            return None

        def bad():
            owner = f" of {where}" if where else ""
            return ConfigError(
                f"option {self.name!r}{owner} must be {self.describe()}, got {value!r}"
            )

        k = self.kind
        if k == "json":
            if value is None or self.validator is None:
                raise bad()
            try:
                return self.validator(value)
            except ConfigError as e:
                owner = f" of {where}" if where else ""
                raise ConfigError(f"option {self.name!r}{owner}: {e}") from e
        if k == "bool":
            if not isinstance(value, bool):
                raise bad()
            return value
        if k in ("str", "choice"):
            if not isinstance(value, str) or (k == "choice" and value not in self.choices):
                raise bad()
            return value
        if k == "size":
            if parse_size(value) <= 0:
                raise bad()
            return value
        if k == "int_list":
            if not isinstance(value, (list, tuple)) or (not value and not self.empty):
                raise bad()
            for v in value:
                if not isinstance(v, int) or isinstance(v, bool) or not self._in_range(v):
                    raise bad()
            return list(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if k == "int" and not isinstance(value, int):
            raise bad()
        if not math.isfinite(value) or not self._in_range(value):
            raise bad()
        return float(value) if k == "float" else value


class OptionTable:
    """Declared options of one owner (a method, a layer kind, a model, a config section)."""

    def __init__(
        self,
        owner: str,
        options: Iterable[Option],
        checks: Iterable[Callable[[dict], str | None]] = (),
    ) -> None:
        self.owner = owner
        self.options = {o.name: o for o in options}
        self.checks = tuple(checks)  # cross-option rules: a message when violated
        self._check_defaults()

    def _check_defaults(self) -> None:
        """Every declared default passes its own declaration (and the cross-option rules): a
        default that drifted out of its range fails at import, not in a user's run."""
        for o in self:
            if o.required:
                continue
            try:
                o.check(o.default, self.owner)
            except ConfigError as e:
                raise ValueError(
                    f"{self.owner}: the default of option {o.name!r} is invalid: {e}"
                ) from e
        if not any(o.required for o in self):
            for rule in self.checks:
                msg = rule(self.defaults)
                if msg:
                    raise ValueError(f"{self.owner}: the defaults break a rule: {msg}")

    def __iter__(self):
        return iter(self.options.values())

    def __contains__(self, name) -> bool:
        return name in self.options

    def __len__(self) -> int:
        return len(self.options)

    def __getitem__(self, name: str) -> Option:
        return self.options[name]

    @property
    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self}

    def subset(self, owner: str, names: Iterable[str]) -> OptionTable:
        names = list(names)
        return OptionTable(owner, [self.options[n] for n in names], self.checks if names else ())

    def unknown(self, key: str) -> ConfigError:
        valid = sorted(self.options)
        near = difflib.get_close_matches(str(key), valid, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return ConfigError(
            f"{self.owner} has no option {key!r}{hint}; its options are: "
            + (", ".join(valid) or "(none)")
        )

    def resolve(self, given: dict[str, Any] | None = None, fill: bool = True) -> dict[str, Any]:
        """Validated options: ``given`` over the defaults (only ``given`` if not ``fill``)."""
        given = {} if given is None else given
        if not isinstance(given, dict):
            raise ConfigError(
                f"options of {self.owner} must be a mapping, got {type(given).__name__}"
            )
        out = dict(self.defaults) if fill else {}
        for key, value in given.items():
            if key not in self.options:
                raise self.unknown(key)
            out[key] = self.options[key].check(value, self.owner)
        if fill:
            missing = [o for o in self if o.required and out.get(o.name) is None]
            if missing:
                o = missing[0]
                raise ConfigError(f"{self.owner} needs option {o.name!r}: {o.help}")
        for rule in self.checks:
            msg = rule({**self.defaults, **out})
            if msg:
                raise ConfigError(f"{self.owner}: {msg}")
        return out

    def help(self) -> str:
        return "\n".join(f"{o.name}={o.default!r}: {o.help} ({o.describe()})" for o in self)


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "choice": str,
          "size": "str | int", "int_list": list[int], "json": Any}  # fmt: skip


def declared_by(table: OptionTable):
    """Class decorator (put it under ``@dataclass``): one field per option of ``table``, with
    the option's default, so a typed config is its table and nothing more; the class adds only
    fields that are not options (nested mappings, lists of names). A field written both in the
    class and in the table is an error: every option is declared once."""

    def wrap(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        twice = sorted(set(own) & set(table.options))
        if twice:
            raise TypeError(f"{cls.__name__}: {twice} are declared in {table.owner} already")
        annotations = {}
        for o in table:
            t = _TYPES[o.kind]
            annotations[o.name] = f"{t} | None" if o.nullable and isinstance(t, str) else (
                t | None if o.nullable else t)  # fmt: skip
            default = o.default
            if isinstance(default, (list, dict)):
                setattr(cls, o.name, dataclasses.field(
                    default_factory=lambda d=default: type(d)(d)))  # fmt: skip
            else:
                setattr(cls, o.name, default)
        cls.__annotations__ = {**annotations, **own}
        cls.__options__ = table
        return cls

    return wrap


# ------------------------------------------------------------------ command-line flags

#: what a nullable option's flag takes for null: ``--subset all``, ``--max-latency-ms none``
NULL_WORDS = ("all", "none", "null")


class _Null:
    """A nullable option's flag given as 'all' / 'none' (a flag not given parses to None)."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


def flag_name(option: Option, rename: dict[str, str] | None = None) -> str:
    """``--batch-size`` for option ``batch_size`` (``rename``: option name -> flag name)."""
    return "--" + (rename or {}).get(option.name, option.name).replace("_", "-")


def describe_flag(option: Option) -> str:
    """What a flag of ``option`` takes, in words (the declaration's, in command-line terms)."""
    text = option.describe().removesuffix(" (or null)")
    if option.kind == "int_list":
        text = text.replace("a list of ints", "comma-separated ints", 1)
        if option.empty:
            text += " ('' for none)"
    if option.kind == "json":
        text += " (JSON)"
    if option.nullable:
        text += ", or " + " / ".join(repr(w) for w in NULL_WORDS[:2]) + " for null"
    return text


def flag_type(option: Option) -> Callable[[str], Any]:
    """The argparse ``type`` of a flag of ``option``: text -> the checked value, or NULL for a
    nullable option's 'all' / 'none'; anything the declaration refuses is an argparse error."""
    import argparse

    def convert(text: str):
        t = text.strip()
        if option.nullable and t.lower() in NULL_WORDS:
            return NULL
        k = option.kind
        try:
            if k == "int":
                value: Any = int(t)
            elif k == "float":
                value = float(t)
            elif k == "bool":
                if t.lower() not in ("true", "false"):
                    raise ValueError(t)
                value = t.lower() == "true"
            elif k == "int_list":
                value = [int(p) for p in t.split(",")] if t else []
            elif k == "json":
                import json

                value = json.loads(t)
            else:  # str, choice, size
                value = t
            return option.check(value)
        except (ValueError, ConfigError):
            raise argparse.ArgumentTypeError(
                f"expected {describe_flag(option)}, got {text!r}"
            ) from None

    convert.__name__ = option.kind
    return convert


def add_arguments(
    parser,
    table: OptionTable,
    names: Iterable[str] | None = None,
    rename: dict[str, str] | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """One ``--flag`` per option of ``table`` on an argparse ``parser`` (``names``: only these;
    ``exclude``: not these; ``rename``: option name -> flag name). The flag converts and checks
    its text by the option's declaration (ints, numbers, ``true`` / ``false``, a choice,
    comma-separated int lists, 'all' / 'none' for a nullable option's null), its help is the
    option's help and what is valid, and its default is None: "not given", so that the
    config's default, the table's, applies (:func:`given` collects the given ones). A required
    option's flag is required. Returns the option names that got a flag."""
    wanted = None if names is None else set(names)
    skip = set(exclude)
    unknown = sorted(((wanted or set()) | skip | set(rename or {})) - set(table.options))
    if unknown:
        raise ValueError(f"{table.owner} has no option(s) {unknown}")
    added = []
    for o in table:
        if (wanted is not None and o.name not in wanted) or o.name in skip:
            continue
        default = "required" if o.required else f"default: {_shown_default(o)}"
        kw: dict[str, Any] = {
            "dest": o.name,
            "default": None,
            "type": flag_type(o),
            "help": f"{o.help} [{describe_flag(o)}; {default}]".replace("%", "%%"),
        }
        flag = flag_name(o, rename)
        if o.kind == "choice":
            kw["metavar"] = "{" + ",".join(map(str, o.choices)) + "}"
        else:
            kw["metavar"] = flag[2:].upper().replace("-", "_")
        if o.required:
            kw["required"] = True
        parser.add_argument(flag, **kw)
        added.append(o.name)
    return added


def _shown_default(o: Option) -> str:
    if o.default is None:
        return "null"
    if isinstance(o.default, bool):
        return str(o.default).lower()
    if o.kind == "int_list":
        return ",".join(map(str, o.default)) or "''"
    return str(o.default)


def given(args, table: OptionTable) -> dict[str, Any]:
    """The options of ``table`` whose flags were given in ``args`` (an argparse namespace from
    :func:`add_arguments`), by option name; a nullable option's 'all' / 'none' is None."""
    out = {}
    for o in table:
        value = getattr(args, o.name, None)
        if value is not None:
            out[o.name] = None if value is NULL else value
    return out
