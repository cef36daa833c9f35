"""Rank-1 BNN layers: reduction to BatchEnsemble, folding, KL estimators, gradients."""

import math

import pytest
import torch
from torch import nn

from bnnkit import bayesify
from bnnkit.models import build_model
from bnnkit.nn import BatchEnsembleConv2d, BatchEnsembleLinear, Rank1Conv2d, Rank1Linear
from bnnkit.nn.rank1 import _Rank1Factors


def _copy_to_be(rank1, be):
    with torch.no_grad():
        be.weight.copy_(rank1.weight)
        be.r.copy_(rank1.r.loc)
        be.s.copy_(rank1.s.loc)
        if rank1.bias is not None:
            be.bias.copy_(rank1.bias)


def test_zero_variance_rank1_linear_equals_batch_ensemble():
    M, B = 3, 5
    layer = Rank1Linear(6, 4, M, init_scale=0.0)
    be = BatchEnsembleLinear(6, 4, M)
    _copy_to_be(layer, be)
    x = torch.randn(M * B, 6)
    torch.testing.assert_close(layer(x), be(x))


@pytest.mark.parametrize("kw", [dict(stride=1, padding=1), dict(stride=2, padding=0, groups=2)])
def test_zero_variance_rank1_conv_equals_batch_ensemble(kw):
    M, B = 2, 3
    layer = Rank1Conv2d(4, 6, 3, M, init_scale=0.0, **kw)
    be = BatchEnsembleConv2d(4, 6, 3, M, **kw)
    with torch.no_grad():
        be.conv.weight.copy_(layer.conv.weight)
        be.r.copy_(layer.r.loc)
        be.s.copy_(layer.s.loc)
        be.bias.copy_(layer.bias)
    x = torch.randn(M * B, 4, 7, 7)
    torch.testing.assert_close(layer(x), be(x))


def test_posterior_mean_mode_equals_batch_ensemble():
    layer = Rank1Linear(5, 3, 2, init_scale=0.5)
    layer.sample = False
    be = BatchEnsembleLinear(5, 3, 2)
    _copy_to_be(layer, be)
    x = torch.randn(8, 5)
    torch.testing.assert_close(layer(x), be(x))


def test_per_row_sampling_and_member_assignment():
    M, B = 4, 3
    layer = Rank1Linear(5, 2, M, init_scale=0.1)
    x = torch.randn(B, 5).repeat(M, 1)
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)  # fresh samples each pass
    # rows of one member scatter around that member's BatchEnsemble output
    layer.sample = False
    centre = layer(x).detach().view(M, B, 2)
    layer.sample = True
    draws = torch.stack([layer(x).detach().view(M, B, 2) for _ in range(400)])
    torch.testing.assert_close(draws.mean(0), centre, atol=0.08, rtol=0.0)


def test_gaussian_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    f = _Rank1Factors(3, 7, "gaussian", "gaussian", 0.5, "normal", 0.2, kl_samples=1)
    with torch.no_grad():
        f.rho.uniform_(-3, 0)
    closed = f.kl()
    q = torch.distributions.Normal(f.loc, f.scale())
    p = torch.distributions.Normal(torch.ones_like(f.loc), torch.full_like(f.loc, 0.5))
    z = q.sample((40000,))
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0).sum() / 3
    torch.testing.assert_close(closed.detach(), mc, rtol=0.02, atol=0.05)


def _kl_by_quadrature(q, p, lo=-4000.0, hi=4000.0, n=4_000_001):
    """KL(q || p) = int q log(q / p) on a fine grid (float64 trapezoid), elementwise."""
    z = torch.linspace(lo, hi, n, dtype=torch.float64)
    out = []
    for qi, pi in zip(q, p):
        lq, lp = qi.log_prob(z), pi.log_prob(z)
        out.append(torch.trapezoid(lq.exp() * (lq - lp), z))
    return torch.stack(out)


def _factor_dists(f, post, prior):
    C, N = torch.distributions.Cauchy, torch.distributions.Normal
    loc, scale = f.loc.detach().double().flatten(), f.scale().detach().double().flatten()
    Q = C if post == "cauchy" else N
    P = C if prior == "cauchy" else N
    return [Q(l, s) for l, s in zip(loc, scale)], [P(1.0, f.prior_scale) for _ in loc]


def test_cauchy_kl_is_exact_against_numerical_integration():
    torch.manual_seed(0)
    f = _Rank1Factors(2, 3, "cauchy", "cauchy", 1.3, "ones", 0.5, kl_samples=1)
    with torch.no_grad():
        f.loc.copy_(torch.tensor([[1.0, 2.0, 0.5], [1.5, 1.0, 0.0]]))
        f.rho.copy_(torch.tensor([[0.1, -1.0, 0.5], [1.0, 0.0, -0.3]]))
    q, p = _factor_dists(f, "cauchy", "cauchy")
    exact = _kl_by_quadrature(q, p).sum() / 2
    kl = f.kl().detach()
    assert float(kl) == pytest.approx(float(exact), rel=1e-3)
    assert float(f.kl().detach()) == float(kl)  # closed form: no sampling noise


def test_gaussian_posterior_cauchy_prior_estimator_is_unbiased():
    torch.manual_seed(0)
    f = _Rank1Factors(2, 3, "gaussian", "cauchy", 0.7, "ones", 0.5, kl_samples=4)
    with torch.no_grad():
        f.loc.copy_(torch.tensor([[1.0, 2.0, 0.5], [1.5, 1.0, 0.0]]))
    q, p = _factor_dists(f, "gaussian", "cauchy")
    exact = _kl_by_quadrature(q, p, -60.0, 60.0, 600_001).sum() / 2
    estimates = torch.stack([f.kl().detach() for _ in range(5000)]).double()
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(float(estimates.mean() - exact)) < 4 * float(se)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"posterior": "cauchy", "prior": "gaussian"}, "infinite KL"),
        ({"kl_samples": 0}, "'kl_samples'.*>= 1"),
        ({"kl_samples": 1.5}, "'kl_samples'"),
        ({"prior_scale": 0}, "'prior_scale'.*> 0"),
        ({"posterior": "laplace"}, "'posterior'.*gaussian, cauchy"),
    ],
)
def test_improper_or_invalid_rank1_options_are_refused(opts, match):
    from bnnkit import ConfigError

    with pytest.raises(ConfigError, match=match):
        Rank1Linear(3, 2, members=2, **opts)
    with pytest.raises(ConfigError, match=match):
        bayesify(nn.Sequential(nn.Linear(3, 2)), {"*": "rank1"}, members=2,
                 options={"rank1": opts})  # fmt: skip


def test_gradients_reach_every_factor():
    net = bayesify(build_model("lenet5", (1, 28, 28), 10), {"*": "rank1"}, members=2)
    out = net(torch.rand(3, 1, 28, 28))
    loss = out.logsumexp(-1).mean() + 1e-3 * sum(
        m.kl() for m in net.modules() if isinstance(m, (Rank1Linear, Rank1Conv2d))
    )
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rank1_kind_in_plans_and_unknown_family():
    net = bayesify(build_model("mlp", (1, 8, 8), 3), {"fc": "rank1"}, members=3)
    assert isinstance(net.body.fc, Rank1Linear) and isinstance(net.body.features[1], nn.Linear)
    assert net(torch.rand(2, 1, 8, 8), samples=2).shape == (6, 2, 3)
    with pytest.raises(ValueError, match="'posterior' of layer kind 'rank1'"):
        Rank1Linear(3, 2, 2, posterior="laplace")
