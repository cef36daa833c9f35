"""Placement-aware inference is exact or not used: generated bodies with in-place and random ops
on both sides of the first stochastic layer, against naive inference (the input repeated at the
entry, run eagerly) from the same random state."""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import bayesify
from bnnkit.models import placement
from bnnkit.models.placement import PlacementFallback, PrefixSplit, split_prefix

KINDS = {
    "batch_ensemble": dict(members=3),
    "rank1": dict(members=3, options={"rank1": {"init_scale": 0.3}}),
    "lpbnn": dict(members=3),
    "mc_dropout": dict(members=1, options={"mc_dropout": {"p": 0.3}}),
    "variational": dict(members=1, options={"variational": {"init_sigma": 0.1}}),
}
D = 6


def _both(net, x, samples=2, schedule="fold"):
    """(placement-aware output, naive output, fallback warnings) from the same random state."""
    net.eval()
    net.schedule = schedule
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(7)
        net.prefix_once = True
        fast = net(x, samples)
        torch.manual_seed(7)
        net.prefix_once = False
        naive = net(x, samples)
    net.prefix_once = True
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, PlacementFallback)]
    return fast, naive, fallbacks


def _batch_seen(module, net, x, samples=2):
    seen = []
    h = module.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", PlacementFallback)
        net(x, samples)
    h.remove()
    return seen


# --- the cases, every kind ------------------------------------------------------------


class ReluAfterHead(nn.Module):
    """A head reads the features, then an in-place ReLU rectifies them for a second branch."""

    def __init__(self):
        super().__init__()
        self.features, self.head, self.aux = nn.Linear(4, D), nn.Linear(D, 3), nn.Linear(D, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        f = self.features(x)
        out = self.head(f)
        return out + self.aux(self.act(f))


class InplaceResidual(nn.Module):
    """``h.add_(block(h))`` around a block whose first layer is made Bayesian."""

    def __init__(self):
        super().__init__()
        self.stem, self.out = nn.Linear(4, D), nn.Linear(D, 3)
        self.block = nn.Sequential(nn.Linear(D, D), nn.Tanh())

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h.add_(self.block(h))
        return self.out(h)


def mix_into(h, y):
    """A user function torch.fx keeps opaque (``torch.fx.wrap``) that writes ``h`` in place."""
    h.add_(y)
    return h


torch.fx.wrap("mix_into")


class OpaqueWrite(InplaceResidual):
    """The residual write hidden in an opaque function: the op is unknown to the checks."""

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        mix_into(h, self.block(h))
        return self.out(h)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", ["relu_after_head", "inplace_residual", "opaque_write"])
def test_inplace_writes_across_the_split_take_the_naive_path(kind, case):
    torch.manual_seed(0)
    if case == "relu_after_head":
        net = bayesify(ReluAfterHead(), {"head": kind}, **KINDS[kind])
    else:
        cls = InplaceResidual if case == "inplace_residual" else OpaqueWrite
        net = bayesify(cls(), {"block.0": kind}, **KINDS[kind])
    x = torch.randn(5, 4)
    fallbacks = []
    for schedule in ("fold", "members"):
        fast, naive, caught = _both(net, x, samples=2, schedule=schedule)
        torch.testing.assert_close(fast, naive)
        assert fast.std(0).min() > 0  # the stochastic layer is not dropped: members differ
        fallbacks += caught
    assert len(fallbacks) == 1  # once per model, with the reason
    assert ("in place" if case != "opaque_write" else "mix_into") in fallbacks[0], fallbacks


RANDOM_PREFIX_OPS = {
    "F.dropout(training=True)": lambda h: F.dropout(h, 0.3, training=True),
    "F.dropout (default)": lambda h: F.dropout(h, 0.3),
    "torch.rand": lambda h: h * torch.rand(h.shape),
    "torch.randn_like": lambda h: h + torch.randn_like(h),
    "Tensor.bernoulli": lambda h: h * torch.full_like(h, 0.5).bernoulli(),
    "Tensor.normal_": lambda h: h + torch.zeros_like(h).normal_(),
    "F.rrelu(training=True)": lambda h: F.rrelu(h, training=True),
}


@pytest.mark.parametrize("op", list(RANDOM_PREFIX_OPS))
def test_random_ops_before_the_first_stochastic_layer_take_the_naive_path(op):
    fn = RANDOM_PREFIX_OPS[op]

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, D), nn.Linear(D, D), nn.Linear(D, 3)

        def forward(self, x):
            return self.c(torch.relu(self.b(fn(self.a(x)))))

    for kind in ("batch_ensemble", "variational"):
        torch.manual_seed(0)
        net = bayesify(Body(), {"c": kind}, **KINDS[kind])
        fast, naive, fallbacks = _both(net, torch.randn(8, 4), samples=3)
        torch.testing.assert_close(fast, naive)  # the same draws: same spread as naive
        assert len(fallbacks) == 1 and "random" in fallbacks[0], fallbacks


def test_dropout_modules_follow_their_mode():
    """An nn.Dropout before the first stochastic layer is the identity in eval mode (the split
    is kept) and random in training mode (e.g. switched on for MC dropout after net.eval())."""
    body = nn.Sequential(nn.Linear(4, D), nn.Dropout(0.5), nn.Linear(D, D), nn.Linear(D, 3))
    torch.manual_seed(0)
    net = bayesify(body, {"3": "batch_ensemble"}, members=3)
    x = torch.randn(6, 4)
    fast, naive, fallbacks = _both(net, x)
    torch.testing.assert_close(fast, naive)
    assert not fallbacks and _batch_seen(net.body[0], net, x) == [6]
    net.eval()
    net.body[1].train()  # dropout on at prediction, the rest in eval mode
    net.train = lambda mode=True: net  # keep _both's net.eval() from resetting it
    fast, naive, fallbacks = _both(net, x)
    torch.testing.assert_close(fast, naive)
    assert len(fallbacks) == 1 and "nn.Dropout at '1'" in fallbacks[0]


# --- generated bodies ----------------------------------------------------------------------

# each op reads one or two live values ``[B, D]`` and appends its result (or writes in place)
PLAIN = ["linear", "linear", "bayes", "relu", "tanh", "add", "mul", "view", "dropout_module_eval"]
INPLACE = ["relu_module_inplace", "relu_functional_inplace", "relu_", "add_", "iadd", "setitem",
           "mul_out"]  # fmt: skip
RANDOM = ["dropout_training", "randn_like", "rand"]


class Generated(nn.Module):
    def __init__(self, program):
        super().__init__()
        self.program = program
        n = sum(op in ("linear", "bayes") for op, *_ in program)
        self.lin = nn.ModuleList(nn.Linear(D, D) for _ in range(n))
        self.inplace_relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.4)
        self.stem, self.head = nn.Linear(4, D), nn.Linear(D, 3)

    def forward(self, x):
        vals = [self.stem(x)]
        k = 0
        for op, i, j in self.program:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if op in ("linear", "bayes"):
                vals.append(self.lin[k](a))
                k += 1
            elif op == "relu":
                vals.append(torch.relu(a))
            elif op == "tanh":
                vals.append(a.tanh())
            elif op == "add":
                vals.append(a + b)
            elif op == "mul":
                vals.append(a * b)
            elif op == "view":
                vals.append(a.view(-1, 2, D // 2).flatten(1))
            elif op == "relu_module_inplace":
                vals.append(self.inplace_relu(a))
            elif op == "relu_functional_inplace":
                vals.append(F.relu(a, inplace=True))
            elif op == "relu_":
                a.relu_()
            elif op == "add_":
                a.add_(b)
            elif op == "iadd":
                vals[i % len(vals)] += b
            elif op == "setitem":
                a[:, 0] = b[:, 1]
            elif op == "mul_out":
                torch.mul(b, 0.5, out=a)
            elif op == "dropout_training":
                vals.append(F.dropout(a, 0.3, training=True))
            elif op == "randn_like":
                vals.append(a + 0.5 * torch.randn_like(a))
            elif op == "rand":
                vals.append(a * torch.rand(a.shape))
            elif op == "dropout_module_eval":
                vals.append(self.drop(a))
        return self.head(sum(vals[-3:]))


def _program(rng, length=9):
    """Plain ops with 0-2 in-place or random ops at random places (before or after the first
    Bayesian layer), reading random earlier values."""
    ops = [rng.choice(PLAIN) for _ in range(length)]
    for _ in range(rng.choice([0, 1, 1, 2])):
        ops[rng.randrange(length)] = rng.choice(INPLACE + RANDOM)
    if "bayes" not in ops:
        ops[rng.randrange(length)] = "bayes"
    return [(op, rng.randrange(8), rng.randrange(8)) for op in ops]


def _generated_net(prog, kind):
    body = Generated(prog)
    plan, k = {}, 0
    for op, *_ in prog:
        if op in ("linear", "bayes"):
            if op == "bayes":
                plan[f"lin.{k}"] = kind
            k += 1
    return bayesify(body, plan, **KINDS[kind])


def test_generated_bodies_match_naive_inference():
    """Random compositions of deterministic, in-place and random ops around Bayesian layers:
    placement-aware inference equals naive inference from the same random state, both
    schedules; a body with neither in-place nor random ops keeps the split."""
    rng = random.Random(0)
    kinds = list(KINDS)
    took_split = fell_back = clean = 0
    for t in range(60):
        prog = _program(rng)
        kind = kinds[t % len(kinds)]
        torch.manual_seed(t)
        net = _generated_net(prog, kind)
        x = torch.randn(4, 4)
        schedule = "members" if t % 2 else "fold"
        fast, naive, fallbacks = _both(net, x, samples=2, schedule=schedule)
        torch.testing.assert_close(
            fast, naive, msg=lambda m, p=prog, k=kind: f"{m}\nprogram {p}, {k}"
        )
        took_split += not fallbacks
        fell_back += bool(fallbacks)
        if not any(op in INPLACE + RANDOM for op, *_ in prog):
            clean += 1
            assert not fallbacks, (prog, fallbacks)
    assert took_split >= 10 and fell_back >= 10 and clean >= 3, (took_split, fell_back, clean)


# --- not too conservative: in-place ops that do not cross the split keep it ---------------


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock: in-place ReLUs and ``out += identity``."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TorchvisionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(TorchvisionBlock(), TorchvisionBlock(), TorchvisionBlock())
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["batch_ensemble", "mc_dropout"])
@pytest.mark.parametrize("plan", [{"fc": "K"}, {"blocks.1.conv1": "K", "fc": "K"}])
def test_inplace_ops_within_one_side_keep_the_split(kind, plan):
    torch.manual_seed(0)
    net = bayesify(TorchvisionNet(), {k: kind for k in plan}, **KINDS[kind])
    x = torch.randn(3, 3, 8, 8)
    fast, naive, fallbacks = _both(net, x, samples=2)
    torch.testing.assert_close(fast, naive)
    assert not fallbacks
    assert _batch_seen(net.body.blocks[0].conv1, net, x) == [3]  # the prefix ran once


# --- errors: a bug surfaces, a user's untraceable forward warns ---------------------------


def test_a_bug_inside_the_split_is_not_swallowed(monkeypatch):
    torch.manual_seed(0)
    net = bayesify(InplaceResidual(), {"out": "batch_ensemble"}, members=2)
    net.eval()
    x = torch.randn(3, 4)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the split")

    for name in ("is_stochastic", "_effect", "_check"):
        with monkeypatch.context() as m:
            m.setattr(placement, name, broken)
            net.__dict__.pop("_split_cache", None)
            with pytest.raises(RuntimeError, match="a bug in the split"):
                net(x, 2)


def test_an_untraceable_forward_warns_once_with_the_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:
                h = h * 2
            return self.b(h)

    torch.manual_seed(0)
    net = bayesify(Branchy(), {"b": "rank1"}, members=2)
    x = torch.randn(5, 4)
    fast, naive, fallbacks = _both(net, x)
    torch.testing.assert_close(fast, naive)
    _, _, again = _both(net, x)
    assert len(fallbacks) == 1 and "cannot trace" in fallbacks[0] and not again
    assert isinstance(split_prefix(net.body), placement.NaivePath)


def test_augmented_assignment_is_traced_in_place():
    """Plain torch.fx records ``h += y`` as ``h + y``: an alias of ``h`` taken before then
    differs from eager PyTorch. The tracer records the in-place op, so the graph is the body."""

    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, D), nn.Linear(4, D), nn.Linear(D, 3)

        def forward(self, x):
            h = self.a(x)
            kept = h
            h += self.b(x)
            return self.c(kept)

    body = Alias()
    x = torch.randn(3, 4)
    graph = placement._Tracer().trace(body)
    gm = torch.fx.GraphModule(body, graph)
    torch.testing.assert_close(gm(x), body(x))
    torch.manual_seed(0)
    net = bayesify(Alias(), {"c": "batch_ensemble"}, members=2)
    fast, naive, fallbacks = _both(net, x)
    torch.testing.assert_close(fast, naive)
    assert not fallbacks and isinstance(split_prefix(net.body), PrefixSplit)


# --- the prefix must compute each row from that row alone, batch on axis 0 -------------------

T = 4  # tokens; the batch below has T rows too, so a moved batch axis still has B entries
BATCH_OPS = {  # op -> (before the first stochastic layer, row by row with the batch on axis 0)
    "softmax over the batch": False,
    "std over the batch": False,
    "sum over the batch": False,
    "positions (arange over tokens)": False,
    "transpose(0, 1)": False,
    "softmax over units": True,
    "mean over tokens": True,
    "transpose(1, 2) and back": True,
}


class BatchOp(nn.Module):
    """``[B, T, 4]`` tokens; ``op`` runs before the stochastic layer ``mid``."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.stem, self.mid, self.head = nn.Linear(4, D), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h, op, extra = self.stem(x), self.op, 0.0
        if op == "softmax over the batch":
            h = h.softmax(0)
        elif op == "std over the batch":
            h = (h - h.mean(0)) / h.std(0)
        elif op == "sum over the batch":
            h = h / h.abs().sum(0)
        elif op == "positions (arange over tokens)":
            extra = torch.arange(x.shape[1], dtype=x.dtype)[:, None]
        elif op == "softmax over units":
            h = h.softmax(-1)
        elif op == "mean over tokens":
            h = h - h.mean(1, keepdim=True)
        elif op == "transpose(1, 2) and back":
            h = h.transpose(1, 2).tanh().transpose(1, 2)
        if op == "transpose(0, 1)":  # time-major [T, B, D] through a row-wise stochastic layer
            h = self.mid(h.transpose(0, 1)).transpose(0, 1).reshape(-1, T, D)
        else:
            h = self.mid(h) + extra
        return self.head(h.mean(1))


@pytest.mark.parametrize("kind", ["batch_ensemble", "mc_dropout", "variational"])  # on tokens
@pytest.mark.parametrize("op", list(BATCH_OPS))
def test_prefixes_that_mix_rows_or_move_the_batch_axis_take_the_naive_path(kind, op):
    """Naive inference runs the prefix on the batch repeated R times: an op over the batch (a
    softmax, std or sum over it) then sees R copies of every row, and a value whose first axis
    is not the batch (positions over T = B tokens, a time-major transpose) is repeated along
    the wrong axis. Both pass the allow-list and the [B, ...] shape check; the split must still
    equal naive inference, and say why it is not used. Row-wise ops keep the split."""
    if op == "transpose(0, 1)" and kind == "batch_ensemble":
        pytest.skip("members split axis 0, which the naive path gives the tokens")
    torch.manual_seed(0)
    net = bayesify(BatchOp(op), {"mid": kind}, **KINDS[kind])
    x = torch.randn(T, T, 4)  # B == T
    for schedule in ("fold", "members"):
        fast, naive, fallbacks = _both(net, x, samples=2, schedule=schedule)
        torch.testing.assert_close(fast, naive)
        if BATCH_OPS[op]:
            assert not fallbacks, fallbacks
        else:
            assert len(fallbacks) == (schedule == "fold"), fallbacks  # once per model
            assert all("row by row" in f for f in fallbacks), fallbacks


# --- module state: buffers are read live, assignments in forward are not traced away ----------


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, D), nn.Linear(D, 3)
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("ema", torch.zeros(D))
        self.track = False

    def forward(self, x):
        h = self.a(x) / self.temperature.clamp(min=1e-3)  # an op on a buffer alone
        if self.track:  # state kept between calls, as users write it
            self.ema = 0.9 * self.ema + 0.1 * h.mean(0).detach()
            self.last_features = h
        return self.head(h)


@pytest.mark.parametrize("kind", list(KINDS))
def test_buffers_are_read_live_by_the_split(kind):
    """torch.fx folds an op on a buffer alone into a constant unless buffers are graph inputs:
    the cached split would keep the value the buffer had when it was traced."""
    torch.manual_seed(0)
    net = bayesify(Stateful(), {"head": kind}, **KINDS[kind])
    x = torch.randn(5, 4)
    _both(net, x)  # traced with temperature 1
    net.body.temperature.fill_(3.0)  # same tensor object: the split is not rebuilt
    fast, naive, fallbacks = _both(net, x)
    torch.testing.assert_close(fast, naive)
    assert not fallbacks


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_forward_that_assigns_state_is_not_broken_by_tracing(kind):
    """Tracing runs the forward on proxies: ``self.ema = ...`` would leave a proxy in the
    user's model (and the graph would not assign at all). The model stays intact, the naive path
    runs with a warning naming the attribute, and its state is what naive inference leaves."""
    nets, x = [], torch.randn(5, 4)
    for prefix_once in (True, False):
        torch.manual_seed(0)
        body = Stateful()
        body.track = True
        net = bayesify(body, {"head": kind}, **KINDS[kind]).eval()
        net.prefix_once = prefix_once
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(1)
            out = [net(x, 2) for _ in range(2)]
        nets.append((net, out, [str(w.message) for w in caught]))
    (fast, fast_out, fallbacks), (naive, naive_out, _) = nets
    assert type(fast.body.ema) is torch.Tensor and "ema" in dict(fast.body.named_buffers())
    torch.testing.assert_close(fast.body.ema, naive.body.ema)
    torch.testing.assert_close(fast.body.last_features, naive.body.last_features)
    torch.testing.assert_close(fast_out, naive_out)
    assert len(fallbacks) == 1 and "assigns 'ema'" in fallbacks[0], fallbacks


class ViewWrite(InplaceResidual):
    """The in-place residual written through a view whose shape comes from the input."""

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        v = h.view(x.size(0), -1)
        v.add_(self.block(h))
        return self.out(h)


class SizeAfterSplit(nn.Module):
    """``h.view(x.size(0), -1)`` after the stochastic layer, an in-place ReLU before it."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.c1(x), inplace=True)
        h = F.relu(self.c2(h), inplace=True)
        return self.fc(h.view(x.size(0), -1))


@pytest.mark.parametrize("kind", ["batch_ensemble", "mc_dropout"])
def test_a_views_shape_arguments_are_not_its_memory(kind):
    """A view aliases its tensor, not its size arguments: a write through a view of a prefix
    value is still caught, and a fallback caused by ``x.size(0)`` names that, not the in-place
    ReLU next to it."""
    torch.manual_seed(0)
    net = bayesify(ViewWrite(), {"block.0": kind}, **KINDS[kind])
    x = torch.randn(5, 4)
    fast, naive, caught = _both(net, x, samples=2, schedule="fold")
    torch.testing.assert_close(fast, naive)
    assert len(caught) == 1 and "in place" in caught[0], caught
    net = bayesify(SizeAfterSplit(), {"c2": kind}, **KINDS[kind])
    x = torch.randn(4, 1, 8, 8)
    fast, naive, caught = _both(net, x, samples=2, schedule="fold")
    torch.testing.assert_close(fast, naive)
    assert len(caught) == 1 and "'size'" in caught[0] and "x.size(0)" in caught[0], caught
