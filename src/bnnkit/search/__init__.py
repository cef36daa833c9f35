"""Bayesian-layer placement search: plans as data, the space of plans over a backbone."""

from ..plan import PlacementPlan, convertible_layers
from .space import DEFAULT_KINDS, SearchSpace, search_units

__all__ = ["PlacementPlan", "SearchSpace", "search_units", "convertible_layers", "DEFAULT_KINDS"]
