"""benchmarks/latency.py --runs: side-by-side predict latency of a finished bench's networks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnnkit.data import get_spec
from bnnkit.methods import ModelSpec, build_method

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "latency.py"


def _bench(tmp_path: Path, methods: dict[str, tuple[str, dict]], seeds: int = 2) -> Path:
    ds = get_spec("fashion_mnist")
    spec = ModelSpec("lenet5", ds.input_shape, ds.num_classes, ds.mean, ds.std)
    out = tmp_path / "bench"
    for label, (method, opts) in methods.items():
        for s in range(seeds):
            torch.manual_seed(s)
            run = out / "runs" / f"{label}-seed{s}"
            run.mkdir(parents=True)
            build_method(method, spec, opts).save(run / "model.safetensors")
    cfg = {"dataset": "fashion_mnist", "model": "lenet5", "seeds": seeds,
           "methods": list(methods)}  # fmt: skip
    (out / "bench_config.json").write_text(json.dumps(cfg))
    return out


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=100)  # fmt: skip


def test_times_every_network_and_gives_speed_ups(tmp_path):
    out = _bench(tmp_path, {"deterministic": ("deterministic", {}),
                            "mc_dropout": ("mc_dropout", {"samples": 16})})  # fmt: skip
    r = _run("--runs", str(out), "--vs", "mc_dropout", "--repeats", "5", "--batch", "32")
    assert r.returncode == 0, r.stderr
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in r.stdout.splitlines() if ln.startswith("| ") and "---" not in ln}  # fmt: skip
    assert set(rows) == {"method", "deterministic", "mc_dropout"}
    assert rows["mc_dropout"][-1] == "1.00"  # against itself
    # 16 passes of the dropout part vs one pass: the deterministic network is faster
    assert float(rows["deterministic"][-1]) > 1.0
    assert rows["deterministic"][2] == "61,706"


def test_refuses_unfinished_benches_and_unknown_baselines(tmp_path):
    out = _bench(tmp_path, {"deterministic": ("deterministic", {})}, seeds=1)
    r = _run("--runs", str(out), "--vs", "deep_ensemble")
    assert r.returncode != 0 and "--vs deep_ensemble is not a method of" in r.stderr
    (out / "runs" / "deterministic-seed0" / "model.safetensors").unlink()
    r = _run("--runs", str(out))
    assert r.returncode != 0 and "model.safetensors is missing" in r.stderr
    r = _run("--runs", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "holds no bench_config.json" in r.stderr
