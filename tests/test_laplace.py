"""Laplace approximations against brute force: explicit autograd Jacobians, Hessians of the
linearised loss, large-sample Monte Carlo, dense grids of the evidence."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bnnkit import ConfigError, InputError
from bnnkit.evaluate import _PeakMemory
from bnnkit.laplace import (
    DiagLaplace,
    LastLayerLaplace,
    SubnetJacobian,
    SubnetLaplace,
    diagonal_statistics,
    select_subnetwork,
)


def _mlp(seed=0, d=4, h=5, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()


def _data(n=24, d=4, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(
        0, c, (n,), generator=g
    )


def _full_jacobian(model, x):
    """Brute force: J [n, C, P] by autograd over the flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i : i + s.numel()].view(s)
            i += s.numel()
        return functional_call(model, params, (x,))

    return torch.autograd.functional.jacobian(f, flat), f, flat


def _ggn(J, logits):
    p = torch.softmax(logits, -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nci,ncd,ndj->ij", J, lam, J)


def test_full_subnetwork_equals_brute_force_laplace():
    model, (x, y) = _mlp(), _data()
    J, _, flat = _full_jacobian(model, x)
    P = flat.numel()
    la = SubnetLaplace(model, torch.arange(P), prior_precision=0.7).fit((x, y), batch_size=7)
    ggn = _ggn(J, model(x).detach())
    torch.testing.assert_close(la.ggn, ggn, rtol=1e-6, atol=1e-8)
    post = torch.linalg.inv(ggn + 0.7 * torch.eye(P))
    torch.testing.assert_close(la.posterior_covariance, post, rtol=1e-6, atol=1e-8)
    # linearised predictive covariance J Sigma J^T for new inputs
    xt = _data(5, seed=3)[0]
    Jt, _, _ = _full_jacobian(model, xt)
    _, cov = la._mean_cov(xt)
    torch.testing.assert_close(cov, torch.einsum("nci,ij,ndj->ncd", Jt, post, Jt), rtol=1e-6,
                               atol=1e-9)  # fmt: skip
    assert la.loss == pytest.approx(
        float(F.cross_entropy(model(x), y, reduction="sum").detach()), rel=1e-9
    )


def test_ggn_is_hessian_of_linearised_loss_at_map():
    model, (x, y) = _mlp(seed=2), _data(seed=4)
    J, f, flat = _full_jacobian(model, x)
    f0 = f(flat).detach()

    def lin_loss(theta):
        return F.cross_entropy(f0 + torch.einsum("nci,i->nc", J, theta - flat), y, reduction="sum")

    hess = torch.autograd.functional.hessian(lin_loss, flat)
    la = SubnetLaplace(model, torch.arange(flat.numel())).fit((x, y))
    torch.testing.assert_close(la.ggn, hess, rtol=1e-6, atol=1e-8)


def test_subnetwork_ggn_is_block_of_full_ggn():
    model, (x, y) = _mlp(seed=3), _data(seed=5)
    full = SubnetLaplace(model, torch.arange(43)).fit((x, y))
    idx = torch.tensor([40, 0, 7, 21, 22, 35, 19])  # unsorted on purpose
    sub = SubnetLaplace(model, idx).fit((x, y))
    s = torch.sort(idx).values
    torch.testing.assert_close(sub.ggn, full.ggn[s][:, s], rtol=1e-6, atol=1e-9)
    assert torch.equal(sub.indices, s)


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", dilation=1, bias=False)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))
        return self.fc(h.flatten(1))


def test_subnet_jacobian_matches_autograd_for_conv_batchnorm_linear():
    torch.manual_seed(0)
    model = _SmallCNN().double()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    J, _, flat = _full_jacobian(model, x)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(flat.numel(), generator=g)[:120]
    jac = SubnetJacobian(model, idx, memory_budget="1MB")  # small budget: several gather chunks
    f, Js = jac.logits_and_jacobian(x)
    torch.testing.assert_close(Js, J[:, :, jac.indices], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(f, model(x))


class _WideConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(8, 16, 3, padding=1)  # 72 weights per output channel
        self.fc = nn.Linear(16 * 5 * 5, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(x)).flatten(1))


@pytest.mark.parametrize(
    "entries",
    [
        [5, 72 + 9],  # 2 entries in 2 channels: gathered entry by entry
        list(range(3, 23)) + list(range(7 * 72, 7 * 72 + 10)),  # 30 in 2 channels: channel GEMM
        list(range(16 * 72)),  # the whole weight: one dense GEMM
    ],
    ids=["gather", "channels", "dense"],
)
def test_conv_jacobian_paths_match_autograd(entries):
    torch.manual_seed(3)
    model = _WideConv().double().eval()
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    J, _, _ = _full_jacobian(model, x)
    idx = torch.tensor(entries)
    jac = SubnetJacobian(model, idx, memory_budget="64MB")
    _, Js = jac.logits_and_jacobian(x)
    torch.testing.assert_close(Js, J[:, :, idx], rtol=1e-8, atol=1e-10)


def test_probit_close_to_large_sample_monte_carlo():
    model, (x, y) = _mlp(seed=5), _data(60, seed=6)
    la = SubnetLaplace(model, torch.arange(43), prior_precision=2.0).fit((x, y))
    xt = _data(30, seed=7)[0]
    _, cov = la._mean_cov(xt)
    assert torch.diagonal(cov, dim1=1, dim2=2).mean() > 0.05  # a non-trivial posterior
    probit = la.predict(xt, link="probit")
    mc = la.predict(xt, link="mc", n_samples=20000, seed=0)
    assert (probit - mc).abs().max() < 0.04
    assert (probit - torch.softmax(model(xt), -1)).abs().max() > 0.01  # differs from the MAP


def test_sample_weights_predictive_restores_map_and_varies():
    model, (x, y) = _mlp(seed=6), _data(seed=8)
    before = [p.detach().clone() for p in model.parameters()]
    la = SubnetLaplace(model, torch.tensor([0, 5, 30, 41]), prior_precision=0.5).fit((x, y))
    pred = la.predictive(x[:6], link="sample_weights", n_samples=50)
    assert pred.probs.shape == (50, 6, 3)
    assert pred.probs.std(0).max() > 1e-3
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def _brute_evidence(model, x, y, idx, delta):
    """Laplace evidence computed independently of the library: the log likelihood at the MAP,
    the prior's log density at the MAP (a MultivariateNormal), and the Gaussian integral
    ``(S/2) log 2 pi - 1/2 logdet H`` with H the explicit autograd GGN of the subnetwork plus
    the prior precision (a dense logdet)."""
    J, _, flat = _full_jacobian(model, x)
    logits = model(x).detach()
    Js = J[:, :, idx]
    H = _ggn(Js, logits) + delta * torch.eye(len(idx), dtype=torch.float64)
    theta = flat[idx]
    prior = torch.distributions.MultivariateNormal(
        torch.zeros(len(idx), dtype=torch.float64),
        precision_matrix=delta * torch.eye(len(idx), dtype=torch.float64),
    )
    loglik = -F.cross_entropy(logits, y, reduction="sum")
    return (
        loglik + prior.log_prob(theta) + 0.5 * len(idx) * math.log(2 * math.pi)
        - 0.5 * torch.logdet(H)
    )  # fmt: skip


@pytest.mark.parametrize("cls", ["subnet", "diag"])
def test_log_evidence_equals_brute_force_computation(cls):
    model, (x, y) = _mlp(seed=7), _data(40, seed=9)
    P = 43
    if cls == "subnet":
        idx = torch.tensor([0, 3, 4, 9, 20, 21, 30, 40, 42])
        la = SubnetLaplace(model, idx).fit((x, y))
    else:
        idx = torch.arange(P)
        la = DiagLaplace(model).fit((x, y))
    for delta in (0.05, 1.0, 30.0):
        if cls == "subnet":
            ref = _brute_evidence(model, x, y, idx, delta)
        else:  # the diagonal approximation: H = diag(GGN) + delta, logdet of a diagonal
            J, _, flat = _full_jacobian(model, x)
            Hd = torch.diagonal(_ggn(J, model(x).detach())) + delta
            ref = (
                -F.cross_entropy(model(x).detach(), y, reduction="sum")
                + torch.distributions.Normal(
                    torch.tensor(0.0, dtype=torch.float64),
                    torch.tensor(delta**-0.5, dtype=torch.float64),
                ).log_prob(flat).sum()
                + 0.5 * P * math.log(2 * math.pi) - 0.5 * torch.log(Hd).sum()
            )  # fmt: skip
        assert float(la.log_marginal_likelihood(delta)) == pytest.approx(float(ref), rel=1e-10)
    # the tuned prior maximises the brute-force evidence over a dense grid
    best = float(la.optimize_prior_precision("marglik"))
    if cls == "subnet":
        grid = torch.logspace(-2, 2, 161, dtype=torch.float64)
        brute = torch.stack([_brute_evidence(model, x, y, idx, float(d)) for d in grid])
        assert abs(math.log(best) - math.log(float(grid[int(brute.argmax())]))) < 0.03


def test_scalar_marglik_matches_dense_grid_and_gridsearch_matches_brute_force():
    model, (x, y) = _mlp(seed=7), _data(40, seed=9)
    la = SubnetLaplace(model, torch.arange(43)).fit((x, y))
    best = float(la.optimize_prior_precision("marglik"))
    grid = torch.logspace(-3, 3, 601, dtype=torch.float64)
    ev = torch.stack([la.log_marginal_likelihood(float(d)) for d in grid])
    assert math.log(best) == pytest.approx(math.log(float(grid[int(ev.argmax())])), abs=0.02)
    # per-layer marglik never has lower evidence than the scalar optimum
    scalar_ev = float(la.log_marginal_likelihood(best))
    la.optimize_prior_precision("marglik", per_layer=True, steps=200, lr=0.05)
    assert la.prior_precision.numel() == 2
    assert float(la.log_marginal_likelihood()) >= scalar_ev - 1e-6
    # grid search: the eigenbasis shortcut picks what brute-force probit NLL picks
    xv, yv = _data(30, seed=10)
    small = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    la.optimize_prior_precision("gridsearch", val=(xv, yv), grid=small)
    brute = []
    for d in small:
        la.prior_precision = float(d)
        brute.append(float(F.nll_loss(torch.log(la.predict(xv)), yv)))
    torch.testing.assert_close(la.grid_nll, torch.tensor(brute, dtype=torch.float64), rtol=1e-6,
                               atol=1e-8)  # fmt: skip


def test_a_marglik_optimum_beyond_the_searched_range_is_warned_not_silent():
    """Weights at zero (|theta|^2 = 0): the evidence rises for ever as the prior tightens, so
    the optimum is the upper bound of the search; said with a warning, never silently. An
    interior optimum (the test above) warns nothing; the lower bound is reached by a huge
    |theta|^2 on directions without curvature."""
    from bnnkit.laplace.base import LOG_PRIOR_BOUND, MarglikBoundWarning, _scalar_marglik_optimum

    x, y = _data(40, seed=9)
    model = _mlp(seed=7)
    with torch.no_grad():
        model[0].weight.zero_()  # the subnetwork: these 20 weights (their Jacobians are not 0)
    la = SubnetLaplace(model, torch.arange(20)).fit((x, y))
    with pytest.warns(MarglikBoundWarning, match="beyond"):
        best = float(la.optimize_prior_precision("marglik"))
    assert best == pytest.approx(math.exp(LOG_PRIOR_BOUND))
    with pytest.warns(MarglikBoundWarning, match="below"):
        low = _scalar_marglik_optimum(torch.zeros(5, dtype=torch.float64), 1e20, 5)
    assert low == pytest.approx(math.exp(-LOG_PRIOR_BOUND))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MarglikBoundWarning)
        interior = SubnetLaplace(_mlp(seed=7), torch.arange(43)).fit((x, y))
        interior.optimize_prior_precision("marglik")


def test_diag_laplace_equals_diagonal_of_full_ggn():
    model, (x, y) = _mlp(seed=8), _data(seed=11)
    J, _, _ = _full_jacobian(model, x)
    ggn = _ggn(J, model(x).detach())
    la = DiagLaplace(model, prior_precision=0.3).fit((x, y), batch_size=5)
    torch.testing.assert_close(la.h, torch.diagonal(ggn), rtol=1e-6, atol=1e-9)
    xt = _data(4, seed=12)[0]
    Jt, _, _ = _full_jacobian(model, xt)
    _, cov = la._mean_cov(xt)
    var = 1.0 / (torch.diagonal(ggn) + 0.3)
    torch.testing.assert_close(cov, torch.einsum("nci,i,ndi->ncd", Jt, var, Jt), rtol=1e-6,
                               atol=1e-9)  # fmt: skip
    h, q = diagonal_statistics(model, (x, y))
    torch.testing.assert_close(h, torch.diagonal(ggn), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(q, (J**2).sum((0, 1)), rtol=1e-6, atol=1e-9)


def test_last_layer_laplace_covers_last_linear():
    model, (x, y) = _mlp(seed=9), _data(seed=13)
    la = LastLayerLaplace(model).fit((x, y))
    assert torch.equal(la.indices, torch.arange(25, 43))  # 5*3 weights + 3 biases, last in order


def test_largest_variance_avoids_uninformed_weights():
    """Input 0 is always zero: its first-layer weights get no curvature. The naive rule picks
    them (variance 1/prior) and its predictive equals the MAP's; bnnkit's rule does not."""
    model = _mlp(seed=10)
    x, y = _data(50, seed=14)
    x[:, 0] = 0.0
    n = 4
    naive = select_subnetwork(model, "largest_variance_naive", n, (x, y))
    informed = select_subnetwork(model, "largest_variance_informed", n, (x, y))
    dead = set(range(0, 20, 4))  # W1[:, 0] entries in the flat vector (W1 is [5, 4])
    assert set(naive.tolist()) <= dead
    assert not set(informed.tolist()) & dead
    xt = _data(10, seed=15)[0]
    xt[:, 0] = 0.0
    map_p = torch.softmax(model(xt), -1).detach()
    la_naive = SubnetLaplace(model, naive).fit((x, y))
    assert la_naive._mean_cov(xt)[1].abs().max() == 0  # no predictive variance at all
    p_naive = la_naive.predict(xt)
    p_inf = SubnetLaplace(model, informed).fit((x, y)).predict(xt)
    assert (p_naive - map_p).abs().max() < 1e-6  # float32 probabilities
    assert (p_inf - map_p).abs().max() > 1e-4
    pv = select_subnetwork(model, "predictive_variance", n, (x, y))
    assert not set(pv.tolist()) & dead


def test_largest_variance_reads_per_parameter_prior_precisions():
    """The paper's rule: the k largest 1 / (h_i + delta_i) of the diagonal posterior, brute
    force from the explicit GGN diagonal; a per-layer prior moves the choice between layers."""
    model, (x, y) = _mlp(seed=12), _data(40, seed=17)
    J, _, _ = _full_jacobian(model, x)
    h = torch.diagonal(_ggn(J, model(x).detach()))
    layer = torch.cat([torch.full((n,), i) for i, n in enumerate([20, 5, 15, 3])])
    for per_layer in ([1.0, 1.0, 1.0, 1.0], [50.0, 50.0, 0.01, 0.01], [0.01, 0.01, 50.0, 50.0]):
        delta = torch.tensor(per_layer, dtype=torch.float64)[layer]
        idx = select_subnetwork(model, "largest_variance", 6, (x, y), prior_precision=delta)
        expected = torch.topk(1.0 / (h + delta), 6).indices
        assert set(idx.tolist()) == set(expected.tolist())
    assert set(idx.tolist()) <= set(range(20)) | set(range(20, 25))  # the weakly-regularised
    with pytest.raises(InputError, match="scalar prior_precision"):
        select_subnetwork(model, "predictive_variance", 6, (x, y), prior_precision=delta)


def test_other_strategies():
    model, (x, y) = _mlp(seed=11), _data(seed=16)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    mag = select_subnetwork(model, "magnitude", 5)
    assert set(mag.tolist()) == set(torch.topk(flat.abs(), 5).indices.tolist())
    r1 = select_subnetwork(model, "random", 6, seed=3)
    assert (
        torch.equal(r1, select_subnetwork(model, "random", 6, seed=3))
        and len(set(r1.tolist())) == 6
    )
    assert torch.equal(select_subnetwork(model, "names", names=["2.bias"]), torch.arange(40, 43))
    assert torch.equal(select_subnetwork(model, "names", names=["0"]), torch.arange(0, 25))
    sw = select_subnetwork(model, "swag", 5, (x, y), swag_epochs=3)
    assert sw.numel() == 5
    for p, q in zip(model.parameters(), flat.split([20, 5, 15, 3])):
        assert torch.equal(p.detach().flatten(), q)  # SWAG ran on a copy


def test_jacobian_memory_is_independent_of_the_rest_of_the_network():
    """11.4M parameters: a batch x classes x all-parameters Jacobian for 256 inputs would be
    117 GB. A 200-parameter subnetwork fits in a 64 MB budget with peak tensor memory well
    below that product. The first chunk's check against autograd adds one tangent the size of
    the largest parameter tensor touched (36 MB here)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 3000), nn.ReLU(), nn.Linear(3000, 3000), nn.ReLU(), nn.Linear(3000, 10)
    )
    total = sum(p.numel() for p in model.parameters())
    assert total > 11_000_000
    x = torch.randn(256, 784)
    y = torch.randint(0, 10, (256,))
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:200]
    with _PeakMemory() as mem:
        la = SubnetLaplace(model, idx, memory_budget="64MB").fit((x, y), batch_size=256)
        la.predict(x[:32])
    assert 256 * 10 * total * 4 > 100e9
    largest = 3000 * 3000 * 4
    assert mem.peak < 150e6 + largest, mem.peak
    assert la.ggn.shape == (200, 200) and torch.linalg.eigvalsh(la.ggn)[-1] > 0


def test_bad_inputs_get_clear_errors():
    model, (x, y) = _mlp(), _data()
    with pytest.raises(InputError, match="regression"):
        SubnetLaplace(model, torch.arange(5), likelihood="regression")
    with pytest.raises(InputError, match="larger than the model"):
        SubnetLaplace(model, torch.arange(44))
    with pytest.raises(InputError, match="larger than the model"):
        select_subnetwork(model, "random", 44)
    with pytest.raises(InputError, match="repeats"):
        SubnetLaplace(model, torch.tensor([1, 2, 2]))
    with pytest.raises(InputError, match="out of range"):
        SubnetLaplace(model, torch.tensor([1, 43]))
    with pytest.raises(InputError, match="out of range"):
        SubnetLaplace(model, torch.tensor([-1, 3]))
    with pytest.raises(InputError, match="too small for one input"):
        SubnetLaplace(model, torch.arange(10), memory_budget=100).fit((x, y))
    with pytest.raises(InputError, match="integer class labels"):
        SubnetLaplace(model, torch.arange(10)).fit((x, y.double()))
    with pytest.raises(InputError, match=r"shape \(\d+,\) have no axis beside the batch"):
        SubnetLaplace(model, torch.arange(10)).fit((x[:, 0], y))
    wrong = torch.cat([x, x], 1)  # other features than the model takes: torch's error, named
    for la in (SubnetLaplace(model, torch.arange(10)), DiagLaplace(model)):
        with pytest.raises(InputError, match=r"cannot run on these inputs .*of shape \(8,\)"):
            la.fit((wrong, y))
    with pytest.raises(ConfigError, match="not fitted"):
        SubnetLaplace(model, torch.arange(10)).predict(x)
    with pytest.raises(InputError, match="unknown subnetwork strategy"):
        select_subnetwork(model, "biggest", 3)
    with pytest.raises(InputError, match="no parameter matches"):
        select_subnetwork(model, "names", names=["conv9"])
    with pytest.raises(InputError, match="prior precision must be positive"):
        SubnetLaplace(model, torch.arange(3), prior_precision=0.0)
    la = SubnetLaplace(model, torch.arange(10)).fit((x, y))
    with pytest.raises(ConfigError, match="option 'link' of Laplace predictive must be one of"):
        la.predict(x, link="logit")
    with pytest.raises(InputError, match="NaN"):
        la.predict(torch.full((2, 4), float("nan"), dtype=torch.float64))
    la.ggn = -torch.eye(10, dtype=torch.float64) * 5  # a damaged / indefinite curvature
    la.prior_precision = 1.0
    with pytest.raises(ConfigError, match="not positive definite.*larger prior precision"):
        la.predict(x)


def test_dense_algebra_on_the_models_device_gives_the_host_result():
    """``linalg_device="model"`` runs Cholesky, eigendecomposition and solves where the model
    is (a GPU in practice; here the model is on the CPU, so the numbers must be identical) and
    hands back host tensors as the default does."""
    model, (x, y) = _mlp(), _data()
    idx = torch.arange(0, 40, 2)
    fits = []
    for dev in ("cpu", "model"):
        la = SubnetLaplace(model, idx, linalg_device=dev).fit((x, y))
        la.optimize_prior_precision("marglik")
        gen = torch.Generator().manual_seed(0)
        la._sample_params(gen)
        sampled = la._snapshot()
        la._restore(la.mean)
        fits.append((la.prior_precision, la.predict(x), la.predict(x, link="mc", n_samples=8),
                     la.posterior_covariance, sampled))  # fmt: skip
        assert la.posterior_covariance.device.type == "cpu"
    for a, b in zip(*fits):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="linalg_device"):
        SubnetLaplace(model, idx, linalg_device="gpu")


def test_dense_algebra_on_another_device_works_on_a_transient_copy(monkeypatch):
    """On another device than the host the GGN is copied there and the prior is added to the
    copy in place. Without a second device, make the copy happen on the host: every result
    equals the host path's, and the stored GGN is never written (a prior added to it in place
    would double-count the prior in the next factorisation)."""
    model, (x, y) = _mlp(), _data()
    idx = torch.arange(0, 40, 2)
    ref = SubnetLaplace(model, idx).fit((x, y))
    ref.optimize_prior_precision("marglik", per_layer=True, steps=20)
    expected = (ref.prior_precision, ref.predict(x), ref.posterior_covariance,
                ref.log_marginal_likelihood(2.0))  # fmt: skip
    copies = []

    def elsewhere(self):
        copies.append(1)
        return self.ggn.clone()  # what ``.to(device)`` hands back on another device

    monkeypatch.setattr(SubnetLaplace, "_ggn_la", elsewhere)
    la = SubnetLaplace(model, idx, linalg_device="model").fit((x, y))
    stored = la.ggn.clone()
    la.optimize_prior_precision("marglik", per_layer=True, steps=20)
    got = (la.prior_precision, la.predict(x), la.posterior_covariance,
           la.log_marginal_likelihood(2.0))  # fmt: skip
    assert copies, "the transient-copy path was not taken"
    assert torch.equal(la.ggn, stored)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
