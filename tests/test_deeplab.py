"""DeepLabV3+ on a ResNet-18-style backbone: output shapes, weight count against a closed
form, output stride read off the feature maps, every layer kind on a decoder-only plan (dense
outputs ``[M, B, C, H, W]``, the plain model at the deterministic point), and placement-aware
inference that runs the backbone once and equals the naive path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from bnnkit import bayesify
from bnnkit.errors import ConfigError
from bnnkit.models import DeepLabV3Plus, PlacementFallback, build_model


def _model(width=4, os=8, classes=5, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    m = DeepLabV3Plus((3, 32, 48), classes, width=width, output_stride=os, dropout=dropout)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.mark.parametrize("os", [8, 16])
@pytest.mark.parametrize("hw", [(32, 48), (33, 47), (17, 9), (180, 240)])
def test_logits_have_the_input_size(hw, os):
    m = _model(os=os)
    with torch.no_grad():
        out = m(torch.rand(2, 3, *hw))
    assert out.shape == (2, 5, *hw) and torch.isfinite(out).all()


def _closed_form_weights(w: int, classes: int) -> int:
    """Weights of the architecture as documented, counted by hand."""
    bn = lambda c: 2 * c  # noqa: E731

    def block(cin, cout):
        n = 9 * cin * cout + bn(cout) + 9 * cout * cout + bn(cout)
        return n + (cin * cout + bn(cout) if cin != cout else 0)

    ws = [w, 2 * w, 4 * w, 8 * w]
    n = 3 * w * 49 + bn(w)  # 7x7 stem
    n += 2 * block(w, w)
    for a, b in zip(ws[:-1], ws[1:]):  # layers 2..4 (a strided or widening first block)
        n += block(a, b) + block(b, b)
    hc, a = 8 * w, 4 * w
    n += hc * a + bn(a) + 3 * (9 * hc * a + bn(a)) + (hc * a + a) + 5 * a * a + bn(a)  # ASPP
    r = 3 * w
    n += w * r + bn(r) + 9 * (r + a) * a + bn(a) + 9 * a * a + bn(a)  # decoder
    return n + a * classes + classes


@pytest.mark.parametrize("width", [4, 16])
def test_weight_count_is_the_closed_form(width):
    m = DeepLabV3Plus((3, 32, 32), 11, width=width)
    n = sum(p.numel() for p in m.parameters())
    assert n == _closed_form_weights(width, 11)
    if width == 16:
        assert 0.9e6 < n < 1.2e6  # "about 1M weights"


def _conv_out(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@pytest.mark.parametrize("os", [8, 16])
@pytest.mark.parametrize("hw", [(32, 48), (45, 61)])
def test_output_stride_is_respected(hw, os):
    m = _model(os=os)
    sizes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(m.backbone, name).register_forward_hook(
            lambda mod, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[-2:]))
        )
    m.aspp.register_forward_hook(lambda mod, i, o: sizes.__setitem__("aspp", tuple(o.shape)))
    with torch.no_grad():
        m(torch.rand(1, 3, *hw))
    want = {}
    for ax in (0, 1):
        n = _conv_out(_conv_out(hw[ax], 7, 2, 3), 3, 2, 1)  # stem conv, max-pool: stride 4
        want.setdefault("layer1", []).append(n)
        strides = {8: (2, 1, 1), 16: (2, 2, 1)}[os]
        for name, s in zip(("layer2", "layer3", "layer4"), strides):
            n = _conv_out(n, 3, s, 1)
            want.setdefault(name, []).append(n)
    assert {k: sizes[k] for k in want} == {k: tuple(v) for k, v in want.items()}
    assert sizes["aspp"] == (1, 16, *sizes["layer4"])
    if hw == (32, 48):  # divisible sizes: exactly input / stride
        assert sizes["layer1"] == (8, 12) and sizes["layer4"] == (32 // os, 48 // os)


PLAN = {"decoder.*": None, "classifier": None}
SETUPS = {  # members, options at the deterministic point
    "batch_ensemble": (3, {"factor_init": "ones"}),
    "rank1": (3, {"init": "ones", "init_scale": 0.0}),
    "lpbnn": (3, {"factor_init": "ones"}),
    "mc_dropout": (1, {"p": 0.0}),
    "variational": (1, {}),
}


def _decoder_net(kind, model=None, deterministic_point=False):
    model = model or _model()
    members, opts = SETUPS[kind]
    net = bayesify(
        model,
        {k: kind for k in PLAN},
        members=members,
        options={kind: opts} if deterministic_point else None,
    )
    if deterministic_point:
        for mod in net.modules():
            if isinstance(getattr(mod, "sample", None), bool):
                mod.sample = False
            if hasattr(mod, "vae"):  # LP-BNN: decode every embedding to ones
                with torch.no_grad():
                    mod.vae.decoder.weight.zero_()
                    mod.vae.decoder.bias.fill_(1.0)
    return net.eval()


@pytest.mark.parametrize("kind", list(SETUPS))
def test_decoder_plans_give_dense_member_outputs_and_the_plain_model_at_the_identity(kind):
    model = _model()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        ref = model(x)
        net = _decoder_net(kind, model, deterministic_point=True)
        out = net(x, samples=2)
        members = SETUPS[kind][0]
        assert out.shape == (2 * members, 2, 5, 32, 48)
        for o in out:
            torch.testing.assert_close(o, ref, rtol=0, atol=1e-5)
        noisy = _decoder_net(kind, model)(x, samples=2)  # away from it: members differ
    assert noisy.shape == out.shape
    assert not torch.allclose(noisy[0], noisy[-1])


def _stem_rows(net, x, samples):
    rows = []
    stem = net.body.backbone.stem[0]
    handle = stem.register_forward_hook(lambda mod, i, o: rows.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            out = net(x, samples=samples)
    finally:
        handle.remove()
    return out, rows


@pytest.mark.parametrize("kind", ["batch_ensemble", "rank1", "lpbnn", "mc_dropout"])
@pytest.mark.parametrize("schedule", ["fold", "members"])
def test_placement_runs_the_backbone_once_and_equals_the_naive_path(kind, schedule):
    torch.manual_seed(3)
    net = _decoder_net(kind)
    net.schedule = schedule
    x = torch.rand(2, 3, 33, 47)
    samples = 2 if SETUPS[kind][0] == 1 else 1
    R = net.members * samples
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlacementFallback)  # the split must not be refused
        _stem_rows(net, x, samples)  # the first call also checks the split
        torch.manual_seed(11)
        fast, rows = _stem_rows(net, x, samples)
    assert rows == [2]  # the backbone ran once, on the B input rows
    net.prefix_once = False
    torch.manual_seed(11)
    naive, naive_rows = _stem_rows(net, x, samples)
    assert sum(naive_rows) == R * 2
    assert fast.shape == naive.shape == (R, 2, 5, 33, 47)
    # the same random draws: the prefix draws none, so even MC dropout masks coincide
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    if kind == "mc_dropout":
        assert not torch.allclose(fast[0], fast[1])  # two different dropout samples


def test_registry_builds_it_and_refuses_bad_options():
    m = build_model("deeplabv3plus", (3, 32, 48), 4, width=4, output_stride=16, dropout=0.0)
    assert isinstance(m, DeepLabV3Plus) and m.output_stride == 16
    assert isinstance(m.dropout, nn.Identity)
    d = build_model("deeplabv3plus", (3, 180, 240), 11)
    assert d.output_stride == 8 and math.isclose(d.dropout.p, 0.1)
    assert d.classifier.in_channels == 64  # width 16 by default
    with pytest.raises(ConfigError, match="output_stride"):
        build_model("deeplabv3plus", (3, 32, 48), 4, output_stride=12)
    with pytest.raises(ConfigError, match="output_stride"):
        DeepLabV3Plus((3, 32, 48), 4, output_stride=4)
