"""Train method variants on the default-bench set-up and score test NLL/ECE and OOD AUROC.

    python benchmarks/sweep.py '{"method": "rank1", "init": "normal"}' \\
        '{"method": "lpbnn", "vae_weight": 0.1}' [--seed 0] [--out runs/sweep]

Each argument is a JSON object: ``method`` plus method options (``anneal`` sets the KL warm-up
epochs). Same data, subset, epochs and optimiser as `bnnkit bench`'s defaults; finished variants
in ``--out`` are reused. Used for the tuning tables in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json

from bnnkit import metrics
from bnnkit.bench import BenchConfig
from bnnkit.data import load_bundle
from bnnkit.train import DataConfig, RunConfig, TrainConfig, train_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/sweep")
    a = ap.parse_args()
    bc = BenchConfig()
    bundle = load_bundle(bc.dataset, val_size=bc.val_size, subset=bc.subset)
    xt, yt = bundle.test.float(), bundle.test.y
    xo = next(iter(bundle.ood.values())).float()
    print("| variant | Acc % | NLL | ECE % | AUROC % | AUROC-MI % |\n|---|---|---|---|---|---|")
    for text in a.variants:
        opts = json.loads(text)
        method, anneal = opts.pop("method"), opts.pop("anneal", 0)
        cfg = RunConfig(
            method=method,
            method_options=opts,
            model=bc.model,
            seed=a.seed,
            data=DataConfig(bc.dataset, bc.val_size, bc.subset),
            train=TrainConfig(
                epochs=bc.epochs, batch_size=bc.batch_size, lr=bc.lr, kl_anneal_epochs=anneal,
                progress=False,
            ),
        )  # fmt: skip
        tag = hashlib.sha1(f"{text}-{a.seed}".encode()).hexdigest()[:10]
        model = train_run(cfg, f"{a.out}/{method}-{tag}", bundle=bundle, resume=True)
        p, po = model.predict(xt), model.predict(xo)
        print(
            f"| {text} | {100 * metrics.accuracy(p, yt):.2f} | {metrics.nll(p, yt):.3f} | "
            f"{100 * metrics.ece(p, yt):.2f} | {100 * metrics.auroc(p.entropy(), po.entropy()):.2f}"
            f" | {100 * metrics.auroc(p.mutual_information(), po.mutual_information()):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
