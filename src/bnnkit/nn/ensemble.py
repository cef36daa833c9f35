"""BatchEnsemble layers (Wen et al., 2020) on a member-major folded batch.

Ensemble folding convention (used by every ensemble layer in bnnkit):
the model repeats its input once at its entry to ``[M*n, ...]``, member-major, i.e. rows
``m*n : (m+1)*n`` belong to member ``m``. Each layer views its input as ``[M, n, ...]`` and
applies member ``m``'s parameters to chunk ``m``. No per-member tensor of the batch's size is
ever built by indexing or ``repeat_interleave``: the member factors broadcast over the chunk,
which keeps the extra work purely elementwise.

Member ``m``'s effective weight is ``W * (s_m r_m^T)``; computing ``((x * r_m) W^T) * s_m`` is
the same thing without forming M weight matrices.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


def _split(x: torch.Tensor, members: int) -> int:
    n = x.shape[0]
    if n % members:
        raise InputError(
            f"an ensemble layer with {members} members needs a batch that is a multiple of "
            f"{members} (member-major folded input), got batch {n}; wrap the model with "
            "bnnkit.models.Folded or repeat the input M times"
        )
    return n // members


def init_factors(t: torch.Tensor, init: str) -> None:
    """Initialise rank-1 factors: 'ones', 'normal' (mean 1, sd 0.5) or 'random_sign' (+-1)."""
    with torch.no_grad():
        if init == "ones":
            t.fill_(1.0)
        elif init == "normal":
            t.normal_(1.0, 0.5)
        elif init == "random_sign":
            t.bernoulli_(0.5).mul_(2).sub_(1)
        else:
            raise InputError(f"unknown factor init {init!r}; use 'ones', 'normal' or 'random_sign'")


class _Rank1Structure(nn.Module):
    """A layer with shared weight ``W`` and per-member rank-1 factors on a folded batch.

    Member ``m`` computes ``((x * r) W^T) * s + b_m``. Subclasses say where the factors come
    from through :meth:`factors`: learnt vectors (BatchEnsemble), samples from a posterior
    (rank-1 BNN) or decodings of a latent sample (LP-BNN). Factors of shape ``[M, 1, d]``
    broadcast over a member's rows; ``[M, n, d]`` gives every row its own draw.
    """

    members: int

    @abc.abstractmethod
    def factors(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output factors ``([M, 1 or n, in], [M, 1 or n, out])`` for ``n`` rows."""

    def _init_bias(self, out_dim: int, members: int, bias: bool, fan_in: int) -> None:
        if members < 1:
            raise InputError(f"members must be >= 1, got {members}")
        self.members = members
        self.bias = nn.Parameter(torch.empty(members, out_dim)) if bias else None
        if bias:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _scale_out(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y * s
        bias = self.bias.view(*self.bias.shape[:1], 1, *self.bias.shape[1:], *([1] * (s.dim() - 3)))
        return torch.addcmul(bias, y, s)


class Rank1StructureLinear(_Rank1Structure):
    """Linear member of the family: ``in_features -> out_features``."""

    def __init__(self, in_features: int, out_features: int, members: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._init_bias(out_features, members, bias, in_features)

    @classmethod
    def from_dense(cls, layer: nn.Linear, members: int, **kw):
        """Copy a trained ``nn.Linear`` into every member (its bias into every ``b_m``)."""
        new = cls(layer.in_features, layer.out_features, members, layer.bias is not None, **kw)
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias.expand(members, -1))
        return new.to(layer.weight.device, layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M = self.members
        _split(x, M)
        xm = x.reshape(M, -1, self.in_features)
        r, s = self.factors(xm.shape[1])
        y = self._scale_out(F.linear(xm * r, self.weight), s)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, members={self.members}"


class Rank1StructureConv2d(_Rank1Structure):
    """Conv2d member of the family: factors scale input and output channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        members: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        # the shared convolution holds W; its own bias is off (biases are per member)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self._init_bias(out_channels, members, bias, self.conv.weight[0].numel())

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, members: int, **kw):
        """Copy a trained ``nn.Conv2d`` into every member (its bias into every ``b_m``)."""
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            members,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            **kw,
        )
        with torch.no_grad():
            new.conv.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias.expand(members, -1))
        return new.to(layer.weight.device, layer.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M = self.members
        n = _split(x, M)
        r, s = self.factors(n)
        xm = x.reshape(M, n, *x.shape[1:]) * r[..., None, None]
        y = self.conv(xm.reshape(x.shape))
        y = self._scale_out(y.reshape(M, n, *y.shape[1:]), s[..., None, None])
        return y.reshape(M * n, *y.shape[2:])

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, members={self.members}"


class _LearntFactors:
    """BatchEnsemble's factors: one learnt vector pair per member."""

    def _make_factors(self, in_dim: int, out_dim: int, factor_init: str) -> None:
        self.factor_init = factor_init
        self.r = nn.Parameter(torch.empty(self.members, in_dim))
        self.s = nn.Parameter(torch.empty(self.members, out_dim))
        init_factors(self.r, factor_init)
        init_factors(self.s, factor_init)

    def factors(self, n: int):
        return self.r.unsqueeze(1), self.s.unsqueeze(1)


class BatchEnsembleLinear(_LearntFactors, Rank1StructureLinear):
    """``y_m = ((x * r_m) W^T) * s_m + b_m`` for member ``m`` of ``members``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        members: int,
        bias: bool = True,
        factor_init: str = "normal",
    ) -> None:
        super().__init__(in_features, out_features, members, bias)
        self._make_factors(in_features, out_features, factor_init)


class BatchEnsembleConv2d(_LearntFactors, Rank1StructureConv2d):
    """Conv2d with per-member input/output channel factors ``r_m``, ``s_m`` and bias ``b_m``."""

    def __init__(self, in_channels, out_channels, kernel_size, members, *args, factor_init="normal",
                 **kw) -> None:  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, members, *args, **kw)
        self._make_factors(in_channels, out_channels, factor_init)


class EnsembleBatchNorm2d(nn.Module):
    """One BatchNorm2d per member on a member-major folded batch (statistics per member)."""

    def __init__(self, num_features: int, members: int, eps: float = 1e-5, momentum=0.1):
        super().__init__()
        self.members, self.num_features = members, num_features
        # a BatchNorm over M*C channels: member m's channels are m*C:(m+1)*C
        self.bn = nn.BatchNorm2d(num_features * members, eps=eps, momentum=momentum)

    @classmethod
    def from_dense(cls, layer: nn.BatchNorm2d, members: int):
        new = cls(layer.num_features, members, layer.eps, layer.momentum)
        with torch.no_grad():
            if layer.affine:
                new.bn.weight.copy_(layer.weight.repeat(members))
                new.bn.bias.copy_(layer.bias.repeat(members))
            if layer.running_mean is not None:
                new.bn.running_mean.copy_(layer.running_mean.repeat(members))
                new.bn.running_var.copy_(layer.running_var.repeat(members))
        return new.to(layer.weight.device if layer.affine else "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M = self.members
        n = _split(x, M)
        C, H, W = x.shape[1:]
        # [M, n, C, H, W] -> [n, M*C, H, W]: one batch_norm call for all members
        z = x.reshape(M, n, C, H, W).transpose(0, 1).reshape(n, M * C, H, W)
        z = self.bn(z)
        return z.reshape(n, M, C, H, W).transpose(0, 1).reshape(M * n, C, H, W)

    def extra_repr(self) -> str:
        return f"{self.num_features}, members={self.members}"
