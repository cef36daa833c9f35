"""Mean-field Gaussian variational layers (Bayes by backprop, Blundell et al., 2015).

Every row of a batch is its own posterior sample, so repeating the input S times draws S
samples in one pass. How a row's sample is realised:

* ``VariationalLinear``: the local reparameterisation trick (Kingma et al., 2015). Each output
  unit depends on its own row of the weight matrix, so sampling every pre-activation from its
  Gaussian is *exactly* the distribution given by a per-example weight sample, at the cost of
  two matrix products. That holds for inputs ``[B, in]``; on inputs with positions
  (``[B, T, in]`` tokens, ``[B, H, W, in]`` pixels) the positions of one example share its
  weight sample, as in a convolution, so such inputs take the convolution's estimators below.
* ``VariationalConv2d``: a convolution weight is shared by every output position, so the
  outputs of one example are correlated across positions; sampling each position
  independently (local reparameterisation) is not a weight sample and underestimates the
  variance after pooling by about the number of positions. Two exact estimators instead:
  ``estimator='flipout'`` (Wen et al., 2018): one perturbation ``dW ~ N(0, sigma^2)`` per pass,
  decorrelated between rows by random signs, ``conv(x, mu) + conv(x * s_in, dW) * s_out``; each
  row's effective weight ``mu + dW * (s_out s_in^T)`` is marginally an exact posterior sample
  (rows are uncorrelated, not independent). ``estimator='grouped'``: an independent weight per
  row, applied as one grouped convolution (memory: batch x weight size). Flipout is the
  default: it is the faster on the bench's networks (``benchmarks/variational_conv.py``).
  Biases are sampled per row in both (a bias is per channel, shared by all positions).

KL convention: ``kl()`` returns ``KL(q || p)`` summed over all of the layer's weights and
biases (closed form, Gaussian prior ``N(0, prior_sigma^2)``). The training loss divides the
model's total KL by the training-set size: ``loss = NLL_mean + kl_weight * KL / N``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..options import Option, OptionTable

ESTIMATORS = ("flipout", "grouped")

VARIATIONAL_OPTIONS = OptionTable(
    "layer kind 'variational'",
    [
        Option("prior_sigma", "float", 1.0, "standard deviation of the N(0, s^2) prior",
               low=0.0, low_open=True, log=True),
        Option("init_sigma", "float", 1e-3, "initial posterior standard deviation",
               low=0.0, low_open=True, log=True),
        Option("estimator", "choice", "flipout", "how a convolution draws a weight sample per "
               "row: flipout or grouped (independent weights); Linear layers are exact anyway",
               choices=ESTIMATORS),
    ],
)  # fmt: skip


def gaussian_kl(mu: torch.Tensor, sigma: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """Sum over elements of ``KL(N(mu, sigma^2) || N(0, prior_sigma^2))``."""
    var_ratio = (sigma / prior_sigma) ** 2
    return 0.5 * (var_ratio + (mu / prior_sigma) ** 2 - 1.0 - torch.log(var_ratio)).sum()


def _signs(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=like.dtype).bernoulli_(0.5).mul_(2).sub_(1)


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
        estimator: str = "flipout",
    ) -> None:
        super().__init__()
        VARIATIONAL_OPTIONS.resolve(
            {"prior_sigma": prior_sigma, "init_sigma": init_sigma, "estimator": estimator}
        )
        self.in_features, self.out_features = in_features, out_features
        self.prior_sigma = prior_sigma
        self.estimator = estimator  # for inputs with positions ([B, ..., in]; see forward)
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
        new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            new.weight_mu.copy_(layer.weight)
            if layer.bias is not None:
                new.bias_mu.copy_(layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = F.linear(x, self.weight_mu, self.bias_mu)
        if not self.sample:
            return mean
        if x.dim() > 2:  # positions (tokens, pixels) share their example's weight sample
            return self._forward_positions(x, mean)
        w_var, b_var = self._variances()
        var = F.linear(x * x, w_var, b_var)
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def _forward_positions(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """``x [B, ..., in]``: one weight sample per example, shared by all its positions (as
        for a convolution; local reparameterisation would draw every position independently
        and underestimate the variance of anything pooled over them): Flipout or an
        independent weight per example (``grouped``), then a bias sample per example."""
        B, mid = x.shape[0], (1,) * (x.dim() - 2)
        w_sigma = self.sigma(self.weight_rho)
        if self.estimator == "flipout":
            dW = w_sigma * torch.randn_like(w_sigma)
            s_in = _signs((B, *mid, self.in_features), x)
            s_out = _signs((B, *mid, self.out_features), x)
            out = mean + F.linear(x * s_in, dW) * s_out
        else:
            eps = torch.randn((B, *w_sigma.shape), device=x.device, dtype=x.dtype)
            dW = w_sigma * eps  # [B, out, in]
            xf = x.reshape(B, -1, self.in_features)
            out = mean + torch.bmm(xf, dW.transpose(1, 2)).reshape(mean.shape)
        if self.bias_mu is not None:
            b = self.sigma(self.bias_rho) * torch.randn(
                (B, *mid, self.out_features), device=x.device, dtype=x.dtype
            )
            out = out + b
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, prior_sigma={self.prior_sigma}"


class VariationalConv2d(_Variational):
    """Mean-field Gaussian Conv2d; every row of the batch is one weight sample (see the module
    docstring for the ``flipout`` and ``grouped`` estimators)."""

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
        padding_mode: str = "zeros",
        prior_sigma: float = 1.0,
        init_sigma: float = 1e-3,
        estimator: str = "flipout",
    ) -> None:
        super().__init__()
        VARIATIONAL_OPTIONS.resolve(
            {"prior_sigma": prior_sigma, "init_sigma": init_sigma, "estimator": estimator}
        )
        ref = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode,
        )  # fmt: skip
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = ref.kernel_size, ref.stride, ref.padding
        self.dilation, self.groups, self.padding_mode = ref.dilation, ref.groups, padding_mode
        self._pad = ref._reversed_padding_repeated_twice
        self.prior_sigma = prior_sigma
        self.estimator = estimator
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
            layer.padding_mode,
            **kw,
        )
        new = new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            new.weight_mu.copy_(layer.weight)
            if layer.bias is not None:
                new.bias_mu.copy_(layer.bias)
        return new

    def _conv(self, x, w, groups=None):
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            padding = 0
        return F.conv2d(
            x,
            w,
            None,
            self.stride,
            padding,
            self.dilation,
            self.groups if groups is None else groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sample:
            out = self._conv(x, self.weight_mu)
            return out if self.bias_mu is None else out + self.bias_mu.view(1, -1, 1, 1)
        w_sigma = self.sigma(self.weight_rho)
        B = x.shape[0]
        if self.estimator == "flipout":
            dW = w_sigma * torch.randn_like(w_sigma)
            s_in = _signs((B, self.in_channels, 1, 1), x)
            s_out = _signs((B, self.out_channels, 1, 1), x)
            out = self._conv(x, self.weight_mu) + self._conv(x * s_in, dW) * s_out
        else:  # grouped: an independent weight per row, one grouped convolution
            eps = torch.randn((B, *w_sigma.shape), device=x.device, dtype=x.dtype)
            w = (self.weight_mu + w_sigma * eps).reshape(-1, *w_sigma.shape[1:])
            out = self._conv(x.reshape(1, -1, *x.shape[2:]), w, self.groups * B)
            out = out.reshape(B, self.out_channels, *out.shape[2:])
        if self.bias_mu is not None:
            b_sigma = self.sigma(self.bias_rho)
            b = self.bias_mu + b_sigma * torch.randn(
                B, self.out_channels, device=x.device, dtype=x.dtype
            )
            out = out + b[:, :, None, None]
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, prior_sigma={self.prior_sigma}, estimator={self.estimator}"
        )
