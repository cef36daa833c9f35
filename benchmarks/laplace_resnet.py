"""Subnetwork Laplace on ResNet-18 (CIFAR-10): fit time, predictive time and peak memory
against the size of the S x S matrix, for subnetworks up to the paper's 42,438 weights.

    python benchmarks/laplace_resnet.py --device cuda --sizes 10000,42438 --n-fit 45000 \
        [--run runs/cifar10_resnet18/runs/deterministic-seed0]
    python benchmarks/laplace_resnet.py --device cpu --sizes 2000,8000 --n-fit 64   # a rehearsal

A random subnetwork of S weights (the choice does not change the cost; a trained run's
weights with ``--run``, else an untrained ResNet-18) is fitted on the first ``--n-fit``
CIFAR-10 training images: the GGN accumulates in the device's dtype in place and is flushed
into a float64 matrix on the host, then the prior precision is tuned by marginal likelihood and
the linearised probit predictive of a batch of 128 test images is timed. Peak memory of the
fit, the tuning and the predictive: on CUDA the device allocator's peak above the model and
data (the float32 S x S accumulator and the Jacobian work live there, and with
``--linalg-device model``, the default on CUDA, the float64 GGN's copy and its factors too); on
CPU the peak of live tensor storage created by torch ops (host and device are one); each next
to the S x S matrix in float32 (4 S² bytes), with ``--memory-budget`` (2 GB) bounding the
Jacobian work. Writes ``laplace_resnet.json`` to ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from bnnkit.data import get_spec, load_bundle
from bnnkit.evaluate import _PeakMemory
from bnnkit.laplace import SubnetLaplace, as_logits_model
from bnnkit.methods import ModelSpec, UQModel, build_method


class _Peak:
    """Peak memory of a region in MB: CUDA allocator peak above its start, or (CPU) the peak of
    live tensor storage created inside it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mb = device, 0.0

    @contextlib.contextmanager
    def __call__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with _PeakMemory() as pm:
                yield
            peak = pm.peak
        self.mb = max(self.mb, peak / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="10000,42438")
    ap.add_argument("--n-fit", type=int, default=45000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--run", help="a trained ResNet-18 run directory (default: untrained)")
    ap.add_argument("--memory-budget", default="2GB", help="bound on the Jacobian work")
    ap.add_argument(
        "--linalg-device",
        choices=("cpu", "model"),
        default=None,
        help="where the S x S algebra runs (default: model on CUDA, else cpu)",
    )
    ap.add_argument("--out", default="runs/laplace_resnet")
    a = ap.parse_args()
    device = torch.device(a.device)
    linalg = a.linalg_device or ("model" if device.type == "cuda" else "cpu")
    if a.run:
        model = UQModel.load(Path(a.run) / "model.safetensors")
    else:
        ds = get_spec("cifar10")
        spec = ModelSpec("resnet18", ds.input_shape, ds.num_classes, ds.mean, ds.std,
                         {"width": a.width})  # fmt: skip
        torch.manual_seed(0)
        model = build_method("deterministic", spec)
    net = as_logits_model(model.eval()).to(device)
    b = load_bundle("cifar10", ood=[], subset=a.n_fit)
    x, y = b.train.float(), b.train.y
    xt = b.test.float()[:128].to(device)
    total = sum(p.numel() for p in net.parameters())
    rows = []
    for S in (int(s) for s in a.sizes.split(",")):
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:S].sort()[0]
        peak = _Peak(device)
        t0 = time.perf_counter()
        with peak():
            la = SubnetLaplace(net, idx, prior_precision=1.0, memory_budget=a.memory_budget,
                               linalg_device=linalg)  # fmt: skip
            la.fit((x, y))
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with peak():
            la.optimize_prior_precision("marglik")
        marglik_s = time.perf_counter() - t0
        with peak():
            la.predict(xt)  # the covariance root is computed once and cached
        _sync(device)
        t0 = time.perf_counter()
        la.predict(xt)
        _sync(device)
        predict_ms = (time.perf_counter() - t0) * 1e3
        sxs = 4 * S * S / 2**20
        row = {
            "S": S, "n_fit": len(x), "fit_s": round(fit_s, 2), "marglik_s": round(marglik_s, 2),
            "predict_ms_per_128": round(predict_ms, 1), "SxS_f32_mb": round(sxs),
            "peak_mb": round(peak.mb), "peak_x_SxS_f32": round(peak.mb / sxs, 2),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        del la
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "width": a.width, "trained": bool(a.run),
            "linalg_device": linalg, "memory_budget": a.memory_budget}  # fmt: skip
    (out / "laplace_resnet.json").write_text(json.dumps({**info, "rows": rows}, indent=1))
    keys = list(rows[0])
    print(f"\n{info}\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
