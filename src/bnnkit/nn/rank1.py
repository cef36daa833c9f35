"""Rank-1 Bayesian layers (Dusenberry et al., ICML 2020).

Each member ``m`` of the ensemble uses the weight ``W * (s_m r_m^T)`` with a shared ``W``
(a point estimate) and rank-1 factors ``r_m`` (input side) and ``s_m`` (output side) that carry
a variational posterior. The posterior over factors is a mixture with one component per member:
``q(r) = (1/M) sum_m q_m(r)``, each ``q_m`` a fully factorised Gaussian or Cauchy with its own
location and scale. The prior is centred at 1 (Gaussian or Cauchy, scale ``prior_scale``).

Sampling: every row of the (member-major, folded) batch draws its own factors from its member's
component ("per-example sampling"), so a training batch gives M*B independent samples and
``samples=K`` at prediction gives K samples per member in one pass.

KL: ``kl()`` returns ``(1/M) sum_m KL(q_m || p)`` summed over the layer's factors: an upper bound
on ``KL(q || p)`` of the mixture (convexity of the KL in its first argument), matching the loss's
average of the NLL over members. Closed form for Gaussian/Gaussian and Cauchy/Cauchy; for a
Gaussian posterior with a Cauchy prior an unbiased Monte Carlo estimate ``log q(z) - log p(z)``,
``z ~ q_m`` (``kl_samples`` draws per factor). A Cauchy posterior with a Gaussian prior has an
infinite KL and is refused.
With a zero posterior scale a rank-1 layer is exactly a BatchEnsemble layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..options import Option, OptionTable
from .ensemble import FACTOR_INITS, Rank1StructureConv2d, Rank1StructureLinear, init_factors

FAMILIES = ("gaussian", "cauchy")


def _proper_kl(o: dict) -> str | None:
    if o["posterior"] == "cauchy" and o["prior"] == "gaussian":
        return (
            "a Cauchy posterior with a Gaussian prior has an infinite KL divergence (the "
            "posterior's tails are heavier than the prior's), so the ELBO is undefined; use "
            "prior='cauchy' with posterior='cauchy', or posterior='gaussian'"
        )
    return None


RANK1_OPTIONS = OptionTable(
    "layer kind 'rank1'",
    [
        Option("posterior", "choice", "gaussian", "family of each member's posterior over "
               "r and s", choices=FAMILIES),
        Option("prior", "choice", "gaussian", "family of the prior (centred at 1)",
               choices=FAMILIES),
        Option("prior_scale", "float", 1.0, "scale of the prior", low=0.0, low_open=True,
               log=True),
        Option("init", "choice", "random_sign", "initialisation of the posterior locations",
               choices=FACTOR_INITS),
        Option("init_scale", "float", 0.01, "initial posterior scale (0: a BatchEnsemble)",
               low=0.0),
        Option("kl_samples", "int", 1, "Monte Carlo draws per factor where the KL has no "
               "closed form (Gaussian posterior, Cauchy prior)", low=1),
    ],
    checks=[_proper_kl],
)  # fmt: skip


def cauchy_kl(loc_q, scale_q, loc_p, scale_p) -> torch.Tensor:
    """Closed-form ``KL(Cauchy(loc_q, scale_q) || Cauchy(loc_p, scale_p))`` (Chyzak &
    Nielsen, 2019): ``log(((s_q + s_p)^2 + (l_q - l_p)^2) / (4 s_q s_p))``."""
    return torch.log(((scale_q + scale_p) ** 2 + (loc_q - loc_p) ** 2) / (4 * scale_q * scale_p))


class _Rank1Factors(nn.Module):
    """Per-member locations and scales of one factor vector, with sampling and KL."""

    def __init__(
        self,
        members: int,
        dim: int,
        posterior: str,
        prior: str,
        prior_scale: float,
        init: str,
        init_scale: float,
        kl_samples: int,
    ) -> None:
        super().__init__()
        self.members, self.dim = members, dim
        self.posterior, self.prior = posterior, prior
        self.prior_scale = prior_scale
        self.kl_samples = kl_samples
        self.loc = nn.Parameter(torch.empty(members, dim))
        init_factors(self.loc, init)
        rho = math.log(math.expm1(init_scale)) if init_scale > 0 else -30.0
        self.rho = nn.Parameter(torch.full((members, dim), rho))

    def scale(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def sample(self, n: int, sample: bool, member: int | None = None) -> torch.Tensor:
        """Factors for a folded batch of ``M*n`` rows, shape ``[M, n, dim]`` (``[1, n, dim]``
        for one ``member``); with ``sample=False`` the locations ``[M, 1, dim]``."""
        loc, rho = self.loc, self.rho
        if member is not None:
            loc, rho = loc[member : member + 1], rho[member : member + 1]
        loc = loc.unsqueeze(1)
        if not sample:
            return loc
        shape = (loc.shape[0], n, self.dim)
        if self.posterior == "gaussian":
            eps = torch.randn(shape, device=loc.device, dtype=loc.dtype)
        else:
            u = torch.rand(shape, device=loc.device, dtype=loc.dtype)
            eps = torch.tan(math.pi * (u - 0.5))
        return loc + F.softplus(rho).unsqueeze(1) * eps

    def kl(self) -> torch.Tensor:
        scale = self.scale()
        if self.posterior == "gaussian" and self.prior == "gaussian":
            ratio = (scale / self.prior_scale) ** 2
            per = 0.5 * (ratio + ((self.loc - 1.0) / self.prior_scale) ** 2 - 1 - torch.log(ratio))
            return per.sum() / self.members
        if self.posterior == "cauchy" and self.prior == "cauchy":
            return cauchy_kl(self.loc, scale, 1.0, self.prior_scale).sum() / self.members
        # Gaussian posterior, Cauchy prior: finite, no closed form; unbiased Monte Carlo
        q = _dist(self.posterior, self.loc, scale)
        p = _dist(self.prior, torch.ones_like(self.loc), torch.full_like(scale, self.prior_scale))
        z = q.rsample((self.kl_samples,))
        return (q.log_prob(z) - p.log_prob(z)).mean(0).sum() / self.members


def _dist(family: str, loc: torch.Tensor, scale: torch.Tensor):
    if family == "gaussian":
        return torch.distributions.Normal(loc, scale)
    return torch.distributions.Cauchy(loc, scale)


class _SampledFactors:
    """Rank-1 BNN factors: each row draws ``r, s`` from its member's posterior component."""

    def _make_factors(self, in_dim: int, out_dim: int, options: dict) -> None:
        kw = RANK1_OPTIONS.resolve(options)
        self.r = _Rank1Factors(self.members, in_dim, **kw)
        self.s = _Rank1Factors(self.members, out_dim, **kw)
        self.sample = True  # False: use the posterior locations (a BatchEnsemble layer)

    def _fixed_factors(self) -> bool:
        return not self.sample

    def factors(self, n: int, member: int | None = None):
        return self.r.sample(n, self.sample, member), self.s.sample(n, self.sample, member)

    def kl(self) -> torch.Tensor:
        return self.r.kl() + self.s.kl()


class Rank1Linear(_SampledFactors, Rank1StructureLinear):
    """``y = ((x * r) W^T) * s + b_m`` with ``r, s`` sampled per row from member m's posterior."""

    def __init__(self, in_features: int, out_features: int, members: int, bias=True, **kw):
        super().__init__(in_features, out_features, members, bias)
        self._make_factors(in_features, out_features, kw)


class Rank1Conv2d(_SampledFactors, Rank1StructureConv2d):
    """Conv2d with per-row sampled input/output channel factors and per-member biases."""

    def __init__(
        self, in_channels, out_channels, kernel_size, members, stride=1, padding=0, dilation=1,
        groups=1, bias=True, padding_mode="zeros", **kw,
    ) -> None:  # fmt: skip
        super().__init__(
            in_channels, out_channels, kernel_size, members, stride, padding, dilation, groups,
            bias, padding_mode,
        )  # fmt: skip
        self._make_factors(in_channels, out_channels, kw)
