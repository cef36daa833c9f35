"""Segmentation across the library on a user's own network (a small U-Net written here, of a
shape bnnkit's models do not have): every method trains on label maps and predicts per-pixel
per-member probabilities; the loss ignores void pixels; the dense Predictive is the per-pixel
classification Predictive; evaluation is the same whatever the memory budget; temperature
scaling finds the pixel-NLL optimum; decoder-only placement runs the encoder once and gives
the naive answer; bad inputs are refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import ConfigError, InputError, Predictive, metrics
from bnnkit.data.bundle import segmentation_bundle
from bnnkit.data.segmentation import IGNORE_INDEX, SegSplit
from bnnkit.evaluate import EvalConfig, evaluate, evaluate_segmentation
from bnnkit.methods import UQModel, build_method
from bnnkit.methods.base import ModelSpec
from bnnkit.methods.temperature import pixel_logits
from bnnkit.models import MODELS, Normalize, register_model
from bnnkit.train import train_run
from bnnkit.train.config import run_config
from bnnkit.train.lit import cross_entropy

CLASSES = ["sky", "road", "car", "rider"]  # "rider" is held out: the anomaly


class UNet(nn.Module):
    """Two-level U-Net: a strided encoder, a decoder on the skip connection and the upsampled
    bottleneck, a 1x1 classifier; any input size."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, width=6):
        super().__init__()
        c = input_shape[0]
        self.norm = Normalize(mean, std)
        self.enc1 = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))  # fmt: skip
        self.enc2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())  # fmt: skip
        self.dec = nn.Sequential(nn.Conv2d(3 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        a = self.enc1(self.norm(x))
        b = self.enc2(a)
        b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.dec(torch.cat([a, b], 1)))


class HalfRes(UNet):
    """Forgets to upsample: logits at half the input size."""

    def forward(self, x):
        return self.head(F.avg_pool2d(self.enc1(self.norm(x)), 2))


if "test_unet" not in MODELS:
    register_model("test_unet", UNet, task="segmentation")
    register_model("test_halfres", HalfRes, task="segmentation")


def _split(n: int, split: str, seed: int, h: int = 12, w: int = 14) -> SegSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    y = (x[..., 0].long() * 4) // 256  # the class is readable from the red channel
    y[:, :2, :3] = 4  # a void corner (label len(CLASSES) = void)
    return SegSplit.from_arrays(x, y, CLASSES, anomaly_classes=("rider",), split=split)


@pytest.fixture(scope="module")
def bundle():
    return segmentation_bundle("toy", _split(16, "train", 0), _split(6, "val", 1),
                               _split(6, "test", 2))  # fmt: skip


def _cfg(method, crop=(8, 10), **opts):
    return run_config(method=method, model="test_unet", seed=0, data={"dataset": "toy"},
                      train={"epochs": 1, "batch_size": 8, "progress": False, "crop": list(crop)},
                      method_options=opts)  # fmt: skip


DECODER_PLAN = {"layers": {"dec.*": "batch_ensemble", "head": "batch_ensemble"}, "members": 3}
METHODS = [
    ("deterministic", {}, 1),
    ("mc_dropout", {"samples": 3}, 3),
    ("deep_ensemble", {"members": 2}, 2),
    ("batch_ensemble", {"members": 2}, 2),
    ("rank1", {"members": 2, "samples": 2}, 4),
    ("lpbnn", {"members": 2, "samples": 2}, 4),
    ("mfvi", {"samples": 2}, 2),
    ("placement", {"plan": DECODER_PLAN}, 3),
]


@pytest.mark.parametrize("method,opts,S", METHODS, ids=[m[0] for m in METHODS])
def test_every_method_trains_and_predicts_per_pixel_members_on_a_users_unet(
    bundle, tmp_path, method, opts, S
):
    model = train_run(_cfg(method, **opts), tmp_path / method, bundle=bundle)
    x = bundle.test.float()
    pred = model.predict(x)
    assert pred.probs.shape == (S, len(x), 3, 12, 14)
    assert torch.allclose(pred.probs.sum(2), torch.ones(()), atol=1e-5)
    # a different size than the training crops and the data set: any H, W
    assert model.predict(torch.rand(2, 3, 9, 11)).probs.shape == (S, 2, 3, 9, 11)
    again = UQModel.load(tmp_path / method / "model.safetensors")
    torch.manual_seed(0)
    a = again.predict(x[:2]).probs
    torch.manual_seed(0)
    b = model.predict(x[:2]).probs
    assert torch.allclose(a, b, atol=1e-6)  # the checkpoint holds everything
    rows, art = evaluate(model, bundle, EvalConfig(corruptions=["contrast"], severities=[2],
                                                   progress=False, latency_repeats=1))  # fmt: skip
    got = {(r["split"], r["metric"]) for r in rows}
    assert {("test", "miou"), ("anomaly", "aupr_entropy"), ("corrupt:contrast:2", "miou"),
            ("cost", "latency_ms_per_image")} <= got  # fmt: skip
    assert (("anomaly", "aupr_mutual_info") in got) == (S > 1)
    assert art["maps"] and art["maps"][0]["entropy"].shape == (12, 14)


def test_temperature_scaling_finds_the_pixel_nll_optimum(bundle, tmp_path):
    base = train_run(_cfg("deterministic"), tmp_path / "det", bundle=bundle)
    ts = train_run(_cfg("temperature_scaling"), tmp_path / "ts", bundle=bundle, base_model=base)
    z, y = pixel_logits(base, bundle.val.float(), bundle.val.y)
    assert len(y) == int((bundle.val.y != IGNORE_INDEX).sum())  # every non-void pixel, no other
    grid = torch.linspace(0.2, 5.0, 2000, dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(z.double() / t, y) for t in grid])
    assert float(ts.temperature) == pytest.approx(float(grid[nll.argmin()]), rel=5e-3)


def test_the_loss_is_the_mean_over_non_void_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, 6)
    y = torch.randint(0, 4, (3, 5, 6))
    y[0, :2] = IGNORE_INDEX
    keep = y != IGNORE_INDEX
    brute = -torch.log_softmax(logits, 1).movedim(1, -1)[keep].gather(1, y[keep][:, None]).mean()
    assert cross_entropy(logits, y) == pytest.approx(float(brute), rel=1e-6)
    # all void: zero with a gradient path, not NaN
    z = logits.clone().requires_grad_(True)
    loss = cross_entropy(z, torch.full_like(y, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()
    # one label per image: 255 is a class like any other (1000-class data)
    big = torch.randn(2, 300)
    assert cross_entropy(big, torch.tensor([255, 3])) == pytest.approx(
        float(F.cross_entropy(big, torch.tensor([255, 3]))), rel=1e-6
    )


def test_a_dense_predictive_is_the_per_pixel_classification_predictive():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 2, 4, 5, 6), dim=2)  # [S, B, C, H, W]
    dense = Predictive(p)
    flat = Predictive(p.permute(0, 1, 3, 4, 2).reshape(3, -1, 4))  # pixels as examples
    for name in ("entropy", "expected_entropy", "mutual_information", "confidence",
                 "prediction"):  # fmt: skip
        a, b = getattr(dense, name)(), getattr(flat, name)()
        assert torch.equal(a.reshape(-1), b) or torch.allclose(a.reshape(-1), b, atol=1e-6), name
    assert dense.num_classes == 4 and dense.dense and not flat.dense
    maps = metrics.uncertainty_maps(p)
    assert torch.allclose(maps.mutual_information, dense.mutual_information(), atol=1e-6)
    with pytest.raises(InputError, match=r"unsqueeze\(0\)"):
        Predictive(p[0])  # [B, C, H, W] is ambiguous
    with pytest.raises(InputError, match="differ beyond the batch axis"):
        Predictive.concat([dense, Predictive(p[..., :3])])


def test_evaluation_is_the_same_whatever_the_memory_budget(bundle, tmp_path):
    cfg = dict(corruptions=["contrast"], severities=[3], progress=False, latency_repeats=1)

    def scored(model, budget):
        rows, _ = evaluate_segmentation(model, bundle, EvalConfig(memory_budget=budget, **cfg))
        return {(r["split"], r["metric"]): r["value"] for r in rows if r["split"] != "cost"}

    # deterministic members: the chunked, member-by-member path gives the same numbers
    ens = train_run(_cfg("deep_ensemble", members=3), tmp_path / "de", bundle=bundle)
    big, small = scored(ens, "1GB"), scored(ens, "1KB")
    assert big.keys() == small.keys()
    for k in big:
        assert big[k] == pytest.approx(small[k], rel=1e-5, abs=1e-7), k

    # stochastic passes: below one image's maps, one pass of all members at a time
    mcd = train_run(_cfg("mc_dropout", samples=4), tmp_path / "mcd", bundle=bundle)
    calls = []
    orig = UQModel.logits

    def spy(self, x, batch_size=1024, samples=None):
        calls.append((len(x), samples))
        return orig(self, x, batch_size, samples)

    UQModel.logits = spy
    try:
        scored(mcd, "1KB")
    finally:
        UQModel.logits = orig
    # image by image, 4 passes per image (the test set, the same images clean for the
    # corruption table, then their corrupted copies), beside the timed predict() of the cost rows
    assert calls and all(n == 1 for n, _ in calls)
    assert sum(s == 1 for _, s in calls) == 4 * 3 * len(bundle.test)


def test_decoder_only_plan_runs_the_encoder_once_and_gives_the_naive_answer(bundle):
    spec = ModelSpec("test_unet", (3, 12, 14), 3, task="segmentation")
    model = build_method("placement", spec, {"plan": DECODER_PLAN}).eval()
    counts = {"enc": 0}
    hook = model.net.body.enc2.register_forward_hook
    hook(lambda *a: counts.__setitem__("enc", counts["enc"] + 1))
    x = bundle.test.float()
    fast = model.net(x, 1)
    assert counts["enc"] == 1  # once for all three members
    model.net.prefix_once = False
    slow = model.net(x, 1)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert fast.shape == (3, len(x), 3, 12, 14)


def test_bad_inputs_are_refused_by_name(bundle, tmp_path):
    with pytest.raises(ConfigError, match="expected .*upsample"):
        train_run(run_config(method="deterministic", model="test_halfres", seed=0,
                             data={"dataset": "toy"}, train={"epochs": 1, "progress": False}),
                  tmp_path / "half", bundle=bundle).predict(bundle.test.float())  # fmt: skip
    with pytest.raises(ConfigError, match="classification model .*segmentation data set"):
        train_run(run_config(method="deterministic", model="mlp", seed=0, data={"dataset": "toy"},
                             train={"epochs": 1, "progress": False}), tmp_path / "mlp",
                  bundle=bundle)  # fmt: skip
    assert not (tmp_path / "mlp").exists()  # refused before any write
    with pytest.raises(ConfigError, match="crop .* larger than"):
        train_run(_cfg("deterministic", crop=(40, 10)), tmp_path / "crop", bundle=bundle)
    assert not (tmp_path / "crop").exists()
    model = train_run(_cfg("deterministic"), tmp_path / "det", bundle=bundle)
    with pytest.raises(ConfigError, match="move pixels"):
        evaluate(model, bundle, EvalConfig(corruptions=["elastic"], progress=False))
    other = segmentation_bundle("toy4", *(SegSplit.from_arrays(
        s.x, np.where(s.y.numpy() == 255, 5, s.y.numpy() % 5), CLASSES + ["bus"],
        anomaly_classes=(), split=name) for s, name in
        ((bundle.train, "train"), (bundle.val, "val"), (bundle.test, "test"))))  # fmt: skip
    with pytest.raises(ConfigError, match="3 classes but toy4 has 5"):
        evaluate(model, other, EvalConfig(corruptions=[], progress=False))
    with pytest.raises(InputError, match="channel"):
        model.predict(torch.rand(2, 1, 12, 14))
    with pytest.raises(InputError, match="do not match"):
        SegSplit.from_arrays(torch.zeros(2, 8, 8, 3, dtype=torch.uint8),
                             torch.zeros(2, 8, 9, dtype=torch.long), CLASSES)  # fmt: skip
    with pytest.raises(InputError, match="must lie in 0..3"):
        SegSplit.from_arrays(torch.zeros(2, 8, 8, 3, dtype=torch.uint8),
                             torch.full((2, 8, 8), 9, dtype=torch.long), CLASSES)  # fmt: skip


def test_posterior_exploration_refuses_segmentation_by_name(bundle, tmp_path):
    from bnnkit.posterior.collect import collect_reference, collect_samples, collect_swag

    train_run(_cfg("deterministic"), tmp_path / "det", bundle=bundle)
    for call in (lambda: collect_samples(tmp_path / "col", tmp_path / "det"),
                 lambda: collect_swag(tmp_path / "col2", tmp_path / "det")):  # fmt: skip
        with pytest.raises(ConfigError, match="classification models and data sets"):
            call()
    with pytest.raises(ConfigError, match="'camvid' is a segmentation one"):
        collect_reference(tmp_path / "col3", model="deeplabv3plus", dataset="camvid")
    assert not any((tmp_path / c).exists() for c in ("col", "col2", "col3"))


@pytest.mark.parametrize("kind", ["batch_ensemble", "rank1", "lpbnn"])
@pytest.mark.parametrize("member_mode", [False, True])
def test_a_linear_on_channels_last_pixels_shares_each_examples_factors(kind, member_mode):
    """A Linear applied per pixel ([B, H, W, C], a classifier written with permute): every
    position of an example uses that example's member (and sample) factors."""
    from bnnkit import bayesify
    from bnnkit.models import Folded
    from bnnkit.nn.ensemble import member_pass

    torch.manual_seed(0)
    net = bayesify(nn.Sequential(nn.Linear(5, 3)), {"*": kind}, members=2)
    body = net.body if isinstance(net, Folded) else net
    x = torch.randn(2 * 3, 1, 1, 5).expand(6, 4, 7, 5).contiguous()  # identical positions
    if member_mode:
        with member_pass(body) as select:
            select(1)
            y = body(x[3:])
    else:
        y = body(x)
    assert y.shape == (3 if member_mode else 6, 4, 7, 3)
    assert torch.allclose(y, y[:, :1, :1].expand_as(y), atol=1e-6)  # one draw per example
    # and the same as the example alone, [B, C]
    torch.manual_seed(0)
    flat = body(x[:, 0, 0]) if not member_mode else None
    if flat is not None and kind == "batch_ensemble":
        assert torch.allclose(y[:, 0, 0], flat, atol=1e-6)


class TwoHeads(UNet):
    """A 1x1 projection used before the decoder, defined after the real classifier."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, width=6):
        super().__init__(input_shape, num_classes, mean, std, width)
        self.proj = nn.Conv2d(width, width, 1)

    def forward(self, x):
        a = self.proj(self.enc1(self.norm(x)))
        b = F.interpolate(self.enc2(a), size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.dec(torch.cat([a, b], 1)))


class SoftmaxOut(UNet):
    def forward(self, x):
        return super().forward(x).log_softmax(1)


if "test_twoheads" not in MODELS:
    register_model("test_twoheads", TwoHeads, task="segmentation")
    register_model("test_softmax", SoftmaxOut, task="segmentation")


def test_laplace_head_is_named_or_refused_before_anything_is_trained(bundle, tmp_path):
    def cfg(model, **opts):
        return run_config(method="laplace_last_layer", model=model, seed=0,
                          data={"dataset": "toy"}, method_options={"n_fit": 4, **opts},
                          train={"epochs": 1, "batch_size": 8, "progress": False})  # fmt: skip

    with pytest.raises(ConfigError, match="not its head 'head' applied"):
        train_run(cfg("test_softmax"), tmp_path / "soft", bundle=bundle)
    assert not (tmp_path / "soft").exists()  # refused before the base network trained
    with pytest.raises(ConfigError, match="'proj'"):
        train_run(cfg("test_twoheads"), tmp_path / "two", bundle=bundle)
    assert not (tmp_path / "two").exists()
    model = train_run(
        cfg("test_twoheads", head="head", samples=3, link="mc"), tmp_path / "two", bundle=bundle
    )
    assert model.predict(bundle.test.float()).probs.shape == (3, 6, 3, 12, 14)


class DictOut(UNet):
    def forward(self, x):
        return {"out": super().forward(x)}


if "test_dictout" not in MODELS:
    register_model("test_dictout", DictOut, task="segmentation")


def test_more_refusals_found_by_a_new_user(bundle, tmp_path):
    with pytest.raises(ConfigError, match=r"returned a dict with keys \['out'\]"):
        train_run(run_config(method="deterministic", model="test_dictout", seed=0,
                             data={"dataset": "toy"}, train={"epochs": 1, "progress": False}),
                  tmp_path / "dict", bundle=bundle)  # fmt: skip
    assert not (tmp_path / "dict").exists()
    splits = (_split(8, "train", 0), _split(4, "val", 1), _split(4, "test", 2))
    with pytest.raises(ConfigError, match="std .* be > 0"):
        segmentation_bundle("x", *splits, std=(0.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="divide 0-255 values by 255"):
        segmentation_bundle("x", *splits, mean=(120, 120, 120))
    void = SegSplit.from_arrays(splits[0].x.permute(0, 2, 3, 1), torch.full((8, 12, 14), 4),
                                CLASSES, anomaly_classes=("rider",), split="train")  # fmt: skip
    with pytest.raises(ConfigError, match="every training pixel is void"):
        segmentation_bundle("x", void, *splits[1:])
    # a test split without the held-out class: the anomaly rows are left out, with a warning
    calm = SegSplit.from_arrays(splits[2].x.permute(0, 2, 3, 1), torch.zeros(4, 12, 14).long(),
                                CLASSES, anomaly_classes=("rider",), split="test")  # fmt: skip
    model = train_run(_cfg("mc_dropout", samples=3), tmp_path / "mcd", bundle=bundle)
    cfg = EvalConfig(corruptions=[], progress=False, latency_repeats=1)
    with pytest.warns(UserWarning, match="no anomalous pixels"):
        rows, _ = evaluate(model, segmentation_bundle("x", *splits[:2], calm), cfg)
    assert not any(r["split"] == "anomaly" for r in rows)
    # the stochastic passes are seeded: the same numbers on every call
    a = {(r["split"], r["metric"]): r["value"] for r in evaluate(model, bundle, cfg)[0]}
    b = {(r["split"], r["metric"]): r["value"] for r in evaluate(model, bundle, cfg)[0]}
    assert {k: v for k, v in a.items() if k[0] != "cost"} == {
        k: v for k, v in b.items() if k[0] != "cost"
    }
