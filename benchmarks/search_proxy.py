"""How well the placement search's cheap proxy ranks plans: Kendall's tau between the proxy's
objectives and those of longer training, on the same plans.

    python benchmarks/search_proxy.py [--plans 16] [--proxy EPOCHS:SUBSET ...]
        [--full 5:16000] [--full-seeds 2] [--out runs/search_proxy]

Plans are drawn from the default search space over LeNet-5 (seeded, distinct). Each is trained
with the ``placement`` method in each proxy setting (few epochs on a subset, what a ``bnnkit
search`` trial does) and in the reference setting (the bench's training) with two seeds, whose
agreement is the noise ceiling of any proxy; each run is scored on validation NLL and
search-time OOD AUROC (the search's objectives; no test data). Latency is not re-measured: it
does not depend on training. Runs are kept under ``--out`` and reused when run again.
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


def _setting(text: str) -> tuple[int, int]:
    epochs, subset = text.split(":")
    return int(epochs), int(subset)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plans", type=int, default=16)
    ap.add_argument(
        "--proxy",
        type=_setting,
        action="append",
        metavar="EPOCHS:SUBSET",
        help="a proxy setting (repeatable); default 1:4000, 2:8000, 3:8000, 2:16000",
    )
    ap.add_argument(
        "--full",
        type=_setting,
        default=(5, 16000),
        metavar="EPOCHS:SUBSET",
        help="the reference training (default 5:16000, the bench's)",
    )
    ap.add_argument(
        "--full-seeds",
        type=int,
        default=2,
        help="train the reference with this many seeds: the tau between two of them "
        "is the noise ceiling no proxy can beat",
    )
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/search_proxy")
    a = ap.parse_args()  # fmt: skip
    proxies = a.proxy or [(1, 4000), (2, 8000), (3, 8000), (2, 16000)]
    bundles = {}

    def bundle(subset):
        if subset not in bundles:  # same split seed: the same validation images throughout
            bundles[subset] = load_bundle(
                "fashion_mnist", val_size=a.val_size, subset=subset, split_seed=a.seed, ood=[]
            )
        return bundles[subset]

    ref = bundle(a.full[1])
    space = SearchSpace(build_model("lenet5", ref.input_shape, ref.num_classes))
    rng = random.Random(a.seed)
    plans, seen = [], set()
    while len(plans) < a.plans:
        p = space.sample(lambda n, c: rng.choice(c))
        if p.key() not in seen:
            seen.add(p.key())
            plans.append(p)
    val = (ref.val.float(), ref.val.y)
    ood = search_ood_images(ref.input_shape, 1000, seed=a.seed)
    settings = [(e, n, a.seed) for e, n in proxies]
    settings += [(*a.full, a.seed + k) for k in range(a.full_seeds)]
    results = []
    for plan in plans:
        row = {"plan": plan.key()}
        for epochs, subset, seed in settings:
            tag = f"e{epochs}-n{subset}-seed{seed}"
            cfg = RunConfig(
                method="placement", method_options={"plan": plan.to_dict()}, model="lenet5",
                seed=seed, data=DataConfig("fashion_mnist", a.val_size, subset, a.seed),
                train=TrainConfig(epochs=epochs, progress=False),
            )  # fmt: skip
            run = Path(a.out) / tag / plan_hash(plan)
            model = train_run(cfg, run, resume=True, bundle=bundle(subset))
            obj = evaluate_candidate(model, val, ood, repeats=1)
            row[f"{tag}_nll"], row[f"{tag}_auroc"] = obj.val_nll, obj.ood_auroc
        results.append(row)
        print(json.dumps(row), flush=True)
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))

    def tau(x, y, what):
        t = kendalltau([r[f"{x}_{what}"] for r in results], [r[f"{y}_{what}"] for r in results])
        return f"{t.statistic:+.2f} (p={t.pvalue:.3f})"

    full = f"e{a.full[0]}-n{a.full[1]}-seed{a.seed}"
    print(f"\n{len(results)} plans: Kendall tau against {full}")
    print("| setting | image-epochs | val NLL tau | search OOD AUROC tau |")
    print("|---|---|---|---|")
    for epochs, subset, seed in settings:
        tag = f"e{epochs}-n{subset}-seed{seed}"
        if tag != full:
            print(f"| {tag} | {epochs * subset} | {tau(tag, full, 'nll')} | "
                  f"{tau(tag, full, 'auroc')} |")  # fmt: skip


if __name__ == "__main__":
    main()
