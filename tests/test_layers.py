import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import InputError
from bnnkit.nn import (
    BatchEnsembleConv2d,
    BatchEnsembleLinear,
    EnsembleBatchNorm2d,
    MCDropout,
    VariationalConv2d,
    VariationalLinear,
    gaussian_kl,
    kl_divergence,
)


def _fold(x, M):
    return x.repeat(M, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("bias", [True, False])
def test_batch_ensemble_linear_equals_m_separate_layers(bias):
    M, B = 4, 5
    layer = BatchEnsembleLinear(6, 3, M, bias=bias, factor_init="random_sign")
    x = torch.randn(M * B, 6)  # member-major: rows m*B:(m+1)*B belong to member m
    y = layer(x)
    for m in range(M):
        ref = nn.Linear(6, 3, bias=bias)
        with torch.no_grad():
            ref.weight.copy_(layer.weight * torch.outer(layer.s[m], layer.r[m]))
            if bias:
                ref.bias.copy_(layer.bias[m])
        torch.testing.assert_close(y[m * B : (m + 1) * B], ref(x[m * B : (m + 1) * B]))


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=3, stride=1, padding=1, groups=1, bias=True),
        dict(kernel_size=3, stride=2, padding=0, groups=1, bias=False),
        dict(kernel_size=5, stride=1, padding=2, groups=2, bias=True),
        dict(kernel_size=1, stride=2, padding=0, groups=4, bias=True, dilation=1),
    ],
)
def test_batch_ensemble_conv_equals_m_separate_convs(kw):
    M, B, cin, cout = 3, 2, 4, 8
    layer = BatchEnsembleConv2d(cin, cout, members=M, factor_init="normal", **kw)
    x = torch.randn(M * B, cin, 9, 9)
    y = layer(x)
    for m in range(M):
        ref = nn.Conv2d(cin, cout, **kw)
        with torch.no_grad():
            w = layer.conv.weight * layer.s[m].view(-1, 1, 1, 1)
            # r scales input channels: for grouped convs the weight's input axis is per group
            r = layer.r[m].view(kw["groups"], -1)
            w = w.view(kw["groups"], cout // kw["groups"], *w.shape[1:]) * r.view(
                kw["groups"], 1, -1, 1, 1
            )
            ref.weight.copy_(w.reshape_as(layer.conv.weight))
            if kw["bias"]:
                ref.bias.copy_(layer.bias[m])
        torch.testing.assert_close(y[m * B : (m + 1) * B], ref(x[m * B : (m + 1) * B]))


def test_batch_ensemble_with_unit_factors_equals_shared_layer():
    base = nn.Conv2d(3, 5, 3, padding=1)
    be = BatchEnsembleConv2d.from_dense(base, members=4, factor_init="ones")
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(be(_fold(x, 4)), _fold(base(x), 4))
    lin = nn.Linear(7, 2)
    bel = BatchEnsembleLinear.from_dense(lin, members=3, factor_init="ones")
    z = torch.randn(4, 7)
    torch.testing.assert_close(bel(_fold(z, 3)), _fold(lin(z), 3))


def test_each_member_chunk_uses_its_own_member():
    M, B = 4, 3
    layer = BatchEnsembleLinear(5, 2, M)
    x = _fold(torch.randn(B, 5), M)
    y0 = layer(x).detach()
    # the M outputs for one input differ (M distinct members)
    outs = y0.view(M, B, 2)
    for i in range(M):
        for j in range(i + 1, M):
            assert not torch.allclose(outs[i], outs[j])
    # changing member 2's factors changes only chunk 2
    with torch.no_grad():
        layer.s[2] *= 3
    y1 = layer(x).detach().view(M, B, 2)
    changed = [(not torch.allclose(y1[m], outs[m])) for m in range(M)]
    assert changed == [False, False, True, False]


def test_ensemble_layers_reject_unfolded_batch():
    with pytest.raises(InputError, match="multiple of 4"):
        BatchEnsembleLinear(3, 2, members=4)(torch.randn(6, 3))


def test_ensemble_batchnorm_equals_separate_batchnorms():
    M, B = 3, 4
    ebn = EnsembleBatchNorm2d(5, M)
    with torch.no_grad():
        ebn.bn.weight.uniform_(0.5, 1.5)
        ebn.bn.bias.normal_()
    x = torch.randn(M * B, 5, 3, 3)
    y = ebn(x)
    for m in range(M):
        ref = nn.BatchNorm2d(5)
        with torch.no_grad():
            ref.weight.copy_(ebn.bn.weight[m * 5 : (m + 1) * 5])
            ref.bias.copy_(ebn.bn.bias[m * 5 : (m + 1) * 5])
        torch.testing.assert_close(y[m * B : (m + 1) * B], ref(x[m * B : (m + 1) * B]))
        torch.testing.assert_close(ebn.bn.running_mean[m * 5 : (m + 1) * 5], ref.running_mean)


def test_gaussian_kl_matches_torch_distributions():
    mu, sigma = torch.randn(10), torch.rand(10) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 0.5)
    ).sum()
    torch.testing.assert_close(gaussian_kl(mu, sigma, 0.5), expected)


def test_variational_linear_local_reparameterisation_moments():
    layer = VariationalLinear(3, 2, prior_sigma=1.0, init_sigma=0.3)
    x = torch.randn(1, 3)
    samples = layer(x.expand(20000, 3)).detach()
    sig_w = F.softplus(layer.weight_rho).detach()
    sig_b = F.softplus(layer.bias_rho).detach()
    mean = F.linear(x, layer.weight_mu, layer.bias_mu).detach()[0]
    var = (x[0] ** 2 * sig_w**2).sum(1) + sig_b**2
    torch.testing.assert_close(samples.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(samples.var(0), var, atol=0.0, rtol=0.05)
    layer.sample = False
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu))


def test_variational_conv_mean_matches_conv_and_kl_closed_form():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    v = VariationalConv2d.from_dense(conv, prior_sigma=0.7, init_sigma=0.05)
    v.sample = False
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(v(x), conv(x))
    sig = torch.full((conv.weight.numel() + conv.bias.numel(),), 0.05)
    mu = torch.cat([conv.weight.flatten(), conv.bias.flatten()]).detach()
    expected = 0.5 * ((sig / 0.7) ** 2 + (mu / 0.7) ** 2 - 1 - 2 * torch.log(sig / 0.7)).sum()
    torch.testing.assert_close(v.kl(), expected, rtol=1e-4, atol=1e-3)


def test_kl_divergence_sums_layers_once():
    a, b = VariationalLinear(3, 3), VariationalLinear(3, 2)
    model = nn.Sequential(a, nn.ReLU(), nn.Sequential(b))
    torch.testing.assert_close(kl_divergence(model), a.kl() + b.kl())
    assert kl_divergence(nn.Linear(2, 2)).item() == 0.0


def test_mc_dropout_stays_on_in_eval_and_scales():
    d = MCDropout(0.5).eval()
    x = torch.ones(20000)
    y = d(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert y.mean().item() == pytest.approx(1.0, abs=0.03)
    assert not math.isnan(y.sum().item())
