"""Symmetry transforms never change the function, on generated networks: seeded random
compositions of Linear / Conv / BatchNorm / LayerNorm / ReLU / flatten / view / transpose / mean
/ constants / residual additions over vectors, tokens (``[B, T, D]``, ``T == D`` included),
sequences and images, with units on the last axis, on dim 1, or moved by transposes and views.
After every transform (random permutation, canonical form, random scaling, balancing) the network
computes the same outputs on fresh random inputs. The reshape rule is checked against brute
force: permuting units and then reshaping equals reshaping and then permuting where it says the
units land."""

import copy
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import ConfigError
from bnnkit.posterior import (
    balance,
    canonicalize,
    permutation_spec,
    permute,
    random_permutation,
    random_scales,
    rescale,
    scaling_spec,
)


class Generated(nn.Module):
    """Runs ``steps`` (op, argument) in order; ``mods`` holds the layers they call."""

    def __init__(self, steps, mods):
        super().__init__()
        self.steps = steps
        self.mods = nn.ModuleList(mods)

    def forward(self, x):
        for op, a in self.steps:
            if op == "mod":
                x = self.mods[a](x)
            elif op == "res":
                x = x + self.mods[a](x)
            elif op == "add_method":
                x = x.add(a)
            elif op == "add_op":
                x = x + a
            elif op == "rsub":
                x = a - x
            elif op == "mul":
                x = x * a
            elif op == "mean":
                x = x.mean(dim=a[0], keepdim=a[1])
            elif op == "flatten":
                x = torch.flatten(x, 1)
            elif op == "flatten_method":
                x = x.flatten(1)
            elif op == "view":
                x = x.view(x.size(0), *a)
            elif op == "transpose":
                x = x.transpose(1, 2)
            elif op == "relu":
                x = F.relu(x)
        return x


def generate(seed: int):
    """A random network and its input shape (without the batch axis)."""
    rng = random.Random(seed)
    layout = rng.choice(["vec", "tok", "tok_square", "seq", "img", "img"])
    if layout == "vec":
        shape = (rng.randint(2, 5),)
    elif layout == "tok":
        shape = (rng.randint(2, 4), rng.randint(2, 4))
    elif layout == "tok_square":
        d = rng.randint(2, 4)
        shape = (d, d)  # T == D: a wrong unit axis still has the right size
    elif layout == "seq":
        shape = (rng.randint(1, 3), rng.randint(3, 5))
    else:
        shape = (rng.randint(1, 3), rng.randint(3, 5), rng.randint(3, 5))
    start = shape
    steps, mods = [], []

    def mod(m, op="mod"):
        mods.append(m)
        steps.append((op, len(mods) - 1))

    const = [("add_method", 1.0), ("add_op", -0.5), ("mul", 1.5), ("mul", -2.0), ("rsub", 1.0)]
    for _ in range(rng.randint(2, 6)):
        nd = len(shape)
        moves = ["relu", "const", "act"]
        if nd == 1:
            moves += ["linear", "linear", "bn1d", "ln", "res_linear", "mean_units"]
        if nd == 2:
            moves += ["linear", "linear", "bn1d_tokens", "ln", "res_linear", "mean_tokens",
                      "mean_units", "flatten", "view_flat", "transpose", "conv1d"]  # fmt: skip
        if nd == 3:
            moves += ["conv2d", "conv2d", "bn2d", "res_conv", "mean_channels", "mean_spatial",
                      "flatten", "view_tokens", "pool"]  # fmt: skip
        move = rng.choice(moves)
        if move == "relu":
            mod(nn.ReLU()) if rng.random() < 0.5 else steps.append(("relu", None))
        elif move == "act":
            mod(rng.choice([nn.LeakyReLU(0.2), nn.Dropout(0.3), nn.Identity()]))
        elif move == "const":
            steps.append(rng.choice(const))
        elif move == "linear":
            k = rng.randint(2, 5)
            mod(nn.Linear(shape[-1], k, bias=rng.random() < 0.8))
            shape = (*shape[:-1], k)
        elif move == "bn1d":
            mod(nn.BatchNorm1d(shape[0]))
        elif move == "bn1d_tokens":  # BatchNorm1d over [B, T, D]: channels are the tokens
            mod(nn.BatchNorm1d(shape[0]))
        elif move == "ln":
            mod(nn.LayerNorm(shape[-1]))
        elif move == "res_linear":
            mod(nn.Sequential(nn.Linear(shape[-1], shape[-1]), nn.ReLU()), "res")
        elif move == "mean_units":  # over the last axis, kept
            steps.append(("mean", (-1, True)))
            shape = (*shape[:-1], 1)
        elif move == "mean_tokens":
            steps.append(("mean", (1, False)))
            shape = shape[1:]
        elif move == "flatten":
            steps.append((rng.choice(["flatten", "flatten_method"]), None))
            shape = (int(torch.tensor(shape).prod()),)
        elif move == "view_flat":
            steps.append(("view", (-1,)))
            shape = (int(torch.tensor(shape).prod()),)
        elif move == "transpose":
            steps.append(("transpose", None))
            shape = (shape[1], shape[0])
        elif move == "conv1d":  # [B, C, L]: units on dim 1, not on the last axis
            k = rng.randint(2, 4)
            mod(nn.Conv1d(shape[0], k, 3, padding=1))
            shape = (k, shape[1])
        elif move == "conv2d":
            k = rng.randint(2, 4)
            mod(nn.Conv2d(shape[0], k, 3, padding=1))
            shape = (k, *shape[1:])
        elif move == "bn2d":
            mod(nn.BatchNorm2d(shape[0]))
        elif move == "res_conv":
            c = shape[0]
            mod(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU()), "res")
        elif move == "mean_channels":  # over the units' axis
            steps.append(("mean", (1, True)))
            shape = (1, *shape[1:])
        elif move == "mean_spatial":
            steps.append(("mean", ((2, 3), False)))
            shape = shape[:1]
        elif move == "view_tokens":  # [B, C, H*W]: a later Linear mixes positions, not units
            steps.append(("view", (shape[0], -1)))
            shape = (shape[0], shape[1] * shape[2])
        elif move == "pool":
            mod(rng.choice([nn.MaxPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(1)]))
            shape = (shape[0], 1, 1) if isinstance(mods[-1], nn.AdaptiveAvgPool2d) else \
                (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2)  # fmt: skip
    if len(shape) > 1:
        steps.append(("flatten", None))
    mod(nn.Linear(int(torch.tensor(shape).prod()), 3))
    torch.manual_seed(seed)
    model = Generated(steps, mods).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model, start


def _load(model, state):
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other


def _same_function(model, state, x):
    with torch.no_grad():
        want = model(x)
        got = _load(model, state)(x)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9 * (1 + float(want.abs().max())))


SEEDS = list(range(72))  # 12 networks per chunk


@pytest.mark.parametrize("chunk", range(6))
def test_every_transform_keeps_the_function_of_generated_networks(chunk):
    groups = 0
    for seed in SEEDS[chunk::6]:
        model, shape = generate(seed)
        x = torch.randn(4, *shape, dtype=torch.float64)
        fresh = torch.randn(
            5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
        )
        state = model.state_dict()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pspec = permutation_spec(model, x)
            try:
                sspec = scaling_spec(model, x)
            except ConfigError:
                sspec = None
        groups += len(pspec.groups)
        g = torch.Generator().manual_seed(seed)
        for _ in range(2):
            _same_function(model, permute(state, pspec, random_permutation(pspec, g)), fresh)
        _same_function(model, canonicalize(state, pspec), fresh)
        if sspec is not None:
            groups += len(sspec.groups)
            _same_function(model, rescale(state, sspec, random_scales(sspec, g)), fresh)
            _same_function(model, balance(state, sspec), fresh)
    assert groups > 0  # the check is not vacuous: something moved


def test_generated_networks_cover_the_layouts_and_groups_survive_them():
    """The generator reaches every layout and op the rules distinguish (so the test above sees
    them), and groups survive where they should: tokens flattened (``outer > 1``), maps
    flattened (``repeat > 1``), LayerNorm parameters moving with the units."""
    seen = set()
    for seed in SEEDS:
        model, shape = generate(seed)
        seen |= {op for op, _ in model.steps}
        seen |= {type(m).__name__ for m in model.modules()}
        seen.add(("ndim", len(shape), len(set(shape)) < len(shape)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = permutation_spec(model, torch.randn(2, *shape, dtype=torch.float64))
        for key, axes in spec.axes.items():
            for a in axes.values():
                seen |= {"outer" if a.outer > 1 else "", "repeat" if a.repeat > 1 else ""}
                seen |= {"ln moves" if isinstance(model.get_submodule(key.rsplit(".", 1)[0]),
                                                  nn.LayerNorm) else ""}  # fmt: skip
    assert {"add_method", "mean", "flatten", "view", "transpose", "res", "BatchNorm1d",
            "BatchNorm2d", "LayerNorm", "Conv1d", "Conv2d", "MaxPool2d"} <= seen  # fmt: skip
    assert {("ndim", 2, True), ("ndim", 2, False), ("ndim", 3, False), ("ndim", 1, False)} <= seen
    assert {"outer", "repeat", "ln moves"} <= seen


# ---------------------------------------------------------------------- the reshape rule


def _random_regroup(rng, shape):
    """A random row-major regrouping of ``shape``: merge neighbours, split axes, add or drop
    size-1 axes."""
    dims = list(shape)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["merge", "split", "unsqueeze", "squeeze"])
        if kind == "merge" and len(dims) > 1:
            i = rng.randrange(len(dims) - 1)
            dims[i : i + 2] = [dims[i] * dims[i + 1]]
        elif kind == "split":
            i = rng.randrange(len(dims))
            fs = [f for f in range(2, dims[i]) if dims[i] % f == 0]
            if fs:
                f = rng.choice(fs)
                dims[i : i + 1] = [f, dims[i] // f]
        elif kind == "unsqueeze":
            dims.insert(rng.randint(0, len(dims)), 1)
        elif kind == "squeeze" and 1 in dims:
            dims.remove(1)
    return tuple(dims)


def _permute_units(x, axis, perm, repeat, outer):
    shape = x.shape
    v = x.reshape(*shape[:axis], outer, len(perm), repeat, *shape[axis + 1 :])
    return v.index_select(axis + 1, perm).reshape(shape)


def test_reshape_rule_agrees_with_brute_force():
    from bnnkit.posterior.graph import Track, reshape_track

    rng = random.Random(0)
    found = 0
    for trial in range(400):
        nd = rng.randint(1, 4)
        src = [rng.choice([1, 2, 3, 4]) for _ in range(nd)]
        axis = rng.randrange(nd)
        outer, n, repeat = rng.choice([1, 1, 2, 3]), rng.randint(2, 4), rng.choice([1, 1, 2, 3])
        src[axis] = outer * n * repeat
        src = tuple(src)
        dst = _random_regroup(rng, src)
        t = reshape_track(Track(0, axis, repeat, outer), src, dst)
        x = torch.randn(src, generator=torch.Generator().manual_seed(trial))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(trial))
        if t is None:
            continue
        found += 1
        assert dst[t.axis] == t.outer * n * t.repeat
        want = _permute_units(x, axis, perm, repeat, outer).reshape(dst)
        got = _permute_units(x.reshape(dst), t.axis, perm, t.repeat, t.outer)
        assert torch.equal(got, want), (src, axis, outer, n, repeat, dst, t)
    assert found > 300


@pytest.mark.parametrize(
    "src, axis, dst, want",
    [
        ((2, 5, 3, 3), 1, (2, 45), (1, 9, 1)),  # flatten(1) of [C, H, W]: blocks of H*W
        ((2, 4, 5), 2, (2, 20), (1, 1, 4)),  # flatten(1) of tokens [T, D], units on D
        ((2, 5, 5), 2, (2, 25), (1, 1, 5)),  # the same with T == D
        ((2, 5, 5), 1, (2, 25), (1, 5, 1)),
        ((2, 6, 1, 1), 1, (2, 6), (1, 1, 1)),
        ((2, 24), 1, (2, 6, 4), None),  # units of 24 entries split across two axes: ends
    ],
)
def test_reshape_rule_on_the_common_flattens(src, axis, dst, want):
    from bnnkit.posterior.graph import Track, reshape_track

    n = src[axis]
    t = reshape_track(Track(0, axis), src, dst)
    if want is None:
        assert t is None
    else:
        assert (t.axis, t.repeat, t.outer) == want and dst[t.axis] == n * t.repeat * t.outer
