"""Permutation symmetries: a permuted network computes the same function; the canonical form is
idempotent and invariant to permutations of its input (ties included); what the rules do not
understand stays fixed instead of being permuted wrongly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import ConfigError, InputError
from bnnkit.posterior import (
    canonical_permutation,
    canonicalize,
    compose,
    invert,
    permutation_spec,
    permute,
    random_permutation,
)
from posterior_models import CASES, _load, _model


@pytest.mark.parametrize("name", list(CASES))
def test_a_random_permutation_computes_the_same_function(name):
    model, x = _model(name)
    spec = permutation_spec(model, x)
    assert len(spec.groups) == CASES[name][2]
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        perms = random_permutation(spec, g)
        permuted = permute(state, spec, perms)
        assert any(not torch.equal(permuted[k], state[k]) for k in spec.axes)
        with torch.no_grad():
            torch.testing.assert_close(_load(model, permuted)(x), model(x), rtol=0, atol=1e-10)
    assert all(torch.equal(state[k], before[k]) for k in state)  # the input is not mutated


def test_resnet_groups_are_the_residual_streams_and_block_interiors():
    model, x = _model("resnet")
    spec = permutation_spec(model, x)
    stream1 = spec.axes["conv1.weight"][0].group
    # every block of layer1 writes into the stem's stream; layer2 starts a new one (downsample)
    for key in ("bn1.weight", "layer1.0.bn2.running_mean", "layer1.1.bn2.bias"):
        assert spec.axes[key][0].group == stream1
    assert spec.axes["layer1.0.conv1.weight"][1].group == stream1
    stream2 = spec.axes["layer2.0.downsample.0.weight"][0].group
    assert spec.axes["layer2.0.bn2.weight"][0].group == stream2 != stream1
    assert spec.axes["fc.weight"] == {1: spec.axes["fc.weight"][1]}  # output never permuted
    assert spec.axes["fc.weight"][1].group == stream2


def test_flatten_moves_blocks_of_spatial_positions():
    model, x = _model("conv_bn_flatten")
    spec = permutation_spec(model, x)
    a = spec.axes["fc1.weight"][1]
    assert a.group == spec.axes["conv2.weight"][0].group and a.repeat == 9


@pytest.mark.parametrize("name", list(CASES))
def test_canonical_form_is_idempotent_invariant_and_the_same_function(name):
    model, x = _model(name)
    spec = permutation_spec(model, x)
    state = model.state_dict()
    canon = canonicalize(state, spec)
    with torch.no_grad():
        torch.testing.assert_close(_load(model, canon)(x), model(x), rtol=0, atol=1e-10)
    again = canonicalize(canon, spec)
    assert all(torch.equal(again[k], canon[k]) for k in canon)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        shuffled = permute(state, spec, random_permutation(spec, g))
        other = canonicalize(shuffled, spec)
        assert all(torch.equal(other[k], canon[k]) for k in canon)


def test_canonical_form_with_tied_keys():
    """Units with equal norms (one row the reverse of another) and exact duplicates of incoming
    weights (told apart by their outgoing weights) still give one canonical form."""
    model, x = _model("mlp")
    with torch.no_grad():
        w, b = model[0].weight, model[0].bias
        w[1] = w[0].flip(0)
        b[1] = b[0]
        w[3], b[3] = w[2], b[2]  # units 2 and 3: identical incoming weights and bias
        model[2].weight[:, 3] = model[2].weight[:, 2].flip(0)
        w[5] = 0.0  # a dead unit and a unit with an all-zero row tie on the norm too
        b[5] = 0.0
    spec = permutation_spec(model, x)
    state = model.state_dict()
    canon = canonicalize(state, spec)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        other = canonicalize(permute(state, spec, random_permutation(spec, g)), spec)
        assert all(torch.equal(other[k], canon[k]) for k in canon)


def test_canonical_permutation_recovers_a_known_permutation():
    model, x = _model("conv_bn_flatten")
    spec = permutation_spec(model, x)
    state = model.state_dict()
    perms = random_permutation(spec, torch.Generator().manual_seed(4))
    shuffled = permute(state, spec, perms)
    to_canon = canonical_permutation(shuffled, spec)
    from_state = canonical_permutation(state, spec)
    # shuffled -> canonical equals state -> canonical after undoing the shuffle
    for gname in spec.groups:
        assert torch.equal(perms[gname][to_canon[gname]], from_state[gname])
    back = permute(shuffled, spec, invert(perms))
    assert all(torch.equal(back[k], state[k]) for k in state)
    twice = permute(permute(state, spec, perms), spec, perms)
    assert all(torch.equal(twice[k], permute(state, spec, compose(perms, perms))[k]) for k in state)


class Unknown(nn.Module):
    """A concatenation and a parameter used by a function: the rules must not permute what
    they feed (fixed), and the rest still permutes safely."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.c = nn.Linear(6, 5)
        self.w = nn.Parameter(torch.randn(5, 5))
        self.d = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        h = F.relu(self.c(h))
        h = F.linear(h, self.w)
        return self.out(F.relu(self.d(h)))


class SharedWeight(nn.Module):
    """``fc2.weight`` used by its module and by a function: neither of its axes may move."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = F.relu(self.fc2(h))
        return self.out(h + F.linear(h, self.fc2.weight))


@pytest.mark.filterwarnings("ignore:permutation_spec leaves units fixed")
@pytest.mark.parametrize("cls, groups", [(Unknown, {"d"}), (SharedWeight, set())])
def test_unknown_operations_stay_fixed_and_the_function_is_kept(cls, groups):
    torch.manual_seed(0)
    model = cls().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    spec = permutation_spec(model, x)
    assert set(spec.groups) == groups
    perms = random_permutation(spec, torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = _load(model, permute(model.state_dict(), spec, perms))(x)
        torch.testing.assert_close(y, model(x), rtol=0, atol=1e-10)


def test_bad_inputs_are_refused_clearly():
    model, x = _model("mlp")
    spec = permutation_spec(model, x)
    state = model.state_dict()
    g = next(iter(spec.groups))
    with pytest.raises(InputError, match="unknown permutation group 'nope'"):
        permute(state, spec, {"nope": torch.arange(3)})
    with pytest.raises(InputError, match="must reorder 0..6"):
        permute(state, spec, {g: torch.zeros(7, dtype=torch.long)})
    with pytest.raises(InputError, match="lacks"):
        permute({}, spec, {})

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow

    with pytest.raises(ConfigError, match="cannot trace Untraceable.*by hand"):
        permutation_spec(Untraceable(), x)


@pytest.mark.parametrize("name", list(CASES))
def test_weight_matching_recovers_a_known_permutation(name):
    from bnnkit.posterior import align, weight_matching

    model, x = _model(name)
    spec = permutation_spec(model, x)
    state = model.state_dict()
    perms = random_permutation(spec, torch.Generator().manual_seed(5))
    shuffled = permute(state, spec, perms)
    found = weight_matching(state, shuffled, spec)
    for g in spec.groups:  # exactly the inverse of the shuffle
        assert torch.equal(found[g], invert(perms)[g])
    aligned = align(state, shuffled, spec)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


class SizeArithmetic(nn.Module):
    """Flattening through arithmetic on sizes (``view(n, c * h * w)``), a common idiom."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(2, 3, 3), nn.Linear(3 * 4 * 4, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = h.view(h.size(0), h.size(1) * h.size(2) * h.size(3))
        return self.fc2(F.relu(self.fc1(h)))


def test_arithmetic_on_sizes_is_not_a_tensor_op():
    from bnnkit.posterior import random_scales, rescale, scaling_spec

    torch.manual_seed(0)
    model = SizeArithmetic().double().eval()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    spec = permutation_spec(model, x)
    assert set(spec.groups) == {"conv", "fc1"} and spec.axes["fc1.weight"][1].repeat == 16
    state = permute(model.state_dict(), spec, random_permutation(spec))
    sspec = scaling_spec(model, x)
    state = rescale(state, sspec, random_scales(sspec))
    with torch.no_grad():
        torch.testing.assert_close(_load(model, state)(x), model(x), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------- units on other axes


class TokenHead(nn.Module):
    """A Linear over tokens ``[B, T, D]`` (units on the last axis), optionally a BatchNorm1d whose
    channels are the tokens, then ``flatten(1)`` and a Linear head: the head's columns hold ``T``
    blocks of the ``D`` units, not ``D`` contiguous blocks."""

    def __init__(self, T, D, bn):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(T) if bn else nn.Identity()
        self.head = nn.Linear(T * D, 3)

    def forward(self, x):
        return self.head(torch.flatten(self.bn(F.relu(self.fc(x))), 1))


@pytest.mark.parametrize("T, D, bn", [(4, 4, False), (4, 4, True), (3, 5, False), (5, 3, True)])
def test_linear_over_tokens_then_flatten_keeps_the_function(T, D, bn):
    torch.manual_seed(0)
    model = TokenHead(T, D, bn).double().eval()
    if bn:
        with torch.no_grad():
            model.bn.running_mean.normal_()
            model.bn.running_var.uniform_(0.5, 2.0)
            model.bn.weight.normal_()
            model.bn.bias.normal_()
    x = torch.randn(6, T, D, dtype=torch.float64)
    spec = permutation_spec(model, x)
    assert spec.groups == {"fc": D}
    a = spec.axes["head.weight"][1]
    assert (a.group, a.repeat, a.outer) == ("fc", 1, T)
    assert not any(k.startswith("bn.") for k in spec.axes)  # its channels are tokens, not units
    state = model.state_dict()
    g = torch.Generator().manual_seed(1)
    for transformed in [permute(state, spec, random_permutation(spec, g)) for _ in range(3)] + [
        canonicalize(state, spec)
    ]:
        with torch.no_grad():
            torch.testing.assert_close(_load(model, transformed)(x), model(x), rtol=0, atol=1e-10)
    from bnnkit.posterior import align

    shuffled = permute(state, spec, random_permutation(spec, g))
    aligned = align(state, shuffled, spec)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


class Transposed(nn.Module):
    """Units moved by transposes and views: a Conv1d's channels become the last axis of
    ``[B, L, C]`` (a Linear reads them), a LayerNorm normalises them; a ``[B, C, H*W]`` view puts
    a Conv2d's channels on dim 1 where a Linear mixes positions instead (that group must end)."""

    def __init__(self):
        super().__init__()
        self.conv1d, self.ln, self.fc = (
            nn.Conv1d(2, 4, 3, padding=1),
            nn.LayerNorm(4),
            nn.Linear(4, 5),
        )
        self.conv2d, self.pos = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(16, 2)
        self.head = nn.Linear(5 * 6 + 3 * 2, 3)

    def forward(self, x):
        s = x.flatten(2)[:, :, :6]  # [B, 2, 6] sequences
        h = self.fc(self.ln(F.relu(self.conv1d(s)).transpose(1, 2)))  # [B, 6, 5]
        m = F.relu(self.conv2d(x))  # [B, 3, 4, 4]
        p = self.pos(m.view(m.size(0), m.size(1), -1))  # [B, 3, 2]: mixes positions
        return self.head(torch.cat([h.flatten(1), p.flatten(1)], 1))


def test_units_follow_transposes_and_end_where_a_layer_reads_another_axis():
    torch.manual_seed(0)
    model = Transposed().double().eval()
    with torch.no_grad():
        model.ln.weight.normal_()
        model.ln.bias.normal_()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="conv2d.*Linear at 'pos'"):
        spec = permutation_spec(model, x)
    assert set(spec.groups) == {"conv1d"}  # fc, pos feed torch.cat; conv2d ends at pos
    assert spec.axes["fc.weight"] == {1: spec.axes["conv1d.weight"][0]}
    assert set(spec.axes["ln.weight"]) == {0}
    state = model.state_dict()
    for transformed in (permute(state, spec, random_permutation(spec)), canonicalize(state, spec)):
        with torch.no_grad():
            torch.testing.assert_close(_load(model, transformed)(x), model(x), rtol=0, atol=1e-10)


class AppliedTwice(nn.Module):
    """One Linear applied to its own output, once on the input's (fixed) units."""

    def __init__(self, pre):
        super().__init__()
        self.pre = nn.Linear(4, 4) if pre else nn.Identity()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(F.relu(self.fc(F.relu(self.pre(x)))))))


@pytest.mark.parametrize("pre, groups", [(False, 0), (True, 1)])
def test_a_layer_applied_twice_moves_alike_for_both_calls(pre, groups):
    torch.manual_seed(0)
    model = AppliedTwice(pre).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    spec = permutation_spec(model, x)
    assert len(spec.groups) == groups
    state = model.state_dict()
    for transformed in (permute(state, spec, random_permutation(spec)), canonicalize(state, spec)):
        with torch.no_grad():
            torch.testing.assert_close(_load(model, transformed)(x), model(x), rtol=0, atol=1e-10)


def test_ops_that_end_a_group_are_named_once_and_known_models_warn_nothing():
    import warnings

    from bnnkit.posterior import graph

    torch.manual_seed(0)
    model, x = Unknown().double().eval(), torch.randn(3, 4, dtype=torch.float64)
    graph._WARNED.clear()
    with pytest.warns(UserWarning, match=r"a, b: torch\.cat .*c: F\.linear"):
        permutation_spec(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        permutation_spec(model, x)  # once per process
        for name in CASES:
            permutation_spec(*_model(name))
