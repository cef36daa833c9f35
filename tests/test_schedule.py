"""The two execution schedules of a folded ensemble ("fold": one pass over all members' rows;
"members": one pass per member with factors folded into the weights) compute the same function,
the same gradients and the same BatchNorm statistics."""

import copy

import pytest
import torch
from torch import nn

from bnnkit import InputError
from bnnkit.convert import bayesify
from bnnkit.models import Folded, build_model
from bnnkit.nn import (
    BatchEnsembleConv2d,
    BatchEnsembleLinear,
    EnsembleBatchNorm2d,
    aux_loss,
    member_mode,
)


def _pair(net: Folded) -> tuple[Folded, Folded]:
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    a.schedule, b.schedule = "fold", "members"
    return a, b


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "kw",
    [
        dict(stride=1, padding=0, groups=1, bias=True),
        dict(stride=2, padding=1, groups=1, bias=False),
        dict(stride=1, padding=2, groups=2, bias=True),
        dict(stride=1, padding=1, groups=4, bias=True, dilation=2),
    ],
)
def test_member_mode_conv_equals_folded_conv(kw):
    torch.manual_seed(0)
    M, n = 3, 5
    layer = BatchEnsembleConv2d(4, 8, 3, M, factor_init="random_sign", **kw)
    with torch.no_grad():
        layer.r.normal_(1, 0.7)
        layer.s.normal_(1, 0.7)
    x = torch.randn(M * n, 4, 9, 9)
    ref = layer(x)
    for m in range(M):
        with member_mode(layer, m):
            out = layer(x[m * n : (m + 1) * n])
        torch.testing.assert_close(out, ref[m * n : (m + 1) * n], rtol=1e-5, atol=1e-5)
    assert layer._member is None  # the context restores fold mode


def test_member_mode_linear_and_out_of_range_member():
    torch.manual_seed(0)
    M, n = 4, 3
    layer = BatchEnsembleLinear(6, 5, M, factor_init="normal")
    x = torch.randn(M * n, 6)
    ref = layer(x)
    for m in range(M):
        with member_mode(layer, m):
            torch.testing.assert_close(layer(x[m * n : (m + 1) * n]), ref[m * n : (m + 1) * n])
    with pytest.raises(InputError, match="out of range"):
        with member_mode(layer, M):
            pass


def _lenet_be(kind="batch_ensemble", **opts):
    torch.manual_seed(0)
    net = build_model("lenet5", (1, 28, 28), 10)
    plan = {"*": kind}
    return bayesify(net, plan, members=4, options={kind: opts} if opts else None)


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("batch_ensemble", {}),
        ("rank1", {"init_scale": 0.0}),  # zero posterior scale: deterministic factors
        ("lpbnn", {}),
    ],
)
def test_schedules_agree_on_outputs_and_gradients(kind, opts):
    net = _lenet_be(kind, **opts)
    for mod in net.modules():
        if isinstance(getattr(mod, "sample", None), bool):
            mod.sample = False  # locations only, so both schedules see the same factors
    fold, members = _pair(net)
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    for net_ in (fold, members):
        out = net_(x, samples=2)
        loss = nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))
        (loss + aux_loss(net_)).backward()  # LP-BNN's VAE term: mean over members
    torch.testing.assert_close(members(x), fold(x), rtol=1e-5, atol=1e-5)
    ga, gb = _grads(fold), _grads(members)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-4, atol=1e-6, msg=k)


def test_resnet_with_member_batchnorm_agrees_in_training_and_eval():
    torch.manual_seed(0)
    net = build_model("resnet18", (3, 32, 32), 10, width=8)
    net = bayesify(net, {"*": "batch_ensemble"}, members=3, ensemble_batchnorm=True)
    fold, members = _pair(net)
    x = torch.rand(4, 3, 32, 32)
    fold.train(), members.train()
    torch.testing.assert_close(members(x), fold(x), rtol=1e-4, atol=1e-5)
    # running statistics updated identically (slices of the per-member buffers)
    bn_f = [m for m in fold.modules() if isinstance(m, EnsembleBatchNorm2d)]
    bn_m = [m for m in members.modules() if isinstance(m, EnsembleBatchNorm2d)]
    assert len(bn_f) > 0
    for a, b in zip(bn_f, bn_m):
        torch.testing.assert_close(b.bn.running_mean, a.bn.running_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.bn.running_var, a.bn.running_var, rtol=1e-4, atol=1e-6)
        assert int(a.bn.num_batches_tracked) == int(b.bn.num_batches_tracked) == 1
    fold.eval(), members.eval()
    torch.testing.assert_close(members(x), fold(x), rtol=1e-4, atol=1e-5)


def test_auto_keeps_shared_batchnorm_statistics_over_all_members():
    torch.manual_seed(0)
    net = build_model("resnet18", (3, 32, 32), 10, width=8)
    net = bayesify(net, {"*": "batch_ensemble"}, members=3)  # BatchNorm stays shared
    auto, fold = copy.deepcopy(net), copy.deepcopy(net)
    fold.schedule = "fold"
    members = copy.deepcopy(net)
    members.schedule = "members"
    x = torch.rand(4, 3, 32, 32)
    for n_ in (auto, fold, members):
        n_.train()
    out_auto, out_fold, out_members = auto(x), fold(x), members(x)
    torch.testing.assert_close(out_auto, out_fold)
    # forcing "members" normalises with one member's statistics: a different function
    assert (out_members - out_fold).abs().max() > 1e-3
    for n_ in (auto, fold):
        n_.eval()
    torch.testing.assert_close(auto(x), fold(x), rtol=1e-4, atol=1e-5)


def test_split_protocol_forward_folded_agrees():
    net = _lenet_be()
    fold, members = _pair(net)
    xf = torch.rand(8, 1, 28, 28)  # 4 members x 2 rows, member-major
    torch.testing.assert_close(members.forward_folded(xf), fold.forward_folded(xf), rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    with pytest.raises(InputError, match="multiple of 4"):
        members.forward_folded(xf[:7])


def test_unknown_schedule():
    with pytest.raises(InputError, match="unknown schedule"):
        Folded(nn.Linear(2, 2), 2, schedule="fast")


def test_sampled_rank1_member_mode_uses_member_posterior():
    """Per-row samples in member mode come from that member's component: with zero scale the
    sample equals member m's location; perturbing member 1 moves only member 1's rows."""
    torch.manual_seed(0)
    net = _lenet_be("rank1", init_scale=0.0)
    net.schedule = "members"
    x = torch.rand(3, 1, 28, 28)
    base = net(x, samples=2)
    layer = next(m for m in net.modules() if hasattr(m, "r") and hasattr(m.r, "loc"))
    with torch.no_grad():
        layer.r.loc[1].mul_(1.5)
    moved = net(x, samples=2)
    change = (moved - base).abs().flatten(1).amax(1)  # per (member, sample) row
    assert change[2:4].min() > 1e-4
    assert change[:2].max() == 0 and change[4:].max() == 0


def _calls_of_first_layer(net, x, train):
    layer = next(m for m in net.body.modules() if hasattr(m, "factors"))
    calls = []
    handle = layer.register_forward_hook(lambda *a: calls.append(1))
    net.train(train)
    with torch.set_grad_enabled(train):
        net(x)
    handle.remove()
    return len(calls)


def test_auto_schedule_rules_on_cpu():
    x = torch.rand(2, 1, 28, 28)
    # BatchEnsemble LeNet: member by member in training and inference
    assert _calls_of_first_layer(_lenet_be(), x, train=True) == 4
    assert _calls_of_first_layer(_lenet_be(), x, train=False) == 4
    # rank-1 samples factors per row: folded in training, member by member at inference
    assert _calls_of_first_layer(_lenet_be("rank1"), x, train=True) == 1
    assert _calls_of_first_layer(_lenet_be("rank1"), x, train=False) == 4
    # full-width ResNet-18 (layers above 65,536 weights): folded in training
    torch.manual_seed(0)
    net = build_model("resnet18", (3, 32, 32), 10)
    net = bayesify(net, {"*": "batch_ensemble"}, members=4, ensemble_batchnorm=True)
    xr = torch.rand(1, 3, 32, 32)
    assert _calls_of_first_layer(net, xr, train=True) == 1
    assert _calls_of_first_layer(net, xr, train=False) == 4
