"""Subnetwork Jacobians and Laplace fits on models bnnkit did not write: every one must give the
autograd answer or a clear error naming the layer, never a silently wrong Jacobian."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bnnkit import ConfigError, InputError
from bnnkit.laplace import DiagLaplace, SubnetJacobian, SubnetLaplace


def _brute_jacobian(model, x, select=lambda out: out):
    """J [n, C, P] over the flat trainable parameters by reverse-mode autograd."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    def f(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i : i + s.numel()].view(s)
            i += s.numel()
        return select(functional_call(model, params, (x.clone(),)))

    return torch.autograd.functional.jacobian(f, flat)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: in-place ReLU and ``out += identity``."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TinyResNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 6, stride=2)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _eval_with_stats(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.double().eval()


def _x(n=5, shape=(2, 6, 6), seed=1):
    return torch.randn(
        n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _total(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("subset", ["all", "random"])
def test_torchvision_style_resnet_jacobian_equals_autograd(subset):
    torch.manual_seed(0)
    model = _eval_with_stats(TinyResNet())
    x = _x()
    P = _total(model)
    idx = torch.arange(P) if subset == "all" else torch.randperm(P)[:60]
    _, J = SubnetJacobian(model, idx).logits_and_jacobian(x)
    ref = _brute_jacobian(model, x)[:, :, idx.sort().values]
    torch.testing.assert_close(J, ref, rtol=1e-9, atol=1e-11)


def test_torchvision_style_resnet_laplace_fits_match_brute_force():
    torch.manual_seed(0)
    model = _eval_with_stats(TinyResNet())
    x, y = _x(8), torch.randint(0, 3, (8,))
    Jall = _brute_jacobian(model, x)
    p = torch.softmax(model(x).detach(), -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    idx = torch.randperm(_total(model))[:40].sort().values
    la = SubnetLaplace(model, idx).fit((x, y), batch_size=3)
    Js = Jall[:, :, idx]
    torch.testing.assert_close(la.ggn, torch.einsum("nci,ncd,ndj->ij", Js, lam, Js))
    diag = DiagLaplace(model).fit((x, y), batch_size=3)
    torch.testing.assert_close(diag.h, torch.einsum("nci,ncd,ndi->i", Jall, lam, Jall))


class InplaceFunctional(nn.Module):
    """In-place ops written as tensor methods on layer outputs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        h.relu_()
        z = self.fc2(h)
        z += h  # in-place residual on a recorded output
        z.mul_(0.5)
        out = self.fc3(z)
        out -= 1.0
        return out


class AppliedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))  # the same layer a second time
        return self.head(h)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.head = nn.Linear(4, 5), nn.Linear(5, 3)
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.b.weight = self.a.weight  # two layers, one weight

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.inp(x))))
        return self.head(torch.tanh(self.b(h)))


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h


class DictOut(TupleOut):
    def forward(self, x):
        logits, h = super().forward(x)
        return {"features": h, "logits": logits}


@pytest.mark.parametrize(
    "cls, select",
    [
        (InplaceFunctional, lambda o: o),
        (AppliedTwice, lambda o: o),
        (Tied, lambda o: o),
        (TupleOut, lambda o: o[0]),
        (DictOut, lambda o: o["logits"]),
    ],
)
def test_other_model_shapes_give_the_autograd_jacobian(cls, select):
    torch.manual_seed(0)
    model = cls().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    P = _total(model)
    for idx in (torch.arange(P), torch.randperm(P)[: P // 3]):
        _, J = SubnetJacobian(model, idx).logits_and_jacobian(x)
        ref = _brute_jacobian(model, x, select)[:, :, idx.sort().values]
        torch.testing.assert_close(J, ref, rtol=1e-9, atol=1e-11)


class Functional(nn.Module):
    """Uses ``fc``'s weight outside ``fc.forward``: hooks cannot see that use."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))


class CustomLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


def test_parameters_used_outside_their_layer_are_refused_by_name():
    torch.manual_seed(0)
    model = Functional().eval()
    with pytest.raises(ConfigError, match="'fc.weight'.*F.linear"):
        SubnetJacobian(model, torch.arange(_total(model))).logits_and_jacobian(torch.randn(4, 4))
    custom = nn.Sequential(CustomLinear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    with pytest.raises(ConfigError, match="'0.weight'"):
        SubnetJacobian(custom, torch.arange(20)).logits_and_jacobian(torch.randn(4, 4))
    # parameters of correctly used layers pass the same check
    SubnetJacobian(model, torch.arange(25, 43)).logits_and_jacobian(torch.randn(4, 4))


class ModifiesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc1(x)
        out = self.fc2(h)
        h.mul_(2.0)  # fc2's recorded input changes after fc2 used it
        return out


def test_batch_coupling_training_mode_and_modified_inputs_are_refused():
    x = torch.randn(4, 2, 6, 6)
    model = TinyResNet()
    idx = torch.arange(10)
    with pytest.raises(ConfigError, match="BatchNorm layer 'bn1'.*batch statistics"):
        SubnetJacobian(model.train(), idx).logits_and_jacobian(x)
    stats_free = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.Flatten(),
        nn.Linear(48, 3),
    ).eval()  # fmt: skip
    with pytest.raises(ConfigError, match="BatchNorm layer '1'"):
        SubnetJacobian(stats_free, torch.arange(5)).logits_and_jacobian(x)
    dropout = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3))
    with pytest.raises(ConfigError, match="module '0' is in training mode"):
        SubnetJacobian(dropout, torch.arange(5)).logits_and_jacobian(torch.randn(3, 4))
    with pytest.raises(ConfigError, match="input of layer 'fc2' is modified in place"):
        SubnetJacobian(ModifiesInput().eval(), torch.arange(43)).logits_and_jacobian(
            torch.randn(3, 4)
        )


def test_unusable_outputs_are_refused():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"scores": self.fc(x)}

    with pytest.raises(InputError, match="'logits' entry"):
        SubnetJacobian(Weird().eval(), torch.arange(5)).logits_and_jacobian(torch.randn(2, 4))


class _Square(torch.autograd.Function):
    """A custom op with a backward but no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class CustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(_Square.apply(self.fc1(x)))


def test_custom_autograd_functions_are_checked_by_reverse_mode():
    torch.manual_seed(0)
    model = CustomOp().double().eval()
    x = torch.randn(6, 4, dtype=torch.float64)
    _, J = SubnetJacobian(model, torch.arange(43)).logits_and_jacobian(x)
    torch.testing.assert_close(J, _brute_jacobian(model, x), rtol=1e-9, atol=1e-11)


def test_jacobian_work_is_split_to_the_memory_budget_and_gives_the_same_jacobian():
    """A chunk sized for J alone holds every layer's per-class output gradients and unfolded
    inputs for all its inputs at once (~100 MB per input on a full ResNet-18): the work is
    split into pieces that fit the budget, and the Jacobian is the same."""
    from bnnkit.evaluate import _PeakMemory
    from bnnkit.laplace import as_logits_model
    from bnnkit.methods import ModelSpec, build_method

    torch.manual_seed(0)
    spec = ModelSpec("resnet18", (3, 16, 16), 10, (0.5,) * 3, (0.25,) * 3, {"width": 8})
    net = _eval_with_stats(as_logits_model(build_method("deterministic", spec)))
    total = _total(net)
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:400].sort()[0]
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    whole = SubnetJacobian(net, idx, memory_budget="4GB", verify=False)
    f_ref, J_ref = whole.logits_and_jacobian(x)
    assert whole._work_rows(x) >= len(x)  # one piece
    budget = 4 * 2**20
    split = SubnetJacobian(net, idx, memory_budget=budget, verify=False)
    rows = split._work_rows(x)
    assert 1 <= rows < len(x) // 3  # several pieces
    with _PeakMemory() as pm:
        f, J = split.logits_and_jacobian(x)
    assert torch.allclose(f, f_ref, atol=1e-6) and torch.allclose(J, J_ref, atol=1e-6)
    # the work of all 24 inputs at once is several budgets; a piece stays within one
    j_bytes = J.numel() * J.element_size()
    assert pm.peak <= j_bytes + 1.5 * budget, (pm.peak / 2**20, j_bytes / 2**20)
    with _PeakMemory() as pm_whole:
        whole.logits_and_jacobian(x)
    assert pm_whole.peak > j_bytes + 3 * budget  # what the split avoids


class _Scaled(nn.Module):
    """A classifier with a custom parameter used in its forward (a learnt output scale)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.full((1,), 3.0))  # the largest magnitude of the model

    def forward(self, x):
        return self.b(self.a(x).relu()) * self.scale


def test_selections_choose_only_what_a_subnetwork_laplace_can_fit():
    """A custom parameter outside Linear / Conv2d / BatchNorm layers is never selected (the
    fit would refuse it); the rules that need a diagonal Laplace over every parameter say how
    to proceed; freezing the parameter makes them work."""
    from bnnkit import ConfigError
    from bnnkit.laplace import SubnetLaplace, select_subnetwork

    torch.manual_seed(0)
    model = _Scaled().eval()
    x, y = torch.randn(512, 4), torch.randint(0, 3, (512,))
    offsets, at = {}, 0  # parameters_to_vector order (the root's own parameters first)
    for name, p in model.named_parameters():
        offsets[name], at = at, at + p.numel()
    scale_index = offsets["scale"]
    for strategy in ("random", "magnitude", "swag"):
        for n in (5, 67):  # 67: every fittable parameter
            idx = select_subnetwork(model, strategy, n, data=(x, y), seed=1, swag_epochs=2)
            assert len(idx) == n and scale_index not in idx.tolist()
    SubnetLaplace(model, select_subnetwork(model, "magnitude", 5)).fit((x, y))
    with pytest.raises(InputError, match="larger than the 67 parameters .*others: scale"):
        select_subnetwork(model, "random", 68)
    for strategy in ("largest_variance", "predictive_variance", "largest_variance_informed"):
        with pytest.raises(ConfigError, match="scale is elsewhere. Freeze it"):
            select_subnetwork(model, strategy, 5, data=(x, y))
    model.scale.requires_grad_(False)
    idx = select_subnetwork(model, "largest_variance", 5, data=(x, y))
    SubnetLaplace(model, idx).fit((x, y))
