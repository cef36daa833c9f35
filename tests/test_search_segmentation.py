"""The placement search on a segmentation data set, on a small U-Net written here: the
objectives (pixel NLL, synthetic-anomaly AUPR, placement-aware FLOPs) equal brute-force
computations and read validation data only (a test split that raises when touched changes
nothing), the synthetic anomalies are seeded rectangles of OOD content, decoder-only plans are
reachable and cheaper, a small search completes, and what cannot work is refused by name."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import ConfigError
from bnnkit.data.bundle import DataBundle, Split, segmentation_bundle
from bnnkit.data.segmentation import IGNORE_INDEX, SegSplit
from bnnkit.methods import ModelSpec, build_method
from bnnkit.models import MODELS, Normalize, PlacementFallback, build_model, register_model
from bnnkit.plan import PlacementPlan
from bnnkit.search import SearchSpace, search_units
from bnnkit.search.final import comparison, final_plans
from bnnkit.search.objectives import (
    SEG_OBJECTIVES,
    evaluate_segmentation_candidate,
    forward_flops,
    search_ood_set,
    synthetic_anomalies,
)
from bnnkit.search.study import PlacementSearch, SearchConfig

CLASSES = ["sky", "road", "car", "rider"]  # "rider" is held out
H, W, WIDTH = 12, 14, 6


class UNet(nn.Module):
    """Two-level U-Net: a strided encoder, a decoder on the skip connection and the upsampled
    bottleneck, a 1x1 classifier."""

    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0, width=WIDTH):
        super().__init__()
        c = input_shape[0]
        self.norm = Normalize(mean, std)
        self.enc1 = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width),
                                  nn.ReLU())  # fmt: skip
        self.enc2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())  # fmt: skip
        self.dec = nn.Sequential(nn.Conv2d(3 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        a = self.enc1(self.norm(x))
        b = self.enc2(a)
        b = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.dec(torch.cat([a, b], 1)))


if "search_unet" not in MODELS:
    register_model("search_unet", UNet, task="segmentation")

SPEC = ModelSpec("search_unet", (3, H, W), 3, task="segmentation")
DECODER = {"dec.0": "batch_ensemble", "head": "batch_ensemble"}


def _split(n: int, split: str, seed: int) -> SegSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, H, W, 3), dtype=torch.uint8, generator=g)
    y = (x[..., 0].long() * 4) // 256  # the class is readable from the red channel
    y[:, :2, :3] = 4  # a void corner
    return SegSplit.from_arrays(x, y, CLASSES, anomaly_classes=("rider",), split=split)


def _bundle(test_seed: int = 2) -> DataBundle:
    return segmentation_bundle("toy", _split(16, "train", 0), _split(6, "val", 1),
                               _split(6, "test", test_seed))  # fmt: skip


class _Sealed:
    """A test split that fails the moment anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the search read the test split ({name})")

    def __len__(self):
        raise AssertionError("the search read the test split (len)")


def _sealed() -> DataBundle:
    b = _bundle()
    b.test = _Sealed()
    return b


def _cfg(out, trials: int = 3, **kw) -> SearchConfig:
    base = dict(
        out=str(out), dataset="toy", model="search_unet", epochs=1, subset=None, batch_size=8,
        trials=trials, kinds=["deterministic", "mc_dropout", "batch_ensemble"], members=[2],
        samples=[1, 2], n_ood=1000, latency_batch=4, baselines=["deterministic"],
        train_options={"crop": [8, 10]}, progress=False,
    )  # fmt: skip
    base.update(kw)
    return SearchConfig(**base)


# ------------------------------------------------------------------ synthetic anomalies


def test_synthetic_anomalies_are_seeded_rectangles_of_ood_content_in_validation_images():
    val = _bundle().val
    x, y, mask = synthetic_anomalies(val.x, val.y, "synthetic", seed=3)
    again = synthetic_anomalies(val.x, val.y, "synthetic", seed=3)
    assert all(torch.equal(a, b) for a, b in zip((x, y, mask), again))
    assert not torch.equal(mask, synthetic_anomalies(val.x, val.y, "synthetic", seed=4)[2])
    assert x.dtype == torch.uint8 and x.shape == val.x.shape and mask.shape == val.y.shape
    for m in mask:  # one filled rectangle per image, sides within [1/8, 1/3] of the image's
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(m.sum()) == h * w
        assert round(H / 8) <= h <= round(H / 3) and round(W / 8) <= w <= round(W / 3)
    pix = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
    keep = ~mask
    assert torch.equal(pix(x)[keep], pix(val.x)[keep])  # elsewhere the validation image
    assert torch.equal(y[keep], val.y[keep]) and (y[mask] == IGNORE_INDEX).all()
    src = search_ood_set("synthetic", val.float(), len(val), seed=3)
    src = (src * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(pix(x)[mask], pix(src)[mask])  # inside, the OOD image's pixels
    assert len(synthetic_anomalies(val.x, val.y, "mixed", n=1000)[0]) == len(val)
    assert len(synthetic_anomalies(val.x, val.y, "mixed", n=2)[0]) == 2


def test_segmentation_objectives_equal_a_brute_force_computation():
    """NLL over the non-void pixels, mIoU from a confusion count and the anomaly AUPR / AUROC
    by scikit-learn, all on the network's own logits (two deterministic members)."""
    metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    model = build_method("placement", SPEC, {"plan": {"layers": DECODER, "members": 2}}).eval()
    val = _bundle().val
    anomalies = synthetic_anomalies(val.x, val.y, "mixed", seed=5)
    obj = evaluate_segmentation_candidate(model, (val.x, val.y), anomalies, latency_batch=4,
                                          repeats=1, memory_budget="1KB")  # fmt: skip

    def mean_probs(x_uint8):
        with torch.no_grad():
            return torch.softmax(model.net(x_uint8.float() / 255, 1), dim=2).mean(0)

    p, y = mean_probs(val.x), val.y.long()
    keep = y != IGNORE_INDEX
    picked = p.movedim(1, -1)[keep].gather(1, y[keep][:, None]).double()
    assert obj.val_nll == pytest.approx(float(-picked.log().mean()), rel=1e-5)
    pred, truth = p.argmax(1)[keep], y[keep]
    ious = []
    for c in range(3):
        union = int(((pred == c) | (truth == c)).sum())
        if union:
            ious.append(int(((pred == c) & (truth == c)).sum()) / union)
    assert obj.val_miou == pytest.approx(float(np.mean(ious)), rel=1e-6)

    xa, ya, mask = anomalies
    pa = mean_probs(xa)
    entropy = -(pa * pa.clamp_min(1e-12).log()).sum(1)
    neg = ~mask & (ya != IGNORE_INDEX)  # pasted pixels positive; void pixels left out
    labels = np.r_[np.ones(int(mask.sum())), np.zeros(int(neg.sum()))]
    scores = np.r_[entropy[mask].numpy(), entropy[neg].numpy()]
    assert obj.anomaly_aupr == pytest.approx(metrics.average_precision_score(labels, scores),
                                             abs=1e-6)  # fmt: skip
    assert obj.anomaly_auroc == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-6)
    assert 0 < obj.anomaly_aupr < 1 and obj.latency_images == 1  # 1KB: one image per chunk


# ------------------------------------------------------------------ space and FLOPs


def _conv_flops(cin, cout, k, h, w):
    return 2 * cin * cout * k * k * h * w


#: the U-Net's FLOPs per image (2 per multiply-add): encoder (enc1, enc2 at stride 2) and
#: decoder (dec, head)
ENC_FLOPS = _conv_flops(3, WIDTH, 3, H, W) + _conv_flops(WIDTH, 2 * WIDTH, 3, H // 2, W // 2)
DEC_FLOPS = _conv_flops(3 * WIDTH, WIDTH, 3, H, W) + _conv_flops(WIDTH, 3, 1, H, W)


def test_a_decoder_only_plan_is_reachable_and_runs_the_encoder_once():
    net = build_model("search_unet", (3, H, W), 3)
    assert search_units(net) == ["enc1.0", "enc2.0", "dec.0", "head"]
    assert search_units(net, "parts") == search_units(net)
    space = SearchSpace(net, kinds=("deterministic", "batch_ensemble"), members=(4,))
    picks = {"first": "dec.0", "members": 4}
    plan = space.sample(lambda name, choices: picks.get(name, choices[-1]))
    assert plan == PlacementPlan(DECODER, members=4)

    enc, dec = ENC_FLOPS, DEC_FLOPS
    x = torch.rand(1, 3, H, W)

    def flops(layers, members):
        model = build_method("placement", SPEC, {"plan": {"layers": layers, "members": members}})
        with warnings.catch_warnings():
            warnings.simplefilter("error", PlacementFallback)
            return forward_flops(model, x)

    whole = {u: "batch_ensemble" for u in search_units(net)}
    assert flops(DECODER, 4) == enc + 4 * dec  # the encoder once, the decoder per member
    assert flops(whole, 4) == 4 * (enc + dec)
    assert flops(DECODER, 4) < flops(whole, 4)


def test_deeplab_parts_reach_a_decoder_only_plan_that_costs_less():
    torch.manual_seed(0)
    net = build_model("deeplabv3plus", (3, 32, 32), 3, width=2)
    units = search_units(net, "parts")
    assert units == ["backbone.stem.0", "backbone.layer1.*", "backbone.layer2.*",
                     "backbone.layer3.*", "backbone.layer4.*", "aspp.*", "decoder.*",
                     "classifier"]  # fmt: skip
    space = SearchSpace(net, kinds=("deterministic", "batch_ensemble"), members=(3,), units=units)
    picks = {"first": "decoder.*", "members": 3}
    plan = space.sample(lambda name, choices: picks.get(name, choices[-1]))
    assert plan.layers == {"decoder.*": "batch_ensemble", "classifier": "batch_ensemble"}
    spec = ModelSpec("deeplabv3plus", (3, 32, 32), 3, arch_options={"width": 2},
                     task="segmentation")  # fmt: skip
    x = torch.rand(1, 3, 32, 32)

    def flops(p):
        model = build_method("placement", spec, {"plan": p.to_dict()})
        with warnings.catch_warnings():
            warnings.simplefilter("error", PlacementFallback)
            return forward_flops(model, x), model.predict(x).probs.shape

    whole = PlacementPlan({u: "batch_ensemble" for u in units}, members=3)
    det = PlacementPlan({"classifier": "deterministic"})
    (f_dec, shape), (f_whole, _), (f_det, _) = flops(plan), flops(whole), flops(det)
    assert shape == (3, 1, 3, 32, 32)
    assert f_whole == 3 * f_det and f_det < f_dec < f_whole
    with pytest.raises(ConfigError, match="unknown unit grouping 'stages'"):
        search_units(net, "stages")


# ------------------------------------------------------------------ the search


def test_the_objectives_read_validation_data_only(tmp_path):
    """The same plan evaluated with the toy bundle and with its test split sealed (any read
    fails): the same objectives, bit for bit (latency aside)."""
    plan = PlacementPlan(DECODER, members=2)
    a = PlacementSearch(_cfg(tmp_path / "a"), bundle=_bundle()).evaluate(plan)
    b = PlacementSearch(_cfg(tmp_path / "b"), bundle=_sealed()).evaluate(plan)
    for k in ("val_nll", "val_miou", "anomaly_aupr", "anomaly_auroc", "flops_per_image",
              "parameters"):  # fmt: skip
        assert a[k] == b[k], k
    assert 0 < a["anomaly_aupr"] <= 1 and a["val_nll"] > 0
    assert a["flops_per_image"] == ENC_FLOPS + 2 * DEC_FLOPS  # the encoder once, 2 members


def test_a_small_segmentation_search_completes_and_writes_its_front_and_plan(tmp_path):
    search = PlacementSearch(_cfg(tmp_path / "s", trials=3, max_latency_ms=1e6), bundle=_sealed())
    # the latency constrained is per image (the timed batch depends on memory and members)
    obj = {"latency_ms": 2e6, "latency_ms_per_image": 5e5, "parameters": 1.0}
    assert search.violations(obj) == [5e5 - 1e6, 0.0]
    out = search.run()
    done = search.completed()
    assert len(done) == 3
    for t in done:  # the sampler saw the segmentation objectives, in their order
        assert list(t.values) == [t.user_attrs["objectives"][k] for k in SEG_OBJECTIVES]
    assert search.study.user_attrs["settings"]["objectives"] == list(SEG_OBJECTIVES)
    rows = list(csv.DictReader((out / "pareto.csv").open()))
    assert rows and {"val_nll", "val_miou", "anomaly_aupr", "flops_per_image",
                     "latency_ms_per_image", "plan"} <= set(rows[0])  # fmt: skip
    assert "ood_auroc" not in rows[0]
    plan = PlacementPlan.load(out / "plan.json")
    assert plan.key() in {t.user_attrs["plan"] for t in done}
    assert (out / "pareto.png").stat().st_size > 5000
    base = list(csv.DictReader((out / "baselines.csv").open()))
    assert [r["name"] for r in base] == ["deterministic"] and "anomaly_aupr" in base[0]
    plans = final_plans(out)  # the final comparison picks by the synthetic-anomaly AUPR
    best = max(rows, key=lambda r: float(r["anomaly_aupr"]))
    chosen = {p.key() for p in plans.values()}
    assert PlacementPlan.from_dict(json.loads(best["plan"])).key() in chosen


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model": "mlp"}, "'mlp' is a classification model but 'toy' is a segmentation"),
        ({"baselines": ["deterministic", "laplace_diag"]}, "no segmentation form"),
        ({"dataset": "camvid"}, "the bundle is 'toy' but the search config names dataset"),
        ({"units": "stages"}, "units"),
    ],
)
def test_what_cannot_work_on_segmentation_is_refused_before_any_write(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        PlacementSearch(_cfg(tmp_path / "r", **change), bundle=_bundle())
    assert not (tmp_path / "r").exists()


def test_held_out_classes_on_a_classification_data_set_are_refused(tmp_path):
    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
        return Split(x, torch.randint(0, 3, (n,), generator=g))

    cls = DataBundle("toycls", (1, 4, 4), 3, (0.5,), (0.25,), split(32), split(8), split(8))
    cfg = _cfg(tmp_path / "c", dataset="toycls", model="mlp", anomaly_classes="car")
    with pytest.raises(ConfigError, match="classification data set; leave it at its default"):
        PlacementSearch(cfg, bundle=cls)
    with pytest.raises(ConfigError, match="'search_unet' is a segmentation model"):
        PlacementSearch(_cfg(tmp_path / "c", dataset="toycls"), bundle=cls)
    assert not (tmp_path / "c").exists()


def test_the_final_comparison_of_a_segmentation_bench_compares_pixel_metrics():
    rows = [
        {"method": m, "split": s, "metric": k, "value": v, "seed": seed}
        for seed in (0, 1)
        for m, lat, nll, miou, aupr in (("searched", 2.0, 0.5, 0.6, 0.3),
                                        ("deterministic", 4.0, 0.4, 0.5, 0.2))
        for s, k, v in (("cost", "latency_ms_per_image", lat), ("cost", "latency_ms", 9.0),
                        ("test", "nll", nll), ("test", "miou", miou),
                        ("anomaly", "aupr_entropy", aupr), ("anomaly", "auroc_entropy", 0.8))
    ]  # fmt: skip
    headers, lines = comparison(rows, ["searched"], ["deterministic"])
    assert headers[2:] == ["speed-up (x)", "NLL vs baseline %", "mIoU vs baseline %",
                           "anomaly AUPR vs baseline %", "anomaly AUROC vs baseline %"]  # fmt: skip
    assert lines == [["searched", "deterministic", "2.00", "+25.0", "+20.0", "+50.0", "+0.0"]]
