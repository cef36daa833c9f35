"""Placement-aware inference: the deterministic prefix runs once per input and the result equals
the naive computation (input repeated at the entry), random draws included."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import bayesify
from bnnkit.models import build_model
from bnnkit.models.placement import PlacementFallback

KINDS = {
    "batch_ensemble": dict(members=3),
    "rank1": dict(members=3, options={"rank1": {"init_scale": 0.3}}),
    "lpbnn": dict(members=3),
    "mc_dropout": dict(members=1, options={"mc_dropout": {"p": 0.3}}),
    "variational": dict(members=1, options={"variational": {"init_sigma": 0.1}}),
}


def _both(net, x, samples, schedule):
    """(placement-aware, naive) outputs from the same random state."""
    net.eval()
    net.schedule = schedule
    with torch.no_grad():
        torch.manual_seed(7)
        net.prefix_once = True
        fast = net(x, samples)
        torch.manual_seed(7)
        net.prefix_once = False
        naive = net(x, samples)
    net.prefix_once = True
    return fast, naive


def _batch_seen(module, net, x, samples):
    """Rows ``module`` sees in one call, after a first call (which also checks the prefix on
    ``2B`` rows: models/placement.py)."""
    seen = []
    with torch.no_grad():
        net(x, samples)
    h = module.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        net(x, samples)
    h.remove()
    return seen


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("schedule", ["fold", "members"])
def test_late_stochastic_layers_on_lenet(kind, schedule):
    torch.manual_seed(0)
    net = bayesify(
        build_model("lenet5", (1, 28, 28), 10), {"fc2": kind, "fc3": kind}, **KINDS[kind]
    )
    x = torch.rand(5, 1, 28, 28)
    fast, naive = _both(net, x, samples=2, schedule=schedule)
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-6)
    # the convolutions and fc1 ran once on the 5 inputs, not once per member and sample
    assert _batch_seen(net.body.conv1, net, x, 2) == [5]


@pytest.mark.parametrize("kind", ["batch_ensemble", "rank1", "variational", "mc_dropout"])
@pytest.mark.parametrize("schedule", ["fold", "members"])
def test_first_stochastic_layer_inside_a_residual_block(kind, schedule):
    """layer2.0.conv1 is stochastic; the block's shortcut (a deterministic 1x1 conv of the same
    input) and the identity paths around it must be repeated at the boundary."""
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 16, 16), 10, width=4)
    plan = {"layer2.0.conv1": kind, "layer3*": kind, "fc": kind}
    net = bayesify(model, plan, **KINDS[kind])
    x = torch.rand(3, 3, 16, 16)
    fast, naive = _both(net, x, samples=2, schedule=schedule)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-5)
    assert _batch_seen(net.body.layer1[0].conv1, net, x, 2) == [3]
    assert _batch_seen(net.body.layer2[0].shortcut[0], net, x, 2) == [3]  # bypasses the tail
    R = 3 * 2 if KINDS[kind]["members"] == 3 else 2
    seen = _batch_seen(net.body.layer2[0].conv2, net, x, 2)
    assert sum(seen) == R * 3  # the tail sees every member and sample


def test_training_and_untraceable_bodies_take_the_naive_path():
    torch.manual_seed(0)
    net = bayesify(build_model("lenet5", (1, 28, 28), 10), {"fc3": "batch_ensemble"}, members=2)
    x = torch.rand(4, 1, 28, 28)
    net.train()
    net.schedule = "fold"
    assert _batch_seen(net.body.conv1, net, x, 1) == [8]  # training: naive (BatchNorm stats)
    net.eval()
    assert _batch_seen(net.body.conv1, net, x, 1) == [4]

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # data-dependent control flow: fx cannot trace it
                h = h * 2
            return self.b(torch.relu(h))

    class SizeReshape(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            n = x.size(0)
            return self.b(torch.relu(self.a(x))).reshape(n, -1)  # the prefix's batch size

    reasons = {Branchy: "cannot trace", SizeReshape: "not a \\[B, ...\\] tensor"}
    for cls in (Branchy, SizeReshape):
        torch.manual_seed(1)
        net = bayesify(cls(), {"b": "rank1"}, members=2)
        xi = torch.randn(5, 4)
        with pytest.warns(PlacementFallback, match=reasons[cls]):
            fast, naive = _both(net, xi, samples=2, schedule="fold")
        torch.testing.assert_close(fast, naive)
        assert fast.shape == (4, 5, 3)


def test_custom_stochastic_kind_marks_itself():
    class Noise(nn.Module):
        bnnkit_stochastic = True

        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x) + torch.randn_like(self.layer(x))

    from bnnkit.convert import KINDS as REGISTRY
    from bnnkit.convert import register_kind

    register_kind("noise_test", lambda layer, members: Noise(layer))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        net = bayesify(model, {"2": "noise_test"})
        x = torch.randn(6, 4)
        fast, naive = _both(net, x, samples=3, schedule="fold")
        torch.testing.assert_close(fast, naive)
        assert fast.std(0).min() > 0  # the samples differ
        assert _batch_seen(net.body[0], net, x, 3) == [6]
    finally:
        del REGISTRY["noise_test"]


def test_structure_changes_rebuild_the_split():
    torch.manual_seed(0)
    net = bayesify(build_model("lenet5", (1, 28, 28), 10), {"fc3": "batch_ensemble"}, members=2)
    net.eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        before = net(x)
        net.body.fc1 = nn.Linear(net.body.fc1.in_features, 120)  # a new layer object
        after = net(x)
        net.prefix_once = False
        naive = net(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, naive)
    assert F.softmax(after, -1).shape == (2, 3, 10)


def test_mc_dropout_run_the_usual_way_is_the_same_function(tmp_path):
    """``prefix_once=False`` (the whole network every pass, as MC dropout is usually run) is
    an execution choice only: same predictive for the same seed, kept through save/load."""
    from bnnkit.methods import ModelSpec, UQModel, build_method

    spec = ModelSpec("lenet5", (1, 28, 28), 10)
    torch.manual_seed(0)
    fast = build_method("mc_dropout", spec, {"samples": 4})
    torch.manual_seed(0)
    full = build_method("mc_dropout", spec, {"samples": 4, "prefix_once": False})
    assert fast.net.prefix_once and not full.net.prefix_once
    x = torch.rand(5, 1, 28, 28)
    torch.manual_seed(1)
    a = fast.predict(x).probs
    torch.manual_seed(1)
    b = full.predict(x).probs
    assert torch.allclose(a, b, atol=1e-6)
    full.save(tmp_path / "m.safetensors")
    assert not UQModel.load(tmp_path / "m.safetensors").net.prefix_once
