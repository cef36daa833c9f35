"""Layers only, plain PyTorch: ensembles, variational layers, MC dropout."""

from .dropout import MCDropout, MCDropoutConv2d, MCDropoutLinear
from .ensemble import (
    BatchEnsembleConv2d,
    BatchEnsembleLinear,
    EnsembleBatchNorm2d,
    EnsembleModule,
    member_mode,
    member_pass,
)
from .lpbnn import FactorVAE, LPBNNConv2d, LPBNNLinear
from .rank1 import Rank1Conv2d, Rank1Linear
from .utils import aux_loss, count_parameters, kl_divergence
from .variational import VariationalConv2d, VariationalLinear, gaussian_kl

__all__ = [
    "BatchEnsembleLinear",
    "BatchEnsembleConv2d",
    "EnsembleBatchNorm2d",
    "EnsembleModule",
    "member_mode",
    "member_pass",
    "Rank1Linear",
    "Rank1Conv2d",
    "LPBNNLinear",
    "LPBNNConv2d",
    "FactorVAE",
    "aux_loss",
    "VariationalLinear",
    "VariationalConv2d",
    "gaussian_kl",
    "MCDropout",
    "MCDropoutLinear",
    "MCDropoutConv2d",
    "kl_divergence",
    "count_parameters",
]
