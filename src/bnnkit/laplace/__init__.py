"""Post-hoc linearised Laplace approximations: subnetwork (full covariance), last layer,
diagonal. Plain PyTorch: works on any classifier ``x -> logits [B, C]`` and on bnnkit models;
:class:`PixelLastLayerLaplace` is the last-layer Laplace of segmentation networks."""

from .base import LINKS, as_logits_model, probit_probs
from .diagonal import DiagLaplace
from .jacobians import SubnetJacobian, param_slots
from .last_layer import LastLayerLaplace, last_layer_indices
from .pixel import PixelLastLayerLaplace
from .selection import (
    STRATEGIES,
    VARIANCE_RULES,
    diagonal_statistics,
    name_indices,
    select_subnetwork,
    swag_variance,
)
from .state import check_subnetwork, laplace_from_state
from .subnetwork import SubnetLaplace

__all__ = [
    "SubnetLaplace",
    "LastLayerLaplace",
    "PixelLastLayerLaplace",
    "DiagLaplace",
    "SubnetJacobian",
    "select_subnetwork",
    "diagonal_statistics",
    "swag_variance",
    "last_layer_indices",
    "name_indices",
    "param_slots",
    "as_logits_model",
    "laplace_from_state",
    "check_subnetwork",
    "probit_probs",
    "LINKS",
    "STRATEGIES",
    "VARIANCE_RULES",
]
