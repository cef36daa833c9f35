"""The space of placement plans over a backbone: for every searchable *unit* a layer kind, and
the members, samples and MC-dropout rate the chosen kinds need. A point of the space is exactly
a :class:`~bnnkit.search.plan.PlacementPlan`; the space enumerates or samples only valid plans
(ensemble kinds get members >= 2, samples only when some layer is stochastic).

Units: a residual block (a child of an ``nn.Sequential`` that holds several convertible layers,
e.g. ``layer2.0`` of a ResNet, named by the pattern ``layer2.0.*``) is one unit, so the whole
block changes kind together; every other ``Linear`` / ``Conv2d`` is a unit of its own.
``search_units(model, "parts")`` groups coarser, by the network's named parts (for a
segmentation network, e.g. DeepLabV3+: ``backbone.stem.0``, ``backbone.layer1.*`` ...
``backbone.layer4.*``, ``aspp.*``, ``decoder.*``, ``classifier``; see :func:`search_units`).

``sample(choose)`` asks ``choose(name, choices)`` for each decision in a fixed order (the
earliest unit that may be Bayesian, then every unit's kind, then members, samples and the
dropout rate where they apply), so an
Optuna trial drives it with ``lambda n, c: trial.suggest_categorical(n, c)`` and a seeded
``random.Random`` with ``lambda n, c: rng.choice(c)``; decisions that do not apply (members
without an ensemble kind) are not asked.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

from torch import nn

from ..convert import CONVERTIBLE, KINDS
from ..errors import ConfigError, unknown_name
from ..plan import PlacementPlan, convertible_layers

DEFAULT_KINDS = ("deterministic", "mc_dropout", "batch_ensemble", "rank1", "variational", "lpbnn")
NOT_SAMPLED = ("deterministic", "batch_ensemble")


#: how :func:`search_units` groups layers into units
GROUPINGS = ("blocks", "parts")


def _n_layers(module: nn.Module) -> int:
    return sum(isinstance(m, CONVERTIBLE) for m in module.modules())


def search_units(model: nn.Module, group: str = "blocks") -> list[str]:
    """Searchable units in execution-agnostic module order: block patterns or layer names.

    ``group="blocks"`` (the default): a residual block (module docstring) or a single layer.
    ``group="parts"``: one unit per top-level child of the network (``aspp.*``, ``decoder.*``),
    except that a child holding a chain of multi-layer parts (a backbone whose stages hold
    several layers each) is split into its own children (``backbone.layer1.*``); a unit with a
    single layer is named by that layer (``classifier``, ``backbone.stem.0``). On a network
    whose parts are single layers (a small U-Net's ``enc1.0``, ``dec.0``, ``head``) both give
    the same units."""
    if group == "parts":
        return _part_units(model)
    if group != "blocks":
        raise unknown_name("unit grouping", group, GROUPINGS)
    modules = dict(model.named_modules())
    units: list[str] = []
    for name in convertible_layers(model):
        parts = name.split(".")
        unit = name
        for k in range(1, len(parts)):
            anc, parent = ".".join(parts[:k]), ".".join(parts[: k - 1])
            mod = modules[anc]
            in_chain = isinstance(modules.get(parent, model) if parent else model, nn.Sequential)
            if (
                in_chain
                and not isinstance(mod, (nn.Sequential, *CONVERTIBLE))
                and sum(isinstance(m, CONVERTIBLE) for m in mod.modules()) > 1
            ):
                unit = anc + ".*"
                break
        if unit not in units:
            units.append(unit)
    return units


def _part_units(model: nn.Module) -> list[str]:
    modules = dict(model.named_modules())
    units: list[str] = []
    for name in convertible_layers(model):
        parts = name.split(".")
        top = modules[parts[0]]
        split = len(parts) > 2 and any(_n_layers(c) > 1 for c in top.children())
        anc = ".".join(parts[:2]) if split else parts[0]
        unit = anc + ".*" if _n_layers(modules[anc]) > 1 else name
        if unit not in units:
            units.append(unit)
    return units


class SearchSpace:
    def __init__(
        self,
        model: nn.Module,
        kinds: Sequence[str] = DEFAULT_KINDS,
        members: Sequence[int] = (2, 4),
        samples: Sequence[int] = (1, 2, 4, 8),
        dropout: Sequence[float] = (0.05, 0.1, 0.25),
        units: Sequence[str] | None = None,
    ) -> None:
        for k in kinds:
            if k not in KINDS:
                raise unknown_name("layer kind", k, KINDS)
        if "deterministic" not in kinds:
            raise ConfigError("the search space needs 'deterministic' among its kinds")
        if any(KINDS[k].ensemble for k in kinds) and not members:
            raise ConfigError("ensemble kinds in the space need members choices (>= 2)")
        for m in members:
            if not isinstance(m, int) or m < 2:
                raise ConfigError(f"members choices must be ints >= 2, got {m!r}")
        for s in samples:
            if not isinstance(s, int) or s < 1:
                raise ConfigError(f"samples choices must be ints >= 1, got {s!r}")
        if not samples:
            raise ConfigError("the space needs at least one samples choice")
        for p in dropout:
            if not 0.0 < float(p) < 1.0:
                raise ConfigError(f"dropout rates must lie in (0, 1), got {p!r}")
        self.model = model
        self.kinds = tuple(kinds)
        self.members = tuple(members)
        self.samples = tuple(samples)
        self.dropout = tuple(float(p) for p in dropout)
        self.units = list(units) if units is not None else search_units(model)
        probe = PlacementPlan({u: "deterministic" for u in self.units})
        probe.resolve(model)  # every unit names layers of the model

    # ------------------------------------------------------------------ one plan
    def _plan(self, assign: dict[str, str], members: int, samples: int, p: float | None):
        layers = {u: k for u, k in assign.items() if k != "deterministic"}
        if not layers:
            layers = {self.units[0]: "deterministic"}
        options = {"mc_dropout": {"p": p}} if p is not None else {}
        return PlacementPlan(layers, members, samples, options).check()

    def sample(self, choose: Callable[[str, list], object]) -> PlacementPlan:
        """One plan from the decisions of ``choose``. The first decision, ``first``, is the
        earliest unit that may be Bayesian (units before it stay deterministic): without it a
        uniform choice per unit makes late-Bayesian plans, the cheap ones with a long
        deterministic prefix, exponentially rare (the last unit alone: (1/k)^(n-1) of the plans
        for k kinds and n units). Every unit's kind is still asked, so a sampler sees the same
        decisions in every trial (NSGA-II crosses over only decisions all trials share)."""
        first = self.units.index(choose("first", list(self.units)))
        assign = {u: choose(f"kind:{u}", list(self.kinds)) for u in self.units}
        for u in self.units[:first]:
            assign[u] = "deterministic"
        kinds = set(assign.values())
        members = (
            choose("members", list(self.members)) if any(KINDS[k].ensemble for k in kinds) else 1
        )
        sampled = any(k not in NOT_SAMPLED for k in kinds)
        samples = choose("samples", list(self.samples)) if sampled else 1
        p = choose("dropout", list(self.dropout)) if "mc_dropout" in kinds else None
        return self._plan(assign, int(members), int(samples), p)

    def plans(self) -> Iterator[PlacementPlan]:
        """Every valid plan, each once (for small spaces and tests)."""
        for combo in itertools.product(self.kinds, repeat=len(self.units)):
            assign = dict(zip(self.units, combo))
            kinds = set(combo)
            members = self.members if any(KINDS[k].ensemble for k in kinds) else (1,)
            samples = self.samples if any(k not in NOT_SAMPLED for k in kinds) else (1,)
            rates = self.dropout if "mc_dropout" in kinds else (None,)
            for m, s, p in itertools.product(members, samples, rates):
                yield self._plan(assign, m, s, p)

    def size(self) -> int:
        return sum(1 for _ in self.plans())
