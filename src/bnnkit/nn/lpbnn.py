"""LP-BNN layers (Franchi et al., 2020): BatchEnsemble whose input factors come from a VAE.

Each layer keeps BatchEnsemble's shared weight ``W``, output factors ``s_m`` and biases
``b_m``; its input factors ``r_m`` are *encoded* by a small per-layer VAE
(``encoder: in -> hidden -> (mu, logvar)`` of size ``latent``, ``decoder: latent -> in``).
In every forward pass each row of the folded batch draws ``z ~ N(mu_m, diag(exp(logvar_m)))``
for its member ``m`` and uses ``decoder(z)`` as its factor, so prediction with ``samples=K``
gives K samples per member in one pass. With ``sample=False`` the latent mean is decoded.

Training adds the VAE's negative ELBO times ``vae_weight``:
``aux_loss() = mean (decoder(z) - r)^2 + mean KL(q(z|r) || N(0, I))`` (means over members, rows
and dimensions, so layers of any width weigh alike). It ties the decoded
factors to the learnt embedding ``r`` while keeping the latent distribution wide enough to
sample from. ``aux_loss`` refers to the most recent training forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .ensemble import _split, init_factors


class FactorVAE(nn.Module):
    """The per-layer VAE over rank-1 vectors of size ``dim``."""

    def __init__(self, dim: int, latent: int = 32, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or latent
        self.encoder = nn.Linear(dim, hidden)
        self.mean = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Linear(latent, dim)
        with torch.no_grad():  # start near-deterministic so early training sees r itself
            self.logvar.bias.fill_(-6.0)

    def encode(self, v: torch.Tensor):
        h = F.relu(self.encoder(v))
        return self.mean(h), self.logvar(h).clamp(-12.0, 6.0)

    def forward(self, v: torch.Tensor, n: int, sample: bool):
        """Decoded factors ``[M, n, dim]`` for ``v [M, dim]`` plus the ELBO terms."""
        mu, logvar = self.encode(v)
        M = v.shape[0]
        if sample:
            eps = torch.randn(M, n, mu.shape[-1], device=v.device, dtype=v.dtype)
            z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        else:
            z = mu.unsqueeze(1).expand(M, n, mu.shape[-1])
        decoded = self.decoder(z)
        recon = ((decoded - v.unsqueeze(1)) ** 2).mean()
        kl = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).mean()
        return decoded, recon, kl

    def neg_elbo(self, v: torch.Tensor, n: int = 1) -> torch.Tensor:
        _, recon, kl = self(v, n, True)
        return recon + kl


class _LPBNNBase(nn.Module):
    def _setup(self, in_dim: int, out_dim: int, members: int, latent, factor_init, vae_weight):
        if members < 1:
            raise InputError(f"members must be >= 1, got {members}")
        if latent < 1:
            raise InputError(f"latent size must be >= 1, got {latent}")
        self.members = members
        self.r = nn.Parameter(torch.empty(members, in_dim))
        self.s = nn.Parameter(torch.empty(members, out_dim))
        init_factors(self.r, factor_init)
        init_factors(self.s, factor_init)
        self.vae = FactorVAE(in_dim, latent)
        self.vae_weight = vae_weight
        self.sample = True
        self._aux: torch.Tensor | None = None

    def _factors(self, n: int) -> torch.Tensor:
        decoded, recon, kl = self.vae(self.r, n, self.sample)
        if self.training:
            self._aux = self.vae_weight * (recon + kl)
        return decoded

    def aux_loss(self) -> torch.Tensor:
        """``vae_weight`` x negative ELBO of the latest training forward pass (0 before any)."""
        if self._aux is None:
            return self.r.new_zeros(())
        return self._aux


class LPBNNLinear(_LPBNNBase):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        members: int,
        bias: bool = True,
        latent: int = 32,
        factor_init: str = "normal",
        vae_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.empty(members, out_features)) if bias else None
        if bias:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self._setup(in_features, out_features, members, latent, factor_init, vae_weight)

    @classmethod
    def from_dense(cls, layer: nn.Linear, members: int, **kw):
        new = cls(layer.in_features, layer.out_features, members, layer.bias is not None, **kw)
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias.expand(members, -1))
        return new.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M = self.members
        _split(x, M)
        xm = x.reshape(M, -1, self.in_features)
        y = F.linear(xm * self._factors(xm.shape[1]), self.weight) * self.s.unsqueeze(1)
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, members={self.members}"


class LPBNNConv2d(_LPBNNBase):
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
        latent: int = 32,
        factor_init: str = "normal",
        vae_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.bias = nn.Parameter(torch.empty(members, out_channels)) if bias else None
        if bias:
            bound = 1 / math.sqrt(self.conv.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        self._setup(in_channels, out_channels, members, latent, factor_init, vae_weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, members: int, **kw):
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            members,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            **kw,
        )
        with torch.no_grad():
            new.conv.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias.expand(members, -1))
        return new.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        M = self.members
        n = _split(x, M)
        r = self._factors(n)[..., None, None]
        xm = x.reshape(M, n, *x.shape[1:]) * r
        y = self.conv(xm.reshape(x.shape))
        y = y.reshape(M, n, *y.shape[1:]) * self.s.view(M, 1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(M, 1, -1, 1, 1)
        return y.reshape(M * n, *y.shape[2:])

    def extra_repr(self) -> str:
        return f"members={self.members}, latent={self.vae.mean.out_features}"
