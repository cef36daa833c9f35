"""Inference cost of every registered method, side by side in one run (ratios to deterministic).

    python benchmarks/latency.py [--model lenet5] [--batch 128] [--device cpu]

Untrained networks: the cost of a forward pass does not depend on the weights. Each method's
eval-mode forward runs all its members and samples for one batch; median over repeats, after
warm-up, methods interleaved round-robin so that drift of the machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnnkit.data import get_spec
from bnnkit.methods import METHODS, ModelSpec, build_method


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    ds = get_spec(a.dataset)
    spec = ModelSpec(a.model, ds.input_shape, ds.num_classes, ds.mean, ds.std)
    torch.manual_seed(0)
    # every method at its defaults ("placement" needs a plan: it is measured by bnnkit search)
    names = [m for m in METHODS if m != "placement"]
    models = {m: build_method(m, spec).to(a.device).eval() for m in names}
    x = torch.rand(a.batch, *ds.input_shape, device=a.device)
    times = {m: [] for m in models}
    with torch.no_grad():
        for model in models.values():
            for _ in range(3):
                model.net(x, model.eval_samples)
        for _ in range(a.repeats):
            for m, model in models.items():
                if a.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.net(x, model.eval_samples)
                if a.device == "cuda":
                    torch.cuda.synchronize()
                times[m].append(time.perf_counter() - t0)
    base = statistics.median(times["deterministic"])
    base_params = models["deterministic"].num_parameters()
    print(
        f"{a.model} on {a.dataset}, batch {a.batch}, {a.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| method | passes per input | median ms/batch | x deterministic | parameters | x params |"
    )
    print("|---|---|---|---|---|---|")
    for m, model in models.items():
        med = statistics.median(times[m])
        p = model.num_parameters()
        print(
            f"| {m} | {model.members * model.eval_samples} | {med * 1000:.2f} | "
            f"{med / base:.2f} | {p:,} | {p / base_params:.3f} |"
        )


if __name__ == "__main__":
    main()
