"""Post-hoc linearised Laplace approximations: subnetwork (full covariance), last layer,
diagonal. Plain PyTorch: works on any classifier ``x -> logits [B, C]`` and on bnnkit models."""

from .jacobians import SubnetJacobian, param_slots
from .posterior import (
    DiagLaplace,
    LastLayerLaplace,
    SubnetLaplace,
    as_logits_model,
    laplace_from_state,
    probit_probs,
)
from .subnet import (
    STRATEGIES,
    VARIANCE_RULES,
    diagonal_statistics,
    last_layer_indices,
    name_indices,
    select_subnetwork,
    swag_variance,
)

__all__ = [
    "SubnetLaplace",
    "LastLayerLaplace",
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
    "probit_probs",
    "STRATEGIES",
    "VARIANCE_RULES",
]
