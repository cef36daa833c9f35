"""Training-step time of every trainable method, side by side in one run (ratios).

    python benchmarks/train_step.py [--model lenet5] [--batch 128] [--steps 20]

One step = forward of all members (each member sees the whole batch), cross-entropy (+ KL / N),
backward, Adam update. Methods interleaved round-robin; median over steps after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bnnkit.data import get_spec
from bnnkit.methods import METHODS, ModelSpec, build_method


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    ds = get_spec(a.dataset)
    spec = ModelSpec(a.model, ds.input_shape, ds.num_classes, ds.mean, ds.std)
    torch.manual_seed(0)
    names = [m for m in METHODS if METHODS[m].posthoc_of is None and m != "placement"]
    models = {m: build_method(m, spec) for m in names}
    opts = {m: torch.optim.Adam(models[m].parameters(), 1e-3) for m in names}
    x = torch.rand(a.batch, *ds.input_shape)
    y = torch.randint(0, ds.num_classes, (a.batch,))

    def step(m):
        model, opt = models[m], opts[m]
        out = model(x)
        loss = F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0])) + model.kl() / 50000
        opt.zero_grad()
        loss.backward()
        opt.step()

    times = {m: [] for m in names}
    for m in names:
        for _ in range(3):
            step(m)
    for _ in range(a.steps):
        for m in names:
            t0 = time.perf_counter()
            step(m)
            times[m].append(time.perf_counter() - t0)
    base = statistics.median(times["deterministic"])
    print(
        f"{a.model}, batch {a.batch}, CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| method | forward passes per input | median ms/step | x deterministic |")
    print("|---|---|---|---|")
    for m in names:
        med = statistics.median(times[m])
        print(f"| {m} | {models[m].members} | {med * 1000:.1f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
