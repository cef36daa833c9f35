"""Conversion keeps function, and variational convolutions sample weights, not positions.

* every kind at its deterministic point (no dropout, unit factors, zero variance) computes what
  the original layer computed, for Conv2d / Linear / BatchNorm configurations torch allows;
* a variational convolution's outputs for one input have the mean and the covariance across
  positions that a weight drawn per example gives (closed form: a weight is shared by every
  position, so positions are correlated).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import bayesify
from bnnkit.nn import EnsembleBatchNorm2d, VariationalConv2d

CONV_CONFIGS = [
    dict(stride=s, padding=p, dilation=d, groups=g, bias=b, padding_mode=m)
    for (s, p, d), g, b, m in itertools.product(
        [(1, 0, 1), (2, 1, 1), (1, (1, 2), 2), (1, "same", 1), (2, "valid", 1), (1, 2, 2)],
        [1, 2],
        [True, False],
        ["zeros", "reflect", "replicate", "circular"],
    )
    if not (p == "same" and m != "zeros" and d > 1)
]
DTYPES = [torch.float32, torch.float64]


def _deterministic_point(net):
    """Zero variance / unit factors everywhere in a converted network."""
    for m in net.modules():
        if isinstance(getattr(m, "sample", None), bool):
            m.sample = False
    return net


def _conv_models(cfg, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **cfg).to(dtype)
    return nn.Sequential(conv), torch.rand(3, 4, 9, 8, dtype=dtype)


KIND_SETUPS = {
    "mc_dropout": dict(members=1, options={"mc_dropout": {"p": 0.0}}),
    "batch_ensemble": dict(members=2, options={"batch_ensemble": {"factor_init": "ones"}}),
    "rank1": dict(members=2, options={"rank1": {"init": "ones", "init_scale": 0.0}}),
    "variational": dict(members=1, options={}),
}


@pytest.mark.parametrize("kind", list(KIND_SETUPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_conv_kinds_at_their_deterministic_point_equal_the_layer(cfg, dtype, kind):
    model, x = _conv_models(cfg, dtype)
    ref = model(x)
    setup = KIND_SETUPS[kind]
    net = _deterministic_point(bayesify(model, {"*": kind}, **setup)).eval()
    out = net(x)
    assert out.dtype == dtype
    for member in out:
        torch.testing.assert_close(
            member, ref, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6
        )


@pytest.mark.parametrize("kind", list(KIND_SETUPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_kinds_at_their_deterministic_point_equal_the_layer(bias, dtype, kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias).to(dtype))
    x = torch.randn(3, 5, dtype=dtype)
    net = _deterministic_point(bayesify(model, {"*": kind}, **KIND_SETUPS[kind])).eval()
    for member in net(x):
        torch.testing.assert_close(
            member, model(x), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6
        )


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ensemble_batchnorm_equals_the_layer_for_every_member(affine, track, momentum, dtype, mode):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3, affine=affine, track_running_stats=track, momentum=momentum).to(dtype)
    with torch.no_grad():  # a trained state: non-trivial statistics and affine parameters
        bn.train()
        for _ in range(3):
            bn(torch.randn(8, 3, 4, 4, dtype=dtype) * 2 + 1)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    ens = EnsembleBatchNorm2d.from_dense(bn, members=2)
    assert sum(p.numel() for p in ens.parameters()) == 2 * sum(p.numel() for p in bn.parameters())
    bn.train(mode == "train")
    ens.train(mode == "train")
    x = torch.randn(5, 3, 4, 4, dtype=dtype)
    ref = bn(x.clone())
    out = ens(torch.cat([x, x]))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for member in out.split(5):
        torch.testing.assert_close(member, ref, rtol=0, atol=tol)
    if track:  # the running statistics moved the same way
        for m in range(2):
            torch.testing.assert_close(ens.bn.running_mean[3 * m : 3 * m + 3], bn.running_mean)
            torch.testing.assert_close(ens.bn.running_var[3 * m : 3 * m + 3], bn.running_var)
        assert int(ens.bn.num_batches_tracked) == int(bn.num_batches_tracked)


# ----------------------------------------------------------------- variational convolutions


def _explicit_moments(layer, x1):
    """Mean and covariance of the flattened output for one input under independent
    per-example weights: closed form, since out = sum_k W_k U_k + b is linear in the weights."""
    pad = layer.padding
    xin = x1
    if layer.padding_mode != "zeros":
        xin = F.pad(x1, layer._pad, mode=layer.padding_mode)
        pad = 0
    mean = F.conv2d(xin, layer.weight_mu, layer.bias_mu, layer.stride, pad, layer.dilation)[0]
    U = F.unfold(xin, layer.kernel_size, layer.dilation, pad, layer.stride)[0]  # [I k k, L]
    var_w = layer.sigma(layer.weight_rho).detach().flatten(1) ** 2  # [O, I k k]
    O, L = var_w.shape[0], U.shape[1]
    cov = torch.zeros(O, L, O, L, dtype=x1.dtype)
    for o in range(O):
        cov[o, :, o, :] = U.T @ (var_w[o, :, None] * U)
        if layer.bias_rho is not None:
            cov[o, :, o, :] += layer.sigma(layer.bias_rho).detach()[o] ** 2
    return mean.detach().flatten(), cov.reshape(O * L, O * L)


@pytest.mark.parametrize("estimator", ["flipout", "grouped"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_variational_conv_samples_weights_not_positions(estimator, padding_mode):
    torch.manual_seed(0)
    layer = VariationalConv2d(
        2, 2, 3, padding=1, padding_mode=padding_mode, init_sigma=0.3, estimator=estimator
    ).double()
    with torch.no_grad():
        layer.weight_rho.uniform_(-1.5, 0.5)  # unequal variances
    x1 = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    n = 40000
    with torch.no_grad():
        # many passes of a few rows: Flipout's rows share one |dW| per pass (uncorrelated,
        # not independent), so the marginal law of a row needs many passes
        out = torch.cat([layer(x1.expand(8, -1, -1, -1)) for _ in range(n // 8)]).flatten(1)
    mean, cov = _explicit_moments(layer, x1)
    emp_mean, emp_cov = out.mean(0), torch.cov(out.T)
    scale = cov.diagonal().max()
    torch.testing.assert_close(emp_mean, mean, rtol=0, atol=4 * float(scale.sqrt()) / n**0.5)
    torch.testing.assert_close(emp_cov, cov, rtol=0, atol=0.04 * float(scale))
    # the quantity a per-position estimator gets wrong: variance after global average pooling
    pooled = out.reshape(n, 2, 16).mean(-1)
    exact = cov.reshape(2, 16, 2, 16).mean((1, 3)).diagonal()
    torch.testing.assert_close(pooled.var(0), exact, rtol=0.05, atol=0)
