"""Variational convolutions: Flipout vs independent per-row weights (grouped convolution), side
by side in one run, with the deterministic network as the unit (ratios, not absolute times).

    python benchmarks/variational_conv.py [--model lenet5] [--batch 128] [--samples 8]

For each model: the `mfvi` method with ``estimator=flipout`` and ``estimator=grouped`` (Linear
layers use the exact local reparameterisation in both), a training step (forward of one sample
per input, CE + KL / N, backward, Adam) and a prediction (``samples`` weight samples per input in
one folded pass, no gradients). Interleaved round-robin; median over repeats after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bnnkit.data import get_spec
from bnnkit.methods import ModelSpec, build_method


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--width", type=int, default=None, help="resnet18 width (default 64)")
    a = ap.parse_args()
    ds = get_spec(a.dataset)
    arch = {"width": a.width} if a.width else {}
    spec = ModelSpec(a.model, ds.input_shape, ds.num_classes, ds.mean, ds.std, arch)
    torch.manual_seed(0)
    models = {
        "deterministic": build_method("deterministic", spec),
        "flipout": build_method("mfvi", spec, {"estimator": "flipout", "samples": a.samples}),
        "grouped": build_method("mfvi", spec, {"estimator": "grouped", "samples": a.samples}),
    }
    opts = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, m in models.items()}
    x = torch.rand(a.batch, *ds.input_shape)
    y = torch.randint(0, ds.num_classes, (a.batch,))

    def train_step(k):
        model, opt = models[k], opts[k]
        out = model(x, 1)
        loss = F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0])) + model.kl() / 50000
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict(k):
        models[k].predict(x)

    rows = []
    for what, fn in (("train step", train_step), ("predict", predict)):
        times = {k: [] for k in models}
        for k in models:
            for _ in range(3):
                fn(k)
        for _ in range(a.repeats):
            for k in models:
                t0 = time.perf_counter()
                fn(k)
                times[k].append(time.perf_counter() - t0)
        base = statistics.median(times["deterministic"])
        for k in models:
            med = statistics.median(times[k])
            rows.append((what, k, med * 1000, med / base))
    print(
        f"{a.model}, batch {a.batch}, {a.samples} samples at prediction, CPU, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| call | estimator | median ms | x deterministic |")
    print("|---|---|---|---|")
    for what, k, ms, ratio in rows:
        print(f"| {what} | {k} | {ms:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
