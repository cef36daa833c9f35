"""Folded rank-1-family ensembles vs one network and vs a loop over M separate networks.

    python benchmarks/ensemble_speed.py [--model lenet5] [--batch 128] [--mode infer|train]

For each of BatchEnsemble, rank-1 BNN and LP-BNN (M = 4 members, 1 sample per member) this times
the folded network under both execution schedules (``fold``: one pass over the repeated batch,
factors scale activations; ``members``: one pass per member with per-member factors folded into
the weights) next to one deterministic network and a deep ensemble of M networks run in a loop.
``infer``: eval-mode forward under ``torch.no_grad``. ``train``: forward (every member sees the
whole batch), cross-entropy + KL/N + auxiliary loss, backward, Adam step. Untrained networks
(cost does not depend on the weights); variants interleaved round-robin, median after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bnnkit.data import get_spec
from bnnkit.methods import ModelSpec, build_method
from bnnkit.nn import aux_loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--width", type=int, default=None, help="ResNet width (default: the zoo's)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--mode", choices=("infer", "train"), default="infer")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    ds = get_spec(a.dataset)
    kw = {} if a.width is None else {"width": a.width}
    spec = ModelSpec(a.model, ds.input_shape, ds.num_classes, ds.mean, ds.std, kw)
    torch.manual_seed(0)
    M = a.members
    variants = {
        "one network": build_method("deterministic", spec),
        f"loop of {M} networks": build_method("deep_ensemble", spec, {"members": M}),
    }
    for kind in ("batch_ensemble", "rank1", "lpbnn"):
        for schedule in ("fold", "members"):
            opts = {"members": M}
            if kind != "batch_ensemble":
                opts["samples"] = 1
            model = build_method(kind, spec, opts)
            model.net.schedule = schedule
            variants[f"{kind}, {schedule}"] = model
    train = a.mode == "train"
    for model in variants.values():
        model.to(a.device).train(train)
    opt = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, m in variants.items()}
    x = torch.rand(a.batch, *ds.input_shape, device=a.device)
    y = torch.randint(0, ds.num_classes, (a.batch,), device=a.device)

    def step(k):
        model = variants[k]
        if not train:
            with torch.no_grad():
                model.net(x, 1)
            return
        out = model.net(x, 1)
        loss = F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]))
        loss = loss + model.kl() / 50000 + aux_loss(model)
        opt[k].zero_grad()
        loss.backward()
        opt[k].step()

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    times = {k: [] for k in variants}
    for k in variants:
        for _ in range(3):
            step(k)
    for _ in range(a.repeats):
        for k in variants:
            sync()
            t0 = time.perf_counter()
            step(k)
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    loop = med[f"loop of {M} networks"]
    print(
        f"{a.model} {kw or ''} on {a.dataset}, {a.mode}, batch {a.batch}, M={M}, {a.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| variant | median ms | x one network | x loop |")
    print("|---|---|---|---|")
    for k in variants:
        print(
            f"| {k} | {med[k] * 1000:.2f} | {med[k] / med['one network']:.2f} | "
            f"{med[k] / loop:.2f} |"
        )


if __name__ == "__main__":
    main()
