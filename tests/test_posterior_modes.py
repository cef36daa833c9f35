"""Loss barriers, modes and functional diversity against independent truths: a convex model has
no barrier, a network and its aligned permuted copy are one point, identical members carry no
mutual information, BatchNorm statistics are re-estimated along paths."""

import copy

import pytest
import torch
from torch import nn

from bnnkit import InputError
from bnnkit.posterior import align, permutation_spec, permute, random_permutation
from bnnkit.posterior.modes import (
    barrier,
    count_modes,
    interpolate,
    pairwise_mutual_information,
    path_losses,
)
from posterior_models import _load, _model


def _data(shape, n=64, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def test_a_convex_model_has_no_barrier():
    """Softmax regression: the loss is convex in the weights, so it lies below the chord."""
    torch.manual_seed(0)
    net = nn.Linear(5, 3).double()
    a = net.state_dict()
    b = {k: v + torch.randn_like(v) for k, v in a.items()}
    x, y = _data((5,))
    ts, losses, _ = path_losses(net, a, b, x, y, points=21)
    assert barrier(ts, losses) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        start = float(torch.nn.functional.cross_entropy(net(x), y))
    assert float(losses[0]) == pytest.approx(start)


def test_a_permuted_copy_has_a_barrier_until_aligned():
    model, _ = _model("mlp")
    x, y = _data((5,), n=128)
    spec = permutation_spec(model, x)
    a = model.state_dict()
    b = permute(a, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    ts, naive, _ = path_losses(model, a, b, x, y)
    assert torch.isclose(naive[0], naive[-1])  # the same function at both ends
    assert barrier(ts, naive) > 1e-3  # but not the same point: the path leaves the function
    ts, aligned, _ = path_losses(model, a, align(a, b, spec), x, y)
    assert barrier(ts, aligned) == pytest.approx(0.0, abs=1e-12)


def test_batchnorm_statistics_are_reestimated_along_the_path():
    model, x = _model("conv_bn_flatten")
    y = torch.randint(0, 3, (len(x),))
    a = model.state_dict()
    with pytest.raises(InputError, match="bn_data"):
        path_losses(model, a, a, x, y)
    bn_data = torch.randn(32, *x.shape[1:], dtype=torch.float64)
    _, losses, _ = path_losses(model, a, a, x, y, points=3, bn_data=bn_data)
    # the same network everywhere, with statistics re-estimated on bn_data: equal to a network
    # whose statistics were estimated the same way by hand
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        ref(bn_data)
    ref.eval()
    with torch.no_grad():
        expect = float(torch.nn.functional.cross_entropy(ref(x), y))
    assert torch.allclose(losses, torch.full_like(losses, expect))
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())  # caller untouched


def test_modes_are_connected_components_of_low_barriers():
    b = torch.tensor([[0.0, 0.1, 5.0, 5.0], [0.1, 0.0, 5.0, 5.0], [5.0, 5.0, 0.0, 9.0],
                      [5.0, 5.0, 9.0, 0.0]])  # fmt: skip
    assert count_modes(b, 1.0) == (3, [0, 0, 1, 2])
    assert count_modes(b, 6.0) == (1, [0, 0, 0, 0])  # 2-3 joined through 0 (single linkage)
    with pytest.raises(InputError, match="square"):
        count_modes(torch.zeros(2, 3), 1.0)


def test_pairwise_mutual_information():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 20, 4, generator=g, dtype=torch.float64), -1)
    p = torch.cat([p, p[:1]])  # member 3 = member 0
    mi = pairwise_mutual_information(p)
    assert mi[0, 3] == 0 and torch.all(mi.diagonal() == 0) and torch.allclose(mi, mi.T)
    assert mi[0, 1] > 0
    # brute force: the mutual information of (member in {i, j} uniform, label) per input
    i, j = 1, 2
    joint = torch.stack([p[i], p[j]], 1) / 2  # [N, 2, C]
    pm, pc = joint.sum(2, keepdim=True), joint.sum(1, keepdim=True)
    brute = (joint * (joint / (pm * pc)).log()).sum((1, 2)).mean()
    assert float(mi[i, j]) == pytest.approx(float(brute), rel=1e-12)
    with pytest.raises(InputError, match="members, inputs, classes"):
        pairwise_mutual_information(p[0])


def test_interpolation_endpoints_and_refusals():
    model, _ = _model("mlp")
    a = model.state_dict()
    b = {k: v * 2 for k, v in a.items()}
    assert all(torch.equal(interpolate(a, b, 0.0)[k], a[k]) for k in a)
    assert all(torch.allclose(interpolate(a, b, 1.0)[k], b[k]) for k in a)
    with pytest.raises(InputError, match="different keys"):
        interpolate(a, {"x": torch.zeros(1)}, 0.5)
    assert _load  # shared helpers


def test_largest_weight_index_is_uniform_over_permutations_and_fixed_after_canonicalising():
    """Random permutations of one network spread the index of fc1's largest weight over its
    rows; their canonical forms all put it in one place (the paper's symmetry diagnostic)."""
    from bnnkit.posterior import canonicalize, largest_weight_index, uniformity_pvalue

    model, x = _model("mlp")
    spec = permutation_spec(model, x)
    g = torch.Generator().manual_seed(0)
    nets = [permute(model.state_dict(), spec, random_permutation(spec, g)) for _ in range(140)]
    rows = largest_weight_index(nets, "0.weight") // 5  # the hidden unit holding it (7 units)
    assert uniformity_pvalue(rows, 7) > 0.01
    canon = largest_weight_index([canonicalize(s, spec) for s in nets[:10]], "0.weight")
    assert len(set(canon.tolist())) == 1
    assert uniformity_pvalue(torch.zeros(140, dtype=torch.long), 7) < 1e-10


def _relu_mlp(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(),
                        nn.Linear(8, 3)).double().eval()  # fmt: skip
    with torch.no_grad():  # confident logits, so that leaving the function costs loss
        for p in net.parameters():
            p.mul_(2.5)
    return net


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_barrier_matrix_sees_through_permutations_and_rescalings(activation):
    """A network, a permuted copy and (ReLU only) a permuted and rescaled copy compute one
    function: aligned barriers between them vanish, naive ones do not; a network of another
    seed is a matrix entry like any other. Tanh networks have no scaling symmetry: permutations
    only, no error."""
    from bnnkit.posterior import random_scales, rescale, scaling_spec
    from bnnkit.posterior.modes import barrier_matrix

    model = _relu_mlp(0) if activation == "relu" else _model("mlp")[0]
    x, y = _data((5,), n=128)
    if activation == "relu":
        with torch.no_grad():
            y = model(x).argmax(1)  # labels the network fits: leaving its function costs loss
    spec = permutation_spec(model, x)
    g = torch.Generator().manual_seed(1)
    a = model.state_dict()
    states = [a, permute(a, spec, random_permutation(spec, g))]
    if activation == "relu":
        sspec = scaling_spec(model, x)
        scaled = rescale(a, sspec, random_scales(sspec, g, spread=1.0))
        states.append(permute(scaled, spec, random_permutation(spec, g)))
    other = (_relu_mlp(5) if activation == "relu" else _model("mlp", seed=5)[0]).state_dict()
    states.append(other)
    B = barrier_matrix(model, states, x, y, aligned=True)
    n = len(states)
    assert B.shape == (n, n) and torch.equal(B, B.T) and torch.all(B.diagonal() == 0)
    assert float(B[: n - 1, : n - 1].max()) < 1e-9
    naive = barrier_matrix(model, states, x, y, aligned=False)
    assert float(naive[0, 1]) > 1e-3
    _, labels = count_modes(B, 1e-6)
    assert len(set(labels[: n - 1])) == 1


def test_loss_plane_passes_through_the_three_networks():
    from bnnkit.posterior.modes import loss_plane

    model = _relu_mlp(0)
    x, y = _data((5,), n=64)
    a, b = model.state_dict(), _relu_mlp(1).state_dict()
    keys = list(a)
    fa = torch.cat([a[k].reshape(-1) for k in keys])
    d1 = torch.cat([b[k].reshape(-1) for k in keys]) - fa
    w = torch.randn(fa.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w = w - (w @ d1) / (d1 @ d1) * d1  # c - a orthogonal to b - a: c sits at u = 0
    c = dict(zip(keys, [p.view_as(a[k]) for k, p in zip(keys, torch.split(
        fa + w, [a[k].numel() for k in keys]))]))  # fmt: skip
    r = loss_plane(model, a, b, c, x, y, grid=5, margin=0.0)
    torch.testing.assert_close(
        r["points"],
        torch.tensor(
            [[0.0, 0.0], [float(d1.norm()), 0.0], [0.0, float(w.norm())]], dtype=torch.float64
        ),
    )
    for (i, j), s in (((0, 0), a), ((0, -1), b), ((-1, 0), c)):
        ref, _ = _loss_of(model, s, x, y)
        assert float(r["loss"][i, j]) == pytest.approx(ref, rel=1e-10)
    assert r["loss"].shape == (5, 5) and float(r["accuracy"].max()) <= 1
    with pytest.raises(InputError, match="same network"):
        loss_plane(model, a, a, c, x, y)
    with pytest.raises(InputError, match="collinear"):
        loss_plane(model, a, b, interpolate(a, b, 2.0), x, y)
    bn, xb = _model("conv_bn_flatten")
    s = bn.state_dict()
    with pytest.raises(InputError, match="bn_data"):
        loss_plane(bn, s, {k: v * 2 for k, v in s.items()}, {k: v * 3 + 1 for k, v in s.items()},
                   xb, torch.zeros(len(xb), dtype=torch.long))  # fmt: skip


def _loss_of(model, state, x, y):
    net = _load(model, state)
    with torch.no_grad():
        logits = net(x)
    return float(torch.nn.functional.cross_entropy(logits, y)), logits


def test_barrier_matrix_with_batchnorm_and_residual_groups():
    """A ResNet with residual permutation groups and BatchNorm: a permuted copy is one point
    after alignment (statistics re-estimated along the path), and BatchNorm needs bn_data."""
    from bnnkit.posterior.modes import barrier_matrix

    model, _ = _model("resnet")
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the network fits: leaving its function costs loss
    spec = permutation_spec(model, x)
    a = model.state_dict()
    b = permute(a, spec, random_permutation(spec, torch.Generator().manual_seed(3)))
    bn_data = x
    with pytest.raises(InputError, match="bn_data"):
        barrier_matrix(model, [a, b], x, y)
    B = barrier_matrix(model, [a, b], x, y, points=5, bn_data=bn_data)
    assert float(B[0, 1]) < 1e-9
    naive = barrier_matrix(model, [a, b], x, y, aligned=False, points=5, bn_data=bn_data)
    assert float(naive[0, 1]) > 1e-3
