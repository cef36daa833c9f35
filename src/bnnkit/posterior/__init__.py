"""Symmetry-aware exploration of posteriors (Laurent et al., ICLR 2024): permutation and scaling
symmetries of networks, canonical forms and alignment, and measures between sets of networks."""

from .collect import collect_reference, collect_samples, collect_swag
from .collection import Collection, Member
from .graph import SymmetryWarning
from .independent import train_independent
from .mmd import MMDAggResult, mmd2, mmd_agg_test
from .modes import (
    barrier,
    count_modes,
    interpolate,
    largest_weight_index,
    pairwise_mutual_information,
    path_losses,
    uniformity_pvalue,
)
from .permutation import (
    Axis,
    PermutationSpec,
    align,
    canonical_permutation,
    canonicalize,
    compose,
    invert,
    permutation_spec,
    permute,
    random_permutation,
    weight_matching,
)
from .samples import network_samples
from .scaling import (
    BalanceWarning,
    ScalingSpec,
    balance,
    balancing_scales,
    random_scales,
    rescale,
    scaling_spec,
)
from .swag import SWAG, fit_swag, swag_states
from .tools import canonical_collection, compare, function_vectors

__all__ = [
    "SymmetryWarning",
    "BalanceWarning",
    "Axis",
    "PermutationSpec",
    "permutation_spec",
    "permute",
    "random_permutation",
    "compose",
    "invert",
    "canonical_permutation",
    "canonicalize",
    "weight_matching",
    "align",
    "ScalingSpec",
    "scaling_spec",
    "rescale",
    "random_scales",
    "balancing_scales",
    "balance",
    "mmd2",
    "mmd_agg_test",
    "MMDAggResult",
    "Collection",
    "Member",
    "train_independent",
    "collect_reference",
    "collect_samples",
    "collect_swag",
    "SWAG",
    "fit_swag",
    "swag_states",
    "network_samples",
    "canonical_collection",
    "compare",
    "function_vectors",
    "interpolate",
    "path_losses",
    "barrier",
    "count_modes",
    "pairwise_mutual_information",
    "largest_weight_index",
    "uniformity_pvalue",
]
