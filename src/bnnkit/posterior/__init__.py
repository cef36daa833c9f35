"""Symmetry-aware exploration of posteriors (Laurent et al., ICLR 2024): permutation and scaling
symmetries of networks, canonical forms and alignment, and measures between sets of networks."""

from .mmd import MMDAggResult, mmd2, mmd_agg_test
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
from .scaling import ScalingSpec, balance, balancing_scales, random_scales, rescale, scaling_spec

__all__ = [
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
]
