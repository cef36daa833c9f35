"""Scaling symmetries: a random positive rescaling computes the same function; the balanced
(minimum-L2) representative is balanced per unit, unique over the orbit, and agrees with a
generic convex solver; non-homogeneous activations are refused; BatchNorm is handled without
touching the caller's model."""

import copy

import numpy as np
import pytest
import torch
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
