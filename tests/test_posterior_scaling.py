"""Scaling symmetries: a random positive rescaling computes the same function; the balanced
(minimum-L2) representative is balanced per unit, unique over the orbit, and agrees with a
generic convex solver; non-homogeneous activations are refused; BatchNorm is handled without
touching the caller's model."""

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import ConfigError, InputError
from bnnkit.posterior.scaling import (
    _masses,
    balance,
    balancing_scales,
    random_scales,
    rescale,
    scaling_spec,
)
from posterior_models import ConvBN, _load, _model, _randomise_bn


def relu_mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.LeakyReLU(0.1),
                         nn.Linear(5, 3))  # fmt: skip


def _relu_model(name, seed=0):
    torch.manual_seed(seed)
    if name == "mlp":
        return relu_mlp().double().eval(), torch.randn(5, 4, dtype=torch.float64)
    return _model(name, seed)


NAMES = ["mlp", "conv_bn_flatten", "resnet", "lenet5"]


@pytest.mark.parametrize("name", NAMES)
def test_a_random_rescaling_computes_the_same_function(name):
    model, x = _relu_model(name)
    spec = scaling_spec(model, x)
    assert spec.groups
    state = model.state_dict()
    scaled = rescale(state, spec, random_scales(spec, torch.Generator().manual_seed(0)))
    assert any(not torch.allclose(scaled[k], state[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(_load(model, scaled)(x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_balanced_representative_is_balanced_unique_and_the_same_function(name):
    model, x = _relu_model(name)
    spec = scaling_spec(model, x)
    state = model.state_dict()
    bal = balance(state, spec)
    for g in spec.groups:  # every live unit: incoming squared mass == outgoing squared mass
        a, b = _masses(bal, spec, g)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(_load(model, bal)(x), model(x), rtol=1e-9, atol=1e-9)
    norm = sum(v.pow(2).sum() for k, v in bal.items() if "running" not in k)
    assert norm <= sum(v.pow(2).sum() for k, v in state.items() if "running" not in k) + 1e-9
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same representative from anywhere on the orbit
        other = balance(rescale(state, spec, random_scales(spec, g)), spec)
        for k in bal:
            torch.testing.assert_close(other[k], bal[k], rtol=1e-7, atol=1e-9)
    again = balance(bal, spec)
    for k in bal:
        torch.testing.assert_close(again[k], bal[k], rtol=1e-9, atol=1e-12)


def test_the_optimum_agrees_with_a_generic_convex_solver():
    from scipy.optimize import minimize

    model, x = _relu_model("mlp", seed=3)
    spec = scaling_spec(model, x)
    state = model.state_dict()
    sizes = list(spec.groups.values())

    def objective(logs):
        parts, i = {}, 0
        for g, n in spec.groups.items():
            parts[g] = torch.exp(torch.as_tensor(logs[i : i + n]))
            i += n
        s = rescale(state, spec, parts)
        return float(sum(v.pow(2).sum() for v in s.values()))

    res = minimize(objective, np.zeros(sum(sizes)), method="BFGS", options={"gtol": 1e-10})
    ours = balancing_scales(state, spec)
    ours_vec = np.concatenate([np.log(ours[g].numpy()) for g in spec.groups])
    assert objective(ours_vec) <= res.fun + 1e-9
    np.testing.assert_allclose(ours_vec, res.x, atol=1e-4)


def test_batchnorm_pre_norm_scale_is_left_and_nothing_of_the_caller_changes():
    torch.manual_seed(0)
    model = ConvBN().double().eval()
    with torch.no_grad():
        _randomise_bn(model, torch.Generator().manual_seed(0))
    x = torch.randn(3, 2, 10, 10, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    eps = [m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    spec = scaling_spec(model, x)
    # conv rows feed a BatchNorm (degenerate direction): no conv group, the BN output groups are
    assert set(spec.groups) == {"bn1", "bn2", "fc1"}
    bal = balance(model.state_dict(), spec)
    for k in ("conv1.weight", "conv1.bias", "bn1.running_mean", "bn2.running_var"):
        assert torch.equal(bal[k], before[k])
    assert not torch.equal(bal["bn1.weight"], before["bn1.weight"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == eps


def test_residual_streams_share_one_scale():
    model, x = _relu_model("resnet")
    spec = scaling_spec(model, x)
    stream = [g for g, sites in spec.incoming.items()
              if any(s.key == "bn1.weight" for s in sites)]  # fmt: skip
    keys = {s.key for s in spec.incoming[stream[0]]}
    assert {"bn1.weight", "layer1.0.bn2.weight", "layer1.1.bn2.weight"} <= keys


@pytest.mark.parametrize("act", [nn.Tanh(), nn.GELU(), nn.SiLU(), nn.Sigmoid()])
def test_non_homogeneous_activations_are_refused(act):
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double()
    with pytest.raises(ConfigError, match="positively homogeneous"):
        scaling_spec(model, torch.randn(2, 3, dtype=torch.float64))


def test_bad_scales_are_refused():
    model, x = _relu_model("mlp")
    spec = scaling_spec(model, x)
    g, n = next(iter(spec.groups.items()))
    with pytest.raises(InputError, match="positive"):
        rescale(model.state_dict(), spec, {g: -torch.ones(n, dtype=torch.float64)})
    with pytest.raises(InputError, match="unknown scale group"):
        rescale(model.state_dict(), spec, {"nope": torch.ones(n)})


# ---------------------------------------------------------------------- ops on the units' axis


class AfterRelu(nn.Module):
    """``op(relu(layer(x)))`` then a Linear head; ``op`` decides whether the layer's units keep
    their scaling symmetry."""

    def __init__(self, op, conv):
        super().__init__()
        self.op, self.conv = op, conv
        self.layer = nn.Conv2d(2, 4, 3) if conv else nn.Linear(5, 4)
        self.head = nn.Linear(4 * 4 if conv and op in ("mean1", "mean1_function") else 4, 3)

    def forward(self, x):
        h = F.relu(self.layer(x))
        if self.op == "add_method":
            h = h.add(1.0)
        elif self.op == "add_op":
            h = h + 1.0
        elif self.op == "rsub":
            h = 1.0 - h
        elif self.op == "add_input":
            h = h + x[:, :4]
        elif self.op == "square":
            h = h * h
        elif self.op == "mean1":
            h = h.mean(dim=1)
        elif self.op == "mean1_function":
            h = torch.mean(h, 1)
        elif self.op == "mul":
            h = h * 2.0 / 3.0
        elif self.op == "neg_abs":
            h = -h.abs()
        elif self.op == "mean_spatial":
            h = h.mean(dim=(2, 3), keepdim=True)
        elif self.op == "amax_spatial":
            h = torch.amax(h, dim=(2, 3))
        if self.conv and self.op not in ("amax_spatial",):
            h = h.flatten(1) if self.op != "mean_spatial" else h.view(h.size(0), -1)
        return self.head(h)


ENDS = {("add_method", False): ".add()", ("add_op", False): "operator.add",
        ("rsub", False): "operator.sub", ("add_input", False): "operator.add",
        ("square", False): "operator.mul", ("mean1", True): ".mean()",
        ("mean1_function", True): "torch.mean"}  # fmt: skip
KEEPS = [("mul", False), ("neg_abs", False), ("mean_spatial", True), ("amax_spatial", True)]


@pytest.mark.parametrize("op, conv", [*ENDS, *KEEPS])
def test_only_ops_homogeneous_on_the_units_axis_keep_the_group(op, conv):
    """Adding a constant or an unscaled tensor, squaring, and a mean over the units' axis end
    the group (with a warning naming the op); scalar factors, abs, negation and reductions over
    other axes keep it. Either way rescaling and balancing keep the function."""
    from bnnkit.posterior import graph

    torch.manual_seed(0)
    model = AfterRelu(op, conv).double().eval()
    x = (
        torch.randn(6, 2, 6, 6, dtype=torch.float64)
        if conv
        else torch.randn(6, 5, dtype=torch.float64)
    )
    graph._WARNED.clear()
    ends = (op, conv) in ENDS
    if ends:
        with pytest.warns(UserWarning, match=f"scaling_spec.*layer: .*{re.escape(ENDS[op, conv])}"):
            spec = scaling_spec(model, x)
    else:
        spec = scaling_spec(model, x)
    assert ("layer" in spec.groups) != ends
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    for transformed in (
        rescale(state, spec, random_scales(spec, g, spread=2.0)),
        balance(state, spec),
    ):
        with torch.no_grad():
            torch.testing.assert_close(_load(model, transformed)(x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("final", [torch.sigmoid, lambda z: F.log_softmax(z, dim=1)])
def test_an_activation_on_the_output_is_not_refused(final):
    """A sigmoid or log-softmax on the logits acts on units that never move: the hidden ReLU
    units keep their symmetry, and the function is kept."""
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return final(self.b(F.relu(self.a(x))))

    model, x = Head().double(), torch.randn(5, 3, dtype=torch.float64)
    spec = scaling_spec(model, x)
    assert set(spec.groups) == {"a"}
    with torch.no_grad():
        torch.testing.assert_close(_load(model, balance(model.state_dict(), spec))(x), model(x))
    with pytest.raises(ConfigError, match="positively homogeneous.*Sigmoid at .1."):
        scaling_spec(nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double(), x)


def test_balancing_that_runs_out_of_sweeps_says_so():
    """An unconverged balance warns (how far off it is) instead of passing for the minimum-norm
    representative; the converged one does not warn."""
    import warnings

    from bnnkit.posterior.scaling import BalanceWarning

    model, x = _relu_model("mlp")  # two coupled groups: one sweep is not exact
    spec = scaling_spec(model, x)
    state = rescale(model.state_dict(), spec, random_scales(spec, torch.Generator().manual_seed(0)))
    with pytest.warns(BalanceWarning, match="did not converge in 2 sweeps.*max_sweeps"):
        early = balance(state, spec, max_sweeps=2)
    with torch.no_grad():
        torch.testing.assert_close(_load(model, early)(x), model(x), rtol=1e-9, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal = balance(state, spec)
    a, b = _masses(bal, spec, next(iter(spec.groups)))
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
