"""Nothing stale: every cached quantity follows the writes it depends on."""

import pytest
import torch
from torch import nn

from bnnkit import ConfigError, bayesify
from bnnkit.evaluate import _PeakMemory
from bnnkit.laplace import DiagLaplace, SubnetLaplace
from bnnkit.models import build_model


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def test_refit_subnet_laplace_predicts_with_the_new_posterior():
    model, idx = _mlp(), torch.arange(0, 51, 2)
    xt = _data(7, 9)[0]
    la = SubnetLaplace(model, idx, prior_precision=0.5).fit(_data(30, 1))
    la.predictive(xt)  # caches the covariance root of the first fit
    la.fit(_data(60, 2))
    fresh = SubnetLaplace(model, idx, prior_precision=0.5).fit(_data(60, 2))
    torch.testing.assert_close(la.predictive(xt).probs, fresh.predictive(xt).probs)
    la.prior_precision = 3.0  # a new prior: a new root as well (reference built with it)
    direct = SubnetLaplace(model, idx, prior_precision=3.0).fit(_data(60, 2))
    torch.testing.assert_close(la.predictive(xt).probs, direct.predictive(xt).probs)


@pytest.mark.parametrize("cls", [SubnetLaplace, DiagLaplace])
def test_posterior_belongs_to_the_weights_it_was_fitted_at(cls):
    model = _mlp()
    la = cls(model, torch.arange(10)) if cls is SubnetLaplace else cls(model)
    with torch.no_grad():  # the user trains on after building the approximation
        for p in model.parameters():
            p.add_(0.1)
    la.fit(_data(30, 1))
    now = torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = now if cls is DiagLaplace else now[:10]
    torch.testing.assert_close(la.mean, expected)
    # sampled-weights prediction leaves the model exactly as it was, not at an older mean
    la.predictive(_data(5, 3)[0], link="sample_weights", n_samples=3)
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), now)
    # a write through .data (no version bump) after fitting: predicting is refused
    model[0].weight.data[0, 0] += 1e-3
    with pytest.raises(ConfigError, match="parameters changed since"):
        la.predictive(_data(5, 3)[0])
    la.fit(_data(30, 1))
    la.predictive(_data(5, 3)[0])


def test_members_schedule_follows_writes_through_data():
    torch.manual_seed(0)
    net = bayesify(build_model("lenet5", (1, 28, 28), 10), {"*": "batch_ensemble"}, members=3)
    net.eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        net.schedule = "members"
        net(x)  # keeps nothing across passes, but would have cached the small layers' weights
        net.body.fc3.weight.data.mul_(2.0)
        net.body.fc2.r.data.add_(0.5)
        after = net(x)
        net.schedule = "fold"
        reference = net(x)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)


def test_diagonal_laplace_retains_one_chunk_buffer_within_the_budget():
    """A budget small enough for many parameter chunks: the memory the fitted object keeps
    is one chunk's Jacobian buffer (within the budget) plus its per-parameter vectors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 10)).eval()
    P = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(64, 30), torch.randint(0, 10, (64,))
    budget = 256 * 1024
    with _PeakMemory() as mem:
        la = DiagLaplace(model, memory_budget=budget).fit((x, y), batch_size=64)
        kept = mem.live
    assert len(la._jac) > 3  # several parameter chunks
    per_param = 5 * 8 * P  # h, jacobian energy, mean, layer index, fingerprint slack (float64)
    assert kept <= budget + per_param, (kept, budget + per_param)


@pytest.mark.parametrize("write", ["imul", "setitem", "mul_", "replace"])
@pytest.mark.parametrize("cls", [SubnetLaplace, DiagLaplace])
def test_writes_to_the_curvature_invalidate_what_was_derived_from_it(cls, write):
    """``la.ggn *= 100`` (or ``la.h``) after a marginal likelihood, a covariance and a
    predictive were computed: each is recomputed from the written curvature, as a fresh object
    given that curvature computes it (and the covariance is the closed-form inverse)."""
    model, xt = _mlp(), _data(5, 3)[0]

    def make():
        if cls is SubnetLaplace:
            return cls(model, torch.arange(0, 51, 3), prior_precision=0.7).fit(_data(30, 1))
        return cls(model, prior_precision=0.7).fit(_data(30, 1))

    la = make()
    name = "ggn" if cls is SubnetLaplace else "h"
    before = la.log_marginal_likelihood().item(), la.predictive(xt).probs.clone()
    if write == "imul":
        if cls is SubnetLaplace:
            la.ggn *= 100.0
        else:
            la.h *= 100.0
    elif write == "setitem":
        t = getattr(la, name)
        t[(0,) * t.dim()] += 50.0  # one diagonal entry
    elif write == "mul_":
        getattr(la, name).mul_(100.0)
    else:
        setattr(la, name, getattr(la, name) * 100.0)
    written = getattr(la, name).clone()
    fresh = make()
    setattr(fresh, name, written)
    assert la.log_marginal_likelihood().item() != pytest.approx(before[0], rel=1e-6)
    assert la.log_marginal_likelihood().item() == pytest.approx(
        fresh.log_marginal_likelihood().item(), rel=1e-12
    )
    assert not torch.allclose(la.predictive(xt).probs, before[1], atol=1e-9)
    torch.testing.assert_close(la.predictive(xt).probs, fresh.predictive(xt).probs)
    if cls is SubnetLaplace:
        prior = torch.diag(la._prior_diag(la.prior_precision))
        torch.testing.assert_close(la.posterior_covariance, torch.linalg.inv(written + prior))


def test_a_curvature_of_the_wrong_shape_is_refused():
    la = SubnetLaplace(_mlp(), torch.arange(10)).fit(_data(30, 1))
    with pytest.raises(Exception, match=r"\[10, 10\] tensor"):
        la.ggn = torch.eye(9, dtype=torch.float64)
    d = DiagLaplace(_mlp()).fit(_data(30, 1))
    with pytest.raises(Exception, match="GGN diagonal must be"):
        d.h = torch.ones(3, dtype=torch.float64)
