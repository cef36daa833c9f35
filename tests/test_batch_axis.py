"""Ensemble layers read members' rows on axis 0: a body that moves the batch elsewhere
(sequence-first transposes) is refused by name instead of mixing members up silently, and
layouts that keep the member-major batch on axis 0 (batch-first tokens, tokens flattened into
the batch) give the same predictive as the plain model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bnnkit import InputError, bayesify

pytestmark = pytest.mark.timeout(120)


class Tokens(nn.Module):
    """[B, T, 5] -> [B, 3]; ``layout`` decides how ``f2`` sees the tokens."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.f0, self.f2, self.out = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.layout = layout

    def forward(self, x):
        h = self.f0(x).relu()
        if self.layout == "seq_first":
            y = self.f2(h.transpose(0, 1)).relu().transpose(0, 1)
        elif self.layout == "flat":  # tokens flattened into the (member-major) batch
            y = self.f2(h.reshape(-1, 8)).relu().reshape(h.shape)
        else:
            y = self.f2(h).relu()
        return self.out(y.mean(1))


def _pair(kind: str, layout: str, schedule: str):
    torch.manual_seed(0)
    plain = Tokens("batch_first")
    other = Tokens(layout)
    other.load_state_dict(plain.state_dict())
    a = bayesify(plain, {"f2": kind}, members=3)
    b = bayesify(other, {"f2": kind}, members=3)
    b.load_state_dict(a.state_dict())
    for n in (a, b):
        n.schedule = schedule
    return a, b


@pytest.mark.parametrize("kind", ["batch_ensemble", "rank1", "lpbnn"])
@pytest.mark.parametrize("schedule", ["fold", "members"])
@pytest.mark.parametrize("T", [6, 7, 30])  # not the folded batch's own size (see check_rows)
@pytest.mark.parametrize("train", [False, True])
def test_a_sequence_first_body_is_refused_not_mixed_up(kind, schedule, T, train):
    a, b = _pair(kind, "seq_first", schedule)
    a.train(train)
    b.train(train)
    x = torch.randn(5, T, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        want = a(x)
        torch.manual_seed(1)
        if kind == "batch_ensemble" and schedule == "members":
            # fixed factors, one effective weight per member: exact in any layout
            assert torch.allclose(b(x), want, atol=1e-5)
            return
        with pytest.raises(InputError, match="axis 0 is not the batch"):
            b(x)


@pytest.mark.parametrize("kind", ["batch_ensemble", "rank1"])
@pytest.mark.parametrize("schedule", ["fold", "members"])
def test_tokens_flattened_into_the_batch_give_the_plain_predictive(kind, schedule):
    a, b = _pair(kind, "flat", schedule)
    a.eval()
    b.eval()
    x = torch.randn(4, 6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2)
        want = a(x)
        torch.manual_seed(2)
        got = b(x)
    if kind == "batch_ensemble":
        assert torch.allclose(got, want, atol=1e-5)
    else:  # rank-1 draws its factors per row, here per token: same shape, a valid predictive
        assert got.shape == want.shape and torch.isfinite(got).all()


@pytest.mark.parametrize("estimator", ["flipout", "grouped"])
def test_variational_linear_draws_one_weight_per_example_not_per_position(estimator):
    """Tokens of one example share its weight sample (identical tokens, identical outputs), and
    each example's output has the closed-form mean and variance of a weight sample:
    x W_mu^T + b_mu and (x*x) sigma_W^2^T + sigma_b^2."""
    from bnnkit.nn import VariationalLinear

    torch.manual_seed(0)
    layer = VariationalLinear(6, 4, init_sigma=0.3, estimator=estimator)
    same = torch.randn(3, 1, 6).expand(3, 5, 6)
    y = layer(same)
    assert torch.allclose(y, y[:, :1].expand_as(y), atol=1e-6)
    assert not torch.allclose(y[0], y[1], atol=1e-3)  # examples differ
    x = torch.randn(6)
    # one example (2 positions) per pass: Flipout's rows share a pass's perturbation, so the
    # marginal over weight samples needs many passes
    with torch.no_grad():
        draws = torch.cat([layer(x.expand(1, 2, 6))[:, 0] for _ in range(8000)])
    w_var, b_var = layer._variances()
    with torch.no_grad():
        mean = layer.weight_mu @ x + layer.bias_mu
        var = w_var @ (x * x) + b_var
    assert torch.allclose(draws.mean(0), mean, atol=4 * (var / 8000).sqrt().max().item())
    assert torch.allclose(draws.var(0), var, rtol=0.1)


def test_mc_dropout_before_a_linear_masks_an_examples_columns_at_every_position():
    """The weight-space view (one mask over the weight's input columns per example, what
    network_samples exports): identical tokens of one example give identical outputs, a token's
    kept inputs are scaled by 1 / (1 - p), and about p of the columns are dropped."""
    from bnnkit.nn import MCDropoutLinear

    torch.manual_seed(0)
    layer = MCDropoutLinear(nn.Linear(40, 3), p=0.5)
    x = torch.randn(200, 1, 40).expand(200, 4, 40)
    y = layer(x)
    assert torch.allclose(y, y[:, :1].expand_as(y), atol=1e-6)
    dropped = layer[0](x)
    assert torch.equal(dropped == 0, (dropped == 0)[:, :1].expand_as(dropped))
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * x[kept])
    assert abs(float((~kept).float().mean()) - 0.5) < 0.02
    flat = layer[0](torch.ones(500, 40))  # [B, in]: plain dropout, as before
    assert abs(float((flat == 0).float().mean()) - 0.5) < 0.02
