"""A placement plan as data: which layers are Bayesian, of which kind, with how many members and
samples, and the kinds' options. The one object the bench, ``bnnkit train --plan`` and the
placement search share; :meth:`PlacementPlan.apply` is :func:`bnnkit.bayesify`.

JSON form (``plan.json``)::

    {"layers": {"fc2": "mc_dropout", "fc3": "batch_ensemble"}, "members": 4, "samples": 2,
     "options": {"mc_dropout": {"p": 0.1}}}

``layers`` names layers exactly (the convertible ``nn.Linear`` / ``nn.Conv2d`` modules of the
model, as ``named_modules`` spells them) or by glob pattern; every other layer stays
deterministic.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import io
from .convert import CONVERTIBLE, KINDS, bayesify, kind_options
from .errors import ConfigError, unknown_name
from .models import Folded
from .options import Option

MEMBERS = Option("members", "int", 1, "ensemble members (>= 2 with an ensemble kind)", low=1)
SAMPLES = Option("samples", "int", 1, "stochastic passes per member at prediction", low=1)


def convertible_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, CONVERTIBLE)]


@dataclass(frozen=True)
class PlacementPlan:
    layers: dict[str, str]
    members: int = 1
    samples: int = 1
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ checks
    def check(self) -> PlacementPlan:
        """Model-independent checks: kinds, members, samples, options."""
        if not isinstance(self.layers, dict) or not self.layers:
            raise ConfigError("a placement plan needs 'layers': {layer name or pattern: kind}")
        for name, kind in self.layers.items():
            if not isinstance(name, str) or not isinstance(kind, str):
                raise ConfigError(f"plan entry {name!r}: {kind!r} must map a name to a kind")
            if kind not in KINDS:
                raise unknown_name("layer kind", kind, KINDS)
        MEMBERS.check(self.members, "placement plan")
        SAMPLES.check(self.samples, "placement plan")
        kinds = set(self.layers.values())
        ensemble = {k for k in kinds if KINDS[k].ensemble}
        if ensemble and self.members < 2:
            raise ConfigError(
                f"ensemble kind(s) {sorted(ensemble)} need members >= 2, got {self.members}"
            )
        if self.members > 1 and not ensemble:
            raise ConfigError(
                f"members={self.members} but the plan has no ensemble kind "
                "(batch_ensemble, rank1, lpbnn); use members=1"
            )
        sampled = {k for k in kinds if k not in ("deterministic", "batch_ensemble")}
        if self.samples > 1 and not sampled:
            raise ConfigError(
                f"samples={self.samples} but no layer of the plan is stochastic (every sample "
                "would be the same); use samples=1"
            )
        if not isinstance(self.options, dict):
            raise ConfigError("plan 'options' must map a layer kind to its options")
        for kind, opts in self.options.items():
            if kind not in kinds:
                raise ConfigError(
                    f"plan options given for kind {kind!r}, which no layer of the plan uses"
                )
            kind_options(kind, opts)
        return self

    def resolve(self, model: nn.Module) -> dict[str, str]:
        """``{layer: kind}`` for every convertible layer of ``model`` (checked against it)."""
        self.check()
        names = convertible_layers(model)
        resolved = {}
        for pattern in self.layers:
            hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ConfigError(
                    f"plan layer {pattern!r} matches no Linear/Conv2d layer of the model; its "
                    "layers are: " + ", ".join(names)
                )
        for n in names:
            kind = self.layers.get(n)
            if kind is None:
                kind = next(
                    (k for p, k in self.layers.items() if fnmatch.fnmatchcase(n, p)),
                    "deterministic",
                )
            resolved[n] = kind
        return resolved

    def apply(self, model: nn.Module) -> Folded:
        """The converted network (a copy; ``model`` is left as it is)."""
        self.resolve(model)
        return bayesify(model, dict(self.layers), members=self.members, options=self.options)

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": dict(self.layers),
            "members": self.members,
            "samples": self.samples,
            "options": {k: dict(v) for k, v in self.options.items()},
        }

    def describe(self) -> str:
        """One line for tables: ``conv2: rank1, fc3: mc_dropout(p=0.1); 4 members x 2 samples``
        (layers not named are deterministic)."""
        parts = []
        for name, kind in self.layers.items():
            opts = self.options.get(kind, {})
            extra = "(" + ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) + ")"
            parts.append(f"{name}: {kind}{extra if opts else ''}")
        return f"{', '.join(parts)}; {self.members} members x {self.samples} samples"

    def key(self) -> str:
        """Canonical JSON: equal plans have equal keys (evaluation caches, duplicates)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> PlacementPlan:
        if not isinstance(d, dict):
            raise ConfigError(f"a placement plan must be a JSON object, got {d!r}")
        unknown = set(d) - {"layers", "members", "samples", "options"}
        if unknown:
            raise ConfigError(
                f"unknown key(s) {sorted(unknown)} in the placement plan; valid: layers, "
                "members, samples, options"
            )
        if "layers" not in d:
            raise ConfigError("a placement plan needs 'layers': {layer name or pattern: kind}")
        return cls(
            dict(d["layers"]) if isinstance(d["layers"], dict) else d["layers"],
            d.get("members", 1),
            d.get("samples", 1),
            d.get("options", {}),
        ).check()

    def save(self, path: str | Path) -> None:
        io.atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def coerce(cls, value) -> PlacementPlan:
        """A plan from a plan, its dict form, or the path of a ``plan.json``."""
        if isinstance(value, PlacementPlan):
            return value.check()
        if isinstance(value, (str, Path)):
            return cls.load(value)
        return cls.from_dict(value)

    @classmethod
    def load(cls, path: str | Path) -> PlacementPlan:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"plan file {path} does not exist")
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"plan file {path} is not valid JSON: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"plan file {path} is not a UTF-8 text file: {e.reason}") from e
        return cls.from_dict(d)
