"""`bnnkit bench` on a segmentation data set (a small synthetic camvid.npz laid out as the real
one, and a user network registered by name): the segmentation table, the per-class IoU table,
the uncertainty-map figure; a second call reuses every finished run; what segmentation cannot
do is refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import ConfigError
from bnnkit.bench import SEG_DEFAULT_METHODS, BenchConfig, for_task, run_bench
from bnnkit.data import segmentation as seg
from bnnkit.models import MODELS, Normalize, register_model

NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
         "Pedestrian", "Bicyclist"]  # fmt: skip


class SmallSeg(nn.Module):
    def __init__(self, input_shape, num_classes, mean=0.0, std=1.0):
        super().__init__()
        self.norm = Normalize(mean, std)
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.dec = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        z = self.classifier(self.dec(self.enc(self.norm(x))))
        return F.interpolate(z, size=x.shape[-2:], mode="bilinear", align_corners=False)


if "bench_seg" not in MODELS:
    register_model("bench_seg", SmallSeg, task="segmentation")


@pytest.fixture
def camvid(tmp_path, monkeypatch):
    """$BNNKIT_DATA with a synthetic camvid.npz (labels from the red channel, a Bicyclist
    square in every test image, some void)."""
    rng = np.random.default_rng(0)
    arrays = {"class_names": np.array(NAMES)}
    for split, n in {"train": 12, "val": 4, "test": 4}.items():
        x = rng.integers(0, 256, (n, 20, 24, 3), dtype=np.uint8)
        y = (x[..., 0].astype(np.int64) * 10 // 256).astype(np.uint8)  # 0..9
        y[:, :2] = 11  # void rows
        y[:, 8:12, 8:12] = 10  # a Bicyclist square (held out by default)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
        arrays[f"names_{split}"] = np.array([f"{split}_{i}" for i in range(n)])
    np.savez(tmp_path / "camvid.npz", **arrays)
    monkeypatch.setenv("BNNKIT_DATA", str(tmp_path))
    monkeypatch.setattr(seg, "_CACHE", {})
    return tmp_path


def _cfg(out, **kw):
    base = dict(dataset="camvid", model="bench_seg", methods=["deterministic", "deep_ensemble"],
                seeds=1, epochs=1, batch_size=4, subset=None, test_size=None, n_corrupt=2,
                corruptions=["contrast"], angles=[], out=str(out), progress=False,
                method_options={"deep_ensemble": {"members": 2}},
                train_options={"crop": [16, 16]})  # fmt: skip
    base.update(kw)
    return BenchConfig(**base)


def test_a_segmentation_bench_writes_its_tables_and_maps_and_resumes(camvid, tmp_path):
    out = tmp_path / "bench"
    table = run_bench(_cfg(out), log=lambda *a: None)
    assert "mIoU %" in table and "AUPR-MI %" in table and "cAcc %" not in table
    md = (out / "results.md").read_text()
    assert "anomaly classes: Bicyclist" in md
    header = md.split("### Test IoU % per class")[1].strip().splitlines()[0]
    assert header == "| Method | " + " | ".join(NAMES[:10]) + " |"  # the data set's order
    sev = md.split("### mIoU % by corruption severity")[1].strip().splitlines()[0]
    assert sev == "| Method | 0 | 1 | 2 | 3 | 4 | 5 |"  # 0: the same images uncorrupted
    assert (out / "figures" / "uncertainty_maps.png").stat().st_size > 1000
    assert (out / "figures" / "mutual_info_maps.png").stat().st_size > 1000
    rows = json.loads((out / "runs" / "deep_ensemble-seed0" / "metrics.json").read_text())
    got = {(r["split"], r["metric"]): r["value"] for r in rows}
    assert 0.0 <= got[("anomaly", "aupr_mutual_info")] <= 1.0
    assert got[("cost", "latency_images")] >= 1
    # the anomaly square is 16 of the 18x24 non-void test pixels per image: AUPR's floor
    assert got[("anomaly", "aupr_entropy")] >= 0.0
    mtime = (out / "runs" / "deterministic-seed0" / "model.safetensors").stat().st_mtime_ns
    assert run_bench(_cfg(out), log=lambda *a: None) == table  # reused, same table
    assert (out / "runs" / "deterministic-seed0" / "model.safetensors").stat().st_mtime_ns == mtime


def test_segmentation_defaults_and_refusals(camvid, tmp_path):
    cfg = for_task(BenchConfig(dataset="camvid", model="bench_seg"))
    assert cfg.methods == SEG_DEFAULT_METHODS
    assert "elastic" not in cfg.corruptions and cfg.corruptions and cfg.angles == []
    for bad, match in (({"corruptions": ["elastic"]}, "move pixels"),
                       ({"angles": [15]}, "classification evaluation"),
                       ({"model": "lenet5"}, "classification model"),
                       ({"methods": ["laplace_diag"]}, "no segmentation form"),
                       ({"train_options": {"crop": [99, 16]}}, "larger than")):  # fmt: skip
        out = tmp_path / f"bad{len(match)}"
        with pytest.raises(ConfigError, match=match):
            run_bench(_cfg(out, **bad), log=lambda *a: None)
        assert not out.exists(), bad  # nothing written: the corrected command runs
    out = tmp_path / "bad10"
    assert run_bench(_cfg(out, methods=["deterministic"]), log=lambda *a: None)


def test_held_out_classes_are_a_bench_option(camvid, tmp_path):
    out = tmp_path / "b2"
    run_bench(_cfg(out, methods=["deterministic"], anomaly_classes="Bicyclist,Car"),
              log=lambda *a: None)  # fmt: skip
    md = (out / "results.md").read_text()
    assert "anomaly classes: Bicyclist, Car" in md
    header = md.split("### Test IoU % per class")[1].strip().splitlines()[0]
    assert header == "| Method | " + " | ".join(n for n in NAMES[:10] if n != "Car") + " |"
    with pytest.raises(ConfigError, match="unknown anomaly class 'Bike'"):
        run_bench(_cfg(tmp_path / "b3", anomaly_classes="Bike"), log=lambda *a: None)
    assert not (tmp_path / "b3").exists()
    assert torch.is_tensor(torch.zeros(1))


def test_bnnkit_evaluate_on_a_segmentation_run_uses_its_classes_and_pixel_corruptions(
    camvid, tmp_path, capsys
):
    from bnnkit.cli import main
    from bnnkit.evaluate import SEG_EVAL_DEFAULTS

    out = tmp_path / "b4"
    run_bench(_cfg(out, methods=["deterministic"], anomaly_classes="Bicyclist,Car"),
              log=lambda *a: None)  # fmt: skip
    run = out / "runs" / "deterministic-seed0"
    assert main(["evaluate", str(run), "--quiet", "--severities", "1",
                 "--latency-repeats", "1"]) == 0  # fmt: skip
    rows = json.loads((run / "metrics.json").read_text())
    kinds = {r["split"].split(":")[1] for r in rows if r["split"].startswith("corrupt:")}
    assert kinds == {*SEG_EVAL_DEFAULTS["corruptions"], "clean", "mean"}
    assert not any(r["metric"] == "iou:Car" for r in rows)  # Car held out, as in training
    assert "anomaly" in capsys.readouterr().out


def test_bnnkit_train_on_camvid_with_model_options(camvid, tmp_path):
    from bnnkit.cli import main

    out = tmp_path / "t"
    base = ["train", "--dataset", "camvid", "--epochs", "1", "--batch-size", "4",
            "--crop", "16,16", "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*base, "--model", "lenet5"]) == 2  # refused by name, nothing written
    assert not out.exists()
    assert main([*base, "--model", "deeplabv3plus", "--model-option", "width=2"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_options"] == {"width": 2} and cfg["train"]["crop"] == [16, 16]
