"""Mean-field Gaussian variational layers (Bayes by backprop, Blundell et al., 2015).

Forward passes use the local reparameterisation trick (Kingma et al., 2015): the
pre-activations are sampled per example from their Gaussian, which lowers gradient
variance and makes every row of a batch an independent weight sample (so repeating the
input S times draws S posterior samples in one pass).

KL convention: ``kl()`` returns ``KL(q || p)`` summed over all of the layer's weights and
biases (closed form, Gaussian prior ``N(0, prior_sigma^2)``). The training loss divides the
model's total KL by the training-set size: ``loss = NLL_mean + kl_weight * KL / N``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """Sum over elements of ``KL(N(mu, sigma^2) || N(0, prior_sigma^2))``."""
    var_ratio = (sigma / prior_sigma) ** 2
    return 0.5 * (var_ratio + (mu / prior_sigma) ** 2 - 1.0 - torch.log(var_ratio)).sum()


class _Variational(nn.Module):
    prior_sigma: float

    def _init_rho(self, init_sigma: float) -> float:
        return math.log(math.expm1(init_sigma))

    def sigma(self, rho: torch.Tensor) -> torch.Tensor:
        return F.softplus(rho)

    def kl(self) -> torch.Tensor:
        total = gaussian_kl(self.weight_mu, self.sigma(self.weight_rho), self.prior_sigma)
        if self.bias_mu is not None:
            total = total + gaussian_kl(self.bias_mu, self.sigma(self.bias_rho), self.prior_sigma)
        return total

    def _variances(self):
        """Posterior variances of the weights and (if any) biases."""
        b_var = None if self.bias_mu is None else self.sigma(self.bias_rho) ** 2
        return self.sigma(self.weight_rho) ** 2, b_var


class VariationalLinear(_Variational):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        prior_sigma: float = 1.0,
        init_sigma: float = 1e-3,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.prior_sigma = prior_sigma
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_rho = nn.Parameter(torch.full((out_features, in_features), 0.0))
        self.bias_mu = nn.Parameter(torch.empty(out_features)) if bias else None
        self.bias_rho = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if bias:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias_mu, -bound, bound)
        rho = self._init_rho(init_sigma)
        with torch.no_grad():
            self.weight_rho.fill_(rho)
            if bias:
                self.bias_rho.fill_(rho)
        self.sample = True  # set False for the posterior-mean network

    @classmethod
    def from_dense(cls, layer: nn.Linear, **kw):
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, **kw)
        with torch.no_grad():
            new.weight_mu.copy_(layer.weight)
            if layer.bias is not None:
                new.bias_mu.copy_(layer.bias)
        return new.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.linear(x, self.weight_mu, self.bias_mu)
        if not self.sample:
            return mean
        w_var, b_var = self._variances()
        var = F.linear(x * x, w_var, b_var)
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, prior_sigma={self.prior_sigma}"


class VariationalConv2d(_Variational):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        prior_sigma: float = 1.0,
        init_sigma: float = 1e-3,
    ) -> None:
        super().__init__()
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation, self.groups = (
            ref.stride,
            ref.padding,
            ref.dilation,
            ref.groups,
        )
        self.prior_sigma = prior_sigma
        self.weight_mu = nn.Parameter(ref.weight.detach().clone())
        self.weight_rho = nn.Parameter(torch.full_like(ref.weight, self._init_rho(init_sigma)))
        if bias:
            self.bias_mu = nn.Parameter(ref.bias.detach().clone())
            self.bias_rho = nn.Parameter(torch.full_like(ref.bias, self._init_rho(init_sigma)))
        else:
            self.bias_mu = self.bias_rho = None
        self.sample = True

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, **kw):
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            **kw,
        )
        with torch.no_grad():
            new.weight_mu.copy_(layer.weight)
            if layer.bias is not None:
                new.bias_mu.copy_(layer.bias)
        return new.to(layer.weight.device)

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self._conv(x, self.weight_mu, self.bias_mu)
        if not self.sample:
            return mean
        w_var, b_var = self._variances()
        var = self._conv(x * x, w_var, b_var)
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, prior_sigma={self.prior_sigma}"
