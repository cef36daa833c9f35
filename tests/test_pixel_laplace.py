"""PixelLastLayerLaplace: the last-layer Laplace of segmentation networks, checked against
brute-force GGNs from autograd Jacobians, the closed-form evidence, the covariance of the
sampled logits, and through the method path (train_run, save / load)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian
from torch.func import functional_call

from bnnkit.data.bundle import segmentation_bundle
from bnnkit.data.segmentation import IGNORE_INDEX, SegSplit
from bnnkit.errors import ConfigError, InputError
from bnnkit.laplace import PixelLastLayerLaplace, laplace_from_state
from bnnkit.methods.base import ModelSpec, UQModel, build_method
from bnnkit.models import MODELS, Normalize, register_model
from bnnkit.train import train_run
from bnnkit.train.config import run_config

C, H, W = 3, 8, 10


class TinySeg(nn.Module):
    """Two-conv backbone at stride 2, 1x1 head, then ``post`` (default: bilinear upsampling)."""

    def __init__(self, classes=C, width=4, bias=True, post="bilinear", channels=3):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(channels, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, width, 3, stride=2, padding=1),
            nn.Tanh(),
        )
        self.head = nn.Conv2d(width, classes, 1, bias=bias)
        self.post = post
        self.extra = nn.Conv2d(classes, classes, 3, padding=1) if post == "extra_conv" else None

    def forward(self, x):
        f = self.head(self.backbone(x))
        if self.post == "nearest":
            return F.interpolate(f, size=x.shape[-2:], mode="nearest")
        f = F.interpolate(f, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.post == "softmax":
            return torch.softmax(f, 1)
        if self.post == "extra_conv":
            return self.extra(f)
        return f


def _data(n=3, seed=0, void=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, H, W, generator=g)
    y = torch.randint(0, C, (n, H, W), generator=g)
    if void:
        y[0, :3, :4] = IGNORE_INDEX
        y[-1, 5:, 2:] = IGNORE_INDEX
    return x, y


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinySeg(**kw).eval()


def _brute_ggn(model, x, y):
    """sum over non-void pixels of J_p^T (diag(pi) - pi pi^T) J_p, J_p from autograd of the
    full-resolution logits w.r.t. (W, b) of the whole network; layout theta.view(C, d+1)."""
    head = model.head
    Wt = head.weight.detach().clone()
    has_bias = head.bias is not None

    def logits(*params):
        p = {"head.weight": params[0]}
        if has_bias:
            p["head.bias"] = params[1]
        return functional_call(model, p, (x,))

    args = (Wt,) + ((head.bias.detach().clone(),) if has_bias else ())
    jac = jacobian(logits, args)  # ([B, C, H, W, C, d, 1, 1], [B, C, H, W, C])
    JW = jac[0].flatten(-3)  # [B, C, H, W, C, d]
    J = torch.cat([JW, jac[1][..., None]], -1) if has_bias else JW  # [.., C, D]
    J = J.permute(0, 2, 3, 1, 4, 5).flatten(-2)  # [B, H, W, C, C*D]
    with torch.no_grad():
        pi = torch.softmax(model(x).double(), 1).permute(0, 2, 3, 1)  # [B, H, W, C]
    valid = y != IGNORE_INDEX
    J, pi = J[valid].double(), pi[valid]
    Lam = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
    return torch.einsum("pci,pcd,pdj->ij", J, Lam, J)


def _pixel_nll(model, x, y) -> float:
    with torch.no_grad():
        return float(
            F.cross_entropy(model(x).double(), y, ignore_index=IGNORE_INDEX, reduction="sum")
        )


def _psi(model, x):
    """[B, H, W, D]: the head's input upsampled to full size, with a column of ones."""
    feats = {}
    h = model.head.register_forward_hook(lambda m, i, o: feats.setdefault("phi", i[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    up = F.interpolate(feats["phi"], size=x.shape[-2:], mode="bilinear", align_corners=False)
    up = up.permute(0, 2, 3, 1).double()
    return torch.cat([up, torch.ones(*up.shape[:-1], 1, dtype=up.dtype)], -1)


# ---------------------------------------------------------------------------- curvature


@pytest.mark.parametrize("bias", [True, False])
def test_ggn_equals_brute_force(bias):
    model = _model(bias=bias).double()
    x, y = _data()
    x = x.double()
    la = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, y), batch_size=2)
    G = _brute_ggn(model, x, y)
    assert la.ggn.shape == G.shape == (C * (4 + bias),) * 2
    torch.testing.assert_close(la.ggn, G, rtol=1e-9, atol=1e-10)
    assert la.loss == pytest.approx(_pixel_nll(model, x, y), rel=1e-10)
    assert la.pixels_seen == la.pixels_used == int((y != IGNORE_INDEX).sum())
    # n_total rescales curvature and loss by n_total / len(data)
    la2 = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, y), n_total=12)
    torch.testing.assert_close(la2.ggn, 4 * G, rtol=1e-9, atol=1e-10)
    assert la2.loss == pytest.approx(4 * la.loss) and la2.n_data == 12


def test_void_pixels_contribute_nothing():
    model = _model().double()
    x, y = _data(2)
    x = x.double()
    y_void = y.clone()
    y_void[1] = IGNORE_INDEX  # the second image entirely void
    both = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, y_void))
    first = PixelLastLayerLaplace(model, pixel_stride=1).fit((x[:1], y[:1]))
    torch.testing.assert_close(both.ggn, first.ggn, rtol=1e-10, atol=1e-12)
    assert both.loss == pytest.approx(first.loss, rel=1e-10)
    # the labels of non-void pixels do not enter the GGN, only which pixels are void
    other = (y + 1) % C
    other[y == IGNORE_INDEX] = IGNORE_INDEX
    a = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, y))
    b = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, other))
    torch.testing.assert_close(a.ggn, b.ggn)
    with pytest.raises(InputError, match="void"):
        PixelLastLayerLaplace(model).fit((x, torch.full_like(y, IGNORE_INDEX)))


def test_pixel_stride_rescaling_on_constant_features():
    """Constant images make every pixel's features (hence its GGN term) equal within an image
    (the backbone's zero padding is made irrelevant by a 1x1 backbone): the rescaled
    subsampled GGN is then the full one."""
    torch.manual_seed(0)
    model = TinySeg().eval()
    model.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh())  # no padding effects
    model.head = nn.Conv2d(4, C, 1)
    x = torch.rand(2, 3, 1, 1).expand(2, 3, H, W).contiguous()  # two constant images
    y = torch.randint(0, C, (2, H, W))
    full = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, y))
    sub = PixelLastLayerLaplace(model, pixel_stride=3).fit((x, y))
    assert sub.pixels_used == 2 * 3 * 4 < full.pixels_used == 2 * H * W
    torch.testing.assert_close(sub.ggn, full.ggn, rtol=1e-9, atol=1e-9)
    # void pixels: the ratio counts non-void pixels seen and used
    yv = y[:1].clone()
    yv[0, :, :5] = IGNORE_INDEX
    full = PixelLastLayerLaplace(model, pixel_stride=1).fit((x[:1], yv))
    sub = PixelLastLayerLaplace(model, pixel_stride=2).fit((x[:1], yv))
    assert (sub.pixels_seen, sub.pixels_used) == (40, 4 * 2)
    torch.testing.assert_close(sub.ggn, full.ggn, rtol=1e-9, atol=1e-9)
    # features that vary over the image: subsampling is then an estimate, not the same
    xr, _ = _data(1)
    a = PixelLastLayerLaplace(model, pixel_stride=1).fit((xr, y[:1]))
    b = PixelLastLayerLaplace(model, pixel_stride=3).fit((xr, y[:1]))
    assert not torch.allclose(a.ggn, b.ggn, rtol=1e-3)


# ---------------------------------------------------------------------------- prior


def test_marglik_matches_closed_form_grid():
    model = _model().double()
    x, y = _data()
    x = x.double()
    la = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, y))
    G = _brute_ggn(model, x, y)
    theta = torch.cat([model.head.weight.detach().flatten(1), model.head.bias.detach()[:, None]], 1)
    theta_sq = float((theta.double() ** 2).sum())
    loss, P = _pixel_nll(model, x, y), G.shape[0]

    def evidence(d):
        logdet = torch.linalg.slogdet(G + d * torch.eye(P, dtype=G.dtype))[1]
        return -loss - 0.5 * d * theta_sq + 0.5 * P * math.log(d) - 0.5 * float(logdet)

    grid = torch.logspace(-4, 4, 4001, dtype=torch.float64).tolist()
    values = [evidence(d) for d in grid]
    best = grid[max(range(len(grid)), key=values.__getitem__)]
    delta = float(la.optimize_prior_precision("marglik"))
    assert 1e-3 < best < 1e3  # an interior optimum
    assert delta == pytest.approx(best, rel=0.01)
    assert evidence(delta) >= max(values) - 1e-9
    for d in (0.1, 3.0, 50.0):
        assert float(la.log_marginal_likelihood(d)) == pytest.approx(evidence(d), rel=1e-9)


def test_gridsearch_nll_and_choice():
    model = _model()
    x, y = _data()
    la = PixelLastLayerLaplace(model, pixel_stride=2).fit((x, y))
    # a huge prior precision leaves the MAP: the grid NLL is the MAP's mean pixel NLL
    la.optimize_prior_precision("gridsearch", val=(x, y), grid=[1e14], n_samples=4)
    n_valid = int((y != IGNORE_INDEX).sum())
    assert float(la.grid_nll[0]) == pytest.approx(_pixel_nll(model, x, y) / n_valid, rel=1e-5)
    grid = [1e-3, 1.0, 1e3]
    chosen = float(la.optimize_prior_precision("gridsearch", val=(x, y), grid=grid, n_samples=8))
    assert chosen == grid[int(torch.argmin(la.grid_nll))]
    assert la.prior_precision.item() == chosen
    with pytest.raises(InputError, match="validation"):
        la.optimize_prior_precision("gridsearch")


# ---------------------------------------------------------------------------- predictive


def test_sampled_logits_mean_and_covariance():
    model = _model()
    x, y = _data(2)
    la = PixelLastLayerLaplace(model, pixel_stride=2).fit((x[:1], y[:1]))
    la.prior_precision = 5.0
    K = 20000
    f = la.sample_logits(x[1:], n_samples=K, seed=3).double()  # [K, 1, C, H, W]
    assert f.shape == (K, 1, C, H, W)
    Sigma = torch.linalg.inv(la.ggn + 5.0 * torch.eye(la.n_params, dtype=torch.float64))
    psi = _psi(model, x[1:])[0]  # [H, W, D]
    with torch.no_grad():
        f_map = model(x[1:])[0].double()
    assert psi.shape[-1] == 5  # d + 1
    for i, j in [(0, 0), (3, 7), (7, 9)]:
        Jp = torch.kron(torch.eye(C, dtype=torch.float64), psi[i, j][None])  # [C, C*D]
        cov = Jp @ Sigma @ Jp.T
        s = f[:, 0, :, i, j]
        emp = torch.cov(s.T)
        torch.testing.assert_close(
            s.mean(0),
            f_map[:, i, j],
            rtol=0,
            atol=4 * cov.diag().max().sqrt() / math.sqrt(K) + 1e-6,
        )
        assert (emp - cov).abs().max() <= 0.05 * cov.diag().max()
        assert cov.diag().min() > 0.01  # a posterior spread worth testing
    # a sample is the network itself with that head: run it through functional_call
    theta = la._draw(3, torch.Generator().manual_seed(3))
    for k in range(3):
        params = {
            "head.weight": theta[k, :, :4].float()[..., None, None],
            "head.bias": theta[k, :, 4].float(),
        }
        with torch.no_grad():
            ref = functional_call(model, params, (x[1:],))
        torch.testing.assert_close(f[k].float(), ref, rtol=1e-5, atol=1e-5)
    # the predictive is the softmax of these logits; sample_weights is the same predictive
    p = la.predictive(x[1:], link="mc", n_samples=5, seed=3)
    torch.testing.assert_close(p.probs, torch.softmax(f[:5].float(), 2))
    q = la.predictive(x[1:], link="sample_weights", n_samples=5, seed=3)
    torch.testing.assert_close(q.probs, p.probs)
    torch.testing.assert_close(la.predict(x[1:], n_samples=5, seed=3), p.probs.mean(0))


def test_probit_uses_per_pixel_logit_variances():
    model = _model()
    x, y = _data(2)
    la = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, y))
    la.prior_precision = 2.0
    p = la.predictive(x, link="probit")
    assert p.probs.shape == (1, 2, C, H, W)
    Sigma = torch.linalg.inv(la.ggn + 2.0 * torch.eye(la.n_params, dtype=torch.float64))
    D = la.n_params // C
    blocks = torch.stack([Sigma[c * D : (c + 1) * D, c * D : (c + 1) * D] for c in range(C)])
    psi = _psi(model, x)  # [B, H, W, D]
    var = torch.einsum("bhwi,cij,bhwj->bchw", psi, blocks, psi)
    with torch.no_grad():
        f = model(x).double()
    ref = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), 1).float()
    torch.testing.assert_close(p.probs[0], ref, rtol=1e-4, atol=1e-5)


def test_backbone_runs_once_per_chunk_and_chunking_is_invisible():
    model = _model()
    x, y = _data(3)
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    la = PixelLastLayerLaplace(model, pixel_stride=1).fit((x, y))
    calls.clear()
    big = la.predictive(x, n_samples=64, seed=1)
    assert len(calls) == 1  # one chunk: one backbone pass for all 64 samples
    small = PixelLastLayerLaplace(model, pixel_stride=1, memory_budget=96 * 12 * C * H * W)
    small.load_state(la.state())
    calls.clear()
    out = small.predictive(x, n_samples=64, seed=1)
    assert len(calls) == 3  # one image per chunk
    torch.testing.assert_close(out.probs, big.probs)
    tiny = PixelLastLayerLaplace(model, pixel_stride=1, memory_budget=1000)
    tiny.load_state(la.state())
    calls.clear()
    torch.testing.assert_close(tiny.predictive(x, n_samples=64, seed=1).probs, big.probs)
    assert len(calls) == 3  # samples chunked, backbone still once per image chunk
    assert la.predictive(x, n_samples=64, seed=2).probs.ne(big.probs).any()


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "post, head",
    [("softmax", None), ("extra_conv", None), ("extra_conv", "head"), ("nearest", None)],
)
def test_precondition_refuses_other_outputs(post, head):
    model = _model(post=post)
    x, y = _data(2)
    la = PixelLastLayerLaplace(model, head=head)
    assert la.head is model.head
    with pytest.raises(ConfigError, match="bilinear"):
        la.fit((x, y))


def test_refusals():
    x, y = _data(2)
    model = _model()
    la = PixelLastLayerLaplace(model)
    model.train()
    with pytest.raises(ConfigError, match="training mode"):
        la.fit((x, y))
    model.eval()

    class Pooled(nn.Module):  # a classifier ending in a 1x1 conv and global pooling
        def __init__(self):
            super().__init__()
            self.body = TinySeg()

        def forward(self, x):
            return self.body(x).mean((2, 3))

    with pytest.raises(ConfigError, match="dense"):
        PixelLastLayerLaplace(Pooled().eval()).fit((x, y))
    with pytest.raises(ConfigError, match="no 1x1"):
        PixelLastLayerLaplace(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)))
    with pytest.raises(ConfigError, match="no module named"):
        PixelLastLayerLaplace(model, head="classifier")
    with pytest.raises(InputError, match="pixel_stride"):
        PixelLastLayerLaplace(model, pixel_stride=0)
    la = PixelLastLayerLaplace(model)
    with pytest.raises(ConfigError, match="not fitted"):
        la.predictive(x)
    with pytest.raises(InputError, match="label value"):
        la.fit((x, torch.full_like(y, 7)))
    with pytest.raises(InputError, match="do not match"):
        la.fit((x, y[:, :4]))
    la.fit((x, y))
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(ConfigError, match="changed"):
        la.predictive(x)


# ---------------------------------------------------------------------------- bnnkit models

ARCH = "pixel_laplace_tiny"


class _Registered(nn.Module):
    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, width=4):
        super().__init__()
        self.norm = Normalize(mean, std)
        self.net = TinySeg(num_classes, width)

    def forward(self, x):
        return self.net(self.norm(x))


if ARCH not in MODELS:
    register_model(ARCH, _Registered, task="segmentation")


def test_uqmodel_save_load_round_trip(tmp_path):
    spec = ModelSpec(ARCH, (3, H, W), C, task="segmentation")
    model = build_method("laplace_last_layer", spec, {"link": "mc", "samples": 6})
    model.eval()
    x, y = _data(3)
    la = PixelLastLayerLaplace(model, head="head", pixel_stride=2)
    la.fit((x, y), n_total=30)
    la.optimize_prior_precision("marglik")
    model.posterior, model.eval_samples = la, 6
    before = model.predict(x)
    assert before.probs.shape == (6, 3, C, H, W)
    model.save(tmp_path / "m.safetensors")
    loaded = UQModel.load(tmp_path / "m.safetensors")
    assert isinstance(loaded.posterior, PixelLastLayerLaplace)
    assert loaded.posterior.prior_precision.item() == la.prior_precision.item()
    assert loaded.posterior.pixel_stride == 2 and loaded.posterior.n_data == 30
    torch.testing.assert_close(loaded.predict(x).probs, before.probs, rtol=0, atol=0)
    # a state of another model's weights is refused
    other = build_method("laplace_last_layer", spec, {"link": "mc"})
    with pytest.raises(ConfigError, match="other weights"):
        laplace_from_state(other, la.state(), {})


def _split(n, name, g):
    x = torch.randint(0, 256, (n, 12, 16, 3), dtype=torch.uint8, generator=g)
    y = (x[..., 0] // 64).long().clamp(max=3)  # class from the red channel; label 3 held out
    y[:, :2, :3] = 4  # void (source label len(class_names))
    return SegSplit.from_arrays(x, y, ["A", "B", "C", "D"], anomaly_classes=("D",), split=name)


def test_method_path(tmp_path):
    g = torch.Generator().manual_seed(0)
    bundle = segmentation_bundle(
        "toy_pixel_laplace", _split(16, "train", g), _split(6, "val", g), _split(4, "test", g)
    )
    assert bundle.dense and bundle.num_classes == 3

    def cfg(method, **options):
        return run_config(
            method=method, model=ARCH, seed=0, data={"dataset": "toy_pixel_laplace"},
            train={"epochs": 1, "batch_size": 8, "progress": False}, method_options=options,
        )  # fmt: skip

    base = train_run(cfg("deterministic"), tmp_path / "det", bundle=bundle)
    model = train_run(
        cfg("laplace_last_layer", link="mc", samples=5, pixel_stride=2, n_fit=8),
        tmp_path / "llla",
        bundle=bundle,
        base_model=base,
    )
    la = model.posterior
    assert isinstance(la, PixelLastLayerLaplace) and la.n_data == 16
    assert la.pixel_stride == 2 and model.eval_samples == 5
    x = bundle.test.float()
    p = model.predict(x)
    assert p.probs.shape == (5, 4, 3, 12, 16)
    assert torch.isfinite(p.probs).all()
    torch.testing.assert_close(p.probs.sum(2), torch.ones(5, 4, 12, 16))
    assert p.mutual_information().max() > 0
    # probit: one per-pixel distribution; gridsearch tunes on the validation pixels
    probit = train_run(
        cfg("laplace_last_layer", prior="gridsearch", samples=4), tmp_path / "probit",
        bundle=bundle, base_model=base,
    )  # fmt: skip
    assert probit.predict(x).probs.shape == (1, 4, 3, 12, 16)
    assert len(probit.posterior.grid_nll) == 33
    for method in ("laplace_diag", "laplace_subnetwork"):
        with pytest.raises(ConfigError, match="no segmentation form.*laplace_last_layer"):
            train_run(cfg(method), tmp_path / method, bundle=bundle, base_model=base)
        assert not (tmp_path / method).exists()  # refused before any write
