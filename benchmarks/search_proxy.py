"""How well the placement search's cheap proxy ranks plans: Kendall's tau between the proxy's
objectives and those of longer training, on the same plans.

    python benchmarks/search_proxy.py [--plans 12] [--proxy-epochs 1] [--proxy-subset 4000]
        [--full-epochs 5] [--full-subset 16000] [--out runs/search_proxy]

Plans are drawn from the default search space over LeNet-5 (seeded, distinct). Each is trained
twice with the ``placement`` method, as a proxy (few epochs on a subset, what ``bnnkit search``
does per trial) and fully, and scored on validation NLL and search-time OOD AUROC (the search's
objectives; no test data). Latency is not re-measured: it does not depend on training. Runs
are kept under ``--out`` and reused when the script is run again.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from scipy.stats import kendalltau

from bnnkit.data import load_bundle
from bnnkit.models import build_model
from bnnkit.search import SearchSpace
from bnnkit.search.objectives import evaluate_candidate, search_ood_images
from bnnkit.search.study import plan_hash
from bnnkit.train import DataConfig, RunConfig, TrainConfig, train_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", type=int, default=12)
    ap.add_argument("--proxy-epochs", type=int, default=1)
    ap.add_argument("--proxy-subset", type=int, default=4000)
    ap.add_argument("--full-epochs", type=int, default=5)
    ap.add_argument("--full-subset", type=int, default=16000)
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/search_proxy")
    a = ap.parse_args()
    full = load_bundle("fashion_mnist", val_size=a.val_size, subset=a.full_subset, ood=[])
    proxy = load_bundle("fashion_mnist", val_size=a.val_size, subset=a.proxy_subset, ood=[])
    space = SearchSpace(build_model("lenet5", full.input_shape, full.num_classes))
    rng = random.Random(a.seed)
    plans, seen = [], set()
    while len(plans) < a.plans:
        p = space.sample(lambda n, c: rng.choice(c))
        if p.key() not in seen:
            seen.add(p.key())
            plans.append(p)
    val = (full.val.float(), full.val.y)  # the same validation split for both settings
    ood = search_ood_images(full.input_shape, 1000, seed=a.seed)
    results = []
    for plan in plans:
        row = {"plan": plan.key()}
        for tag, bundle, epochs, subset in (
            ("proxy", proxy, a.proxy_epochs, a.proxy_subset),
            ("full", full, a.full_epochs, a.full_subset),
        ):
            cfg = RunConfig(
                method="placement", method_options={"plan": plan.to_dict()}, model="lenet5",
                seed=a.seed, data=DataConfig("fashion_mnist", a.val_size, subset, a.seed),
                train=TrainConfig(epochs=epochs, progress=False),
            )  # fmt: skip
            run = Path(a.out) / tag / plan_hash(plan)
            model = train_run(cfg, run, resume=True, bundle=bundle)
            obj = evaluate_candidate(model, val, ood, repeats=3)
            row[f"{tag}_nll"], row[f"{tag}_auroc"] = obj.val_nll, obj.ood_auroc
        results.append(row)
        print(json.dumps(row), flush=True)
    tau_nll = kendalltau([r["proxy_nll"] for r in results], [r["full_nll"] for r in results])
    tau_auc = kendalltau([r["proxy_auroc"] for r in results], [r["full_auroc"] for r in results])
    print(f"\n{len(results)} plans: Kendall tau (proxy vs full) validation NLL "
          f"{tau_nll.statistic:.2f} (p = {tau_nll.pvalue:.3f}), search OOD AUROC "
          f"{tau_auc.statistic:.2f} (p = {tau_auc.pvalue:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
