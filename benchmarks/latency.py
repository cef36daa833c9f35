"""Inference cost of every registered method, side by side in one run (ratios to deterministic).

    python benchmarks/latency.py [--model lenet5] [--batch 128] [--device cpu]
    python benchmarks/latency.py --runs runs/search_fmnist/final [--vs deep_ensemble,mc_dropout]

Untrained networks: the cost of a forward pass does not depend on the weights. Each method's
eval-mode forward runs all its members and samples for one batch; median over repeats, after
warm-up, methods interleaved round-robin so that drift of the machine hits all of them alike.

``--runs DIR`` times the trained networks of a finished bench instead (every method of its
``bench_config.json``, every seed): ``predict(x)`` as the bench times it, on one batch of the
bench's data set shape, all networks interleaved round-robin in this one process, so a bench
whose own ``ms/batch`` column was timed on busy cores gets side-by-side costs; ``--vs`` names
the methods to give speed-ups against (their ms / the method's ms, > 1: faster).
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
    ap.add_argument("--runs", help="a finished bench directory: time its trained networks")
    ap.add_argument("--vs", default="", help="with --runs: methods to give speed-ups against")
    a = ap.parse_args()
    if a.runs:
        return trained(a)
    ds = get_spec(a.dataset)
    spec = ModelSpec(a.model, ds.input_shape, ds.num_classes, ds.mean, ds.std)
    torch.manual_seed(0)
    # every method at its defaults ("placement" needs a plan: it is measured by bnnkit search)
    names = [m for m in METHODS if m != "placement"]
    models = {m: build_method(m, spec).to(a.device).eval() for m in names}
    x = torch.rand(a.batch, *ds.input_shape, device=a.device)
    calls = {m: (lambda u=u: u.net(x, u.eval_samples)) for m, u in models.items()}
    times = interleaved(calls, a.repeats, a.device)
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


def interleaved(calls: dict, repeats: int, device: str) -> dict[object, list[float]]:
    """Seconds per call of every function in ``calls``: 3 warm-up calls each, then ``repeats``
    rounds calling each once in turn (round-robin, so drift of the machine hits all alike)."""
    times = {k: [] for k in calls}
    with torch.no_grad():
        for fn in calls.values():
            for _ in range(3):
                fn()
        for _ in range(repeats):
            for k, fn in calls.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
    return times


def trained(a) -> None:
    """Side-by-side predict latency of a finished bench's trained networks."""
    import json
    import sys
    from pathlib import Path

    from bnnkit.methods import UQModel

    out = Path(a.runs)
    cfg_path = out / "bench_config.json"
    if not cfg_path.is_file():
        sys.exit(f"error: {out} holds no bench_config.json; give a finished bench's --out")
    cfg = json.loads(cfg_path.read_text())
    ds = get_spec(cfg["dataset"])
    models = {}
    for m in cfg["methods"]:
        for s in range(cfg["seeds"]):
            path = out / "runs" / f"{m}-seed{s}" / "model.safetensors"
            if not path.is_file():
                sys.exit(f"error: {path} is missing; finish the bench first")
            models[(m, s)] = UQModel.load(path).to(a.device).eval()
    vs = [v for v in a.vs.split(",") if v]
    for v in vs:
        if v not in cfg["methods"]:
            sys.exit(f"error: --vs {v} is not a method of {out} ({', '.join(cfg['methods'])})")
    torch.manual_seed(0)
    x = torch.rand(a.batch, *ds.input_shape, device=a.device)
    times = interleaved({k: (lambda m=m: m.predict(x)) for k, m in models.items()}, a.repeats,
                        a.device)  # fmt: skip
    ms = {m: [1000 * statistics.median(times[(m, s)]) for s in range(cfg["seeds"])]
          for m in cfg["methods"]}  # fmt: skip
    mean = {m: statistics.fmean(v) for m, v in ms.items()}
    print(
        f"{out}: {cfg['model']} on {cfg['dataset']}, batch {a.batch}, {a.device}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; {cfg['seeds']} seed(s), "
        f"{a.repeats} timed predictions each, all interleaved\n"
    )
    head = "| method | ms/batch (mean over seeds) | min-max over seeds | parameters |"
    head += "".join(f" speed-up vs {v} |" for v in vs)
    print(head)
    print("|---|---|---|---|" + "---|" * len(vs))
    for m in cfg["methods"]:
        p = models[(m, 0)].num_parameters()
        line = f"| {m} | {mean[m]:.2f} | {min(ms[m]):.2f}-{max(ms[m]):.2f} | {p:,} |"
        line += "".join(f" {mean[v] / mean[m]:.2f} |" for v in vs)
        print(line)


if __name__ == "__main__":
    main()
