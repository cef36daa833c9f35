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

import torch
import torch.nn.functional as F
from torch import nn

from ..options import Option, OptionTable
from .ensemble import (
    BATCH_ENSEMBLE_OPTIONS,
    Rank1StructureConv2d,
    Rank1StructureLinear,
    _LearntFactors,
)

LPBNN_OPTIONS = OptionTable(
    "layer kind 'lpbnn'",
    [
        Option("latent", "int", 32, "latent size of each layer's VAE", low=1),
        BATCH_ENSEMBLE_OPTIONS["factor_init"],
        Option("vae_weight", "float", 1.0, "weight of the VAE's negative ELBO in the loss",
               low=0.0),
    ],
)  # fmt: skip


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
            z = mu.unsqueeze(1)  # [M, 1, latent]: one decoding per member
        decoded = self.decoder(z)
        recon = ((decoded - v.unsqueeze(1)) ** 2).mean()
        kl = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).mean()
        return decoded, recon, kl

    def neg_elbo(self, v: torch.Tensor, n: int = 1) -> torch.Tensor:
        _, recon, kl = self(v, n, True)
        return recon + kl


class _DecodedFactors(_LearntFactors):
    """LP-BNN factors: ``r`` decoded from a per-row latent sample of the VAE that encodes the
    learnt embedding ``r_m``; ``s`` learnt per member as in BatchEnsemble."""

    def _make_factors(self, in_dim: int, out_dim: int, latent, factor_init, vae_weight) -> None:
        LPBNN_OPTIONS.resolve(
            {"latent": latent, "factor_init": factor_init, "vae_weight": vae_weight}
        )
        super()._make_factors(in_dim, out_dim, factor_init)
        self.vae = FactorVAE(in_dim, latent)
        self.vae_weight = vae_weight
        self.sample = True
        self._aux: dict[int | None, torch.Tensor] = {}

    def _fixed_factors(self) -> bool:
        return not self.sample

    def factors(self, n: int, member: int | None = None):
        r, s = self._member_vectors(member)
        decoded, recon, kl = self.vae(r, n, self.sample)
        if self.training:
            # one entry per member in the members schedule (equal sizes: their mean is the
            # full-batch term), one entry (key None) in the fold schedule
            if member is None or member == 0:
                self._aux = {}
            self._aux[member] = self.vae_weight * (recon + kl)
        return decoded, s.unsqueeze(1)

    def aux_loss(self) -> torch.Tensor:
        """``vae_weight`` x negative ELBO of the latest training forward pass (0 before any)."""
        if not self._aux:
            return self.r.new_zeros(())
        return sum(self._aux.values()) / len(self._aux)


class LPBNNLinear(_DecodedFactors, Rank1StructureLinear):
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
        super().__init__(in_features, out_features, members, bias)
        self._make_factors(in_features, out_features, latent, factor_init, vae_weight)


class LPBNNConv2d(_DecodedFactors, Rank1StructureConv2d):
    def __init__(
        self, in_channels, out_channels, kernel_size, members, stride=1, padding=0, dilation=1,
        groups=1, bias=True, padding_mode="zeros", latent=32, factor_init="normal",
        vae_weight=1.0,
    ) -> None:  # fmt: skip
        super().__init__(
            in_channels, out_channels, kernel_size, members, stride, padding, dilation, groups,
            bias, padding_mode,
        )  # fmt: skip
        self._make_factors(in_channels, out_channels, latent, factor_init, vae_weight)

    def extra_repr(self) -> str:
        return f"members={self.members}, latent={self.vae.mean.out_features}"
