"""The CIFAR-10 path end to end on small CPU data: the files laid out as the real ones (four
training shards, a test file, CIFAR-100's test set as the OOD partner), the GPU recipe's
training options, and every evaluation the GPU results page reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bnnkit.bench import BenchConfig, run_bench
from bnnkit.data import load_bundle, sources
from bnnkit.report import ResultStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """$BNNKIT_DATA with tiny CIFAR-10 shards / test set and a CIFAR-100 test set (NHWC uint8,
    the real files' keys); the class shows in the mean colour so a network can learn it."""
    rng = np.random.default_rng(0)

    def images(n, classes):
        y = np.arange(n) % classes
        x = rng.integers(0, 100, (n, 32, 32, 3))
        x[..., 0] += (y * 150 // max(1, classes - 1))[:, None, None]
        return x.clip(0, 255).astype(np.uint8), y.astype(np.uint8)

    for i in range(4):
        x, y = images(60, 10)
        np.savez(tmp_path / f"cifar10_train_{i}.npz", x_train=x, y_train=y)
    x, y = images(80, 10)
    np.savez(tmp_path / "cifar10_test.npz", x_test=x, y_test=y)
    x, y = images(80, 100)
    np.savez(tmp_path / "cifar100_test.npz", x_test=x, y_test=y)
    monkeypatch.setenv("BNNKIT_DATA", str(tmp_path))
    monkeypatch.setattr(sources, "_CACHE", {})
    return tmp_path


def test_cifar10_bundle_reads_all_shards_and_pairs_cifar100(cifar_root):
    b = load_bundle("cifar10", val_size=40)
    assert len(b.train) + len(b.val) == 240 and b.train.x.shape[1:] == (3, 32, 32)
    assert list(b.ood) == ["cifar100"] and "svhn" in b.missing_ood
    assert b.ood["cifar100"].x.dtype == b.train.x.dtype == torch.uint8
    assert len(b.ood["cifar100"]) == 80


def test_the_gpu_recipe_runs_on_cpu_and_reports_every_column(cifar_root, tmp_path):
    configs = sorted((ROOT / "benchmarks/configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:  # every committed bench config stays valid as options evolve
        BenchConfig(**yaml.safe_load(path.read_text())).validate()
    recipe = yaml.safe_load((ROOT / "benchmarks/configs/cifar10_resnet18.yaml").read_text())
    train = {**recipe["train_options"], "precision": "32-true", "warmup_epochs": 0}
    cfg = BenchConfig(
        methods=["deterministic", "batch_ensemble"], model="resnet18",
        model_options={"width": 4}, dataset="cifar10", epochs=1, seeds=1, subset=None,
        val_size=40, test_size=None, batch_size=50, lr=0.05, device="cpu",
        train_options=train, corruptions=["gaussian_noise", "contrast"], n_corrupt=40,
        angles=[], out=str(tmp_path / "bench"), progress=False,
        method_options={"batch_ensemble": {"members": 2}},
    )  # fmt: skip
    assert run_bench(cfg, log=lambda *_: None)
    with ResultStore(tmp_path / "bench" / "results.sqlite") as store:
        rows = store.rows(dataset="cifar10", model="resnet18")
    got = {(r["method"], r["split"], r["metric"]) for r in rows}
    for method in cfg.methods:
        for metric in ("accuracy", "nll", "brier", "ece"):
            assert (method, "test", metric) in got
        for score in ("max_prob", "entropy"):
            for kind in ("auroc", "aupr", "fpr95"):
                assert (method, "ood:cifar100", f"{kind}_{score}") in got
        for sev in range(1, 6):
            assert (method, f"corrupt:gaussian_noise:{sev}", "nll") in got
        for metric in ("latency_ms", "throughput", "peak_mem_mb", "parameters"):
            assert (method, "cost", metric) in got
    # mutual information only where the predictive has several members
    assert ("batch_ensemble", "ood:cifar100", "auroc_mutual_info") in got
    assert ("deterministic", "ood:cifar100", "auroc_mutual_info") not in got
    progress = tmp_path / "bench" / "runs" / "batch_ensemble-seed0" / "progress.json"
    assert '"loader": "tensor"' in progress.read_text()


def test_the_speed_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "speed"
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/cifar_speed.py"), "--device", "cpu",
         "--width", "4", "--batch", "4", "--repeats", "1", "--warmup", "1", "--out", str(out)],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    text = (out / "speed.md").read_text()
    for row in ("one network", "loop of 4 networks", "floor: one network on 4x batch",
                "BatchEnsemble M=4", "rank-1 M=4", "LP-BNN M=4"):  # fmt: skip
        assert text.count(f"| {row} |") == 2  # inference and training


def test_shifted_test_sets_are_made_once_per_bundle_and_change_nothing(monkeypatch):
    """Every method of a bench is scored on the same corrupted and rotated images, made once
    (the corruptions run on the CPU); the rows equal those of a fresh bundle."""
    import bnnkit.evaluate as ev
    from bnnkit.methods import build_method
    from bnnkit.train.run import model_spec
    from test_chunks import _cfg, colour_bundle

    calls = []
    real = ev.corrupt
    monkeypatch.setattr(ev, "corrupt", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    cfg = ev.EvalConfig(corruptions=["gaussian_noise", "contrast"], severities=[1, 5],
                        n_corrupt=16, angles=[0, 90], n_rotate=16, progress=False)  # fmt: skip
    bundle = colour_bundle(n=32)
    torch.manual_seed(0)
    models = [
        build_method(m, model_spec(_cfg(), bundle), {}) for m in ("deterministic", "batch_ensemble")
    ]
    rows = [ev.evaluate(m, bundle, cfg)[0] for m in models]
    assert len(calls) == 4  # 2 corruptions x 2 severities, once for both models
    fresh = ev.evaluate(models[1], colour_bundle(n=32), cfg)[0]
    strip = lambda rs: [r for r in rs if r["split"] != "cost"]  # noqa: E731
    assert strip(rows[1]) == strip(fresh)
