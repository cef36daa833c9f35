"""Which search-time OOD set makes a trustworthy search objective: for every family of
:func:`bnnkit.search.objectives.search_ood_set`, how stable a plan's OOD AUROC is across training
seeds, how well it predicts the plan's AUROC on the test OOD sets, and how well the proxy
training ranks it.

    python benchmarks/search_ood.py [--runs runs/search_proxy] [--n 1000]

Reads the models that ``benchmarks/search_proxy.py`` trained (run it first): every plan in
every proxy setting and in the reference setting with two seeds. The test OOD sets (MNIST and
grey CIFAR-10 for Fashion-MNIST) are used here to *evaluate* the search objective, as a reviewer
would; the search itself never sees them. Validation NLL is reported beside for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from scipy.stats import kendalltau

from bnnkit import metrics
from bnnkit.data import load_bundle
from bnnkit.methods import UQModel
from bnnkit.search.objectives import OOD_FAMILIES, search_ood_set


def _tau(a: list[float], b: list[float]) -> str:
    t = kendalltau(a, b)
    return f"{t.statistic:+.2f} (p={t.pvalue:.3f})"


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/search_proxy")
    ap.add_argument("--n", type=int, default=1000, help="images per search OOD family")
    ap.add_argument("--n-test", type=int, default=2000, help="images per test OOD set")
    ap.add_argument("--val-size", type=int, default=2000)
    ap.add_argument("--reference", default="e5-n16000", help="reference setting (two seeds)")
    a = ap.parse_args()
    root = Path(a.runs)
    bundle = load_bundle("fashion_mnist", val_size=a.val_size, subset=16000, split_seed=0,
                         test_size=a.n_test)  # fmt: skip
    x_val, y_val = bundle.val.float(), bundle.val.y
    sets = {f: search_ood_set(f, x_val, a.n, seed=0) for f in OOD_FAMILIES}
    sets.update({f"test:{k}": v.float() for k, v in bundle.ood.items()})
    score = metrics.SCORES["entropy"]
    settings = sorted(p.name for p in root.iterdir() if p.is_dir() and "-seed" in p.name)
    cache = root / "ood_scores.json"
    table = json.loads(cache.read_text()) if cache.is_file() else {}
    for tag in settings:
        for run in sorted((root / tag).iterdir()):
            key = f"{tag}/{run.name}"
            if key in table or not (run / "model.safetensors").is_file():
                continue
            model = UQModel.load(run / "model.safetensors").eval()
            pred = model.predict(x_val)
            s_in = score(pred)
            row = {"nll": float(metrics.nll(pred, y_val))}
            for name, x in sets.items():
                row[name] = float(metrics.auroc(s_in, score(model.predict(x))))
            table[key] = row
            cache.write_text(json.dumps(table, indent=1))
            print(key, json.dumps(row), flush=True)
    ref0, ref1 = f"{a.reference}-seed0", f"{a.reference}-seed1"
    plans = sorted(k.split("/")[1] for k in table if k.startswith(ref0 + "/"))
    plans = [p for p in plans if f"{ref1}/{p}" in table]

    def col(tag, what):
        return [table[f"{tag}/{p}"][what] for p in plans]

    def ref_mean(what):
        return [statistics.mean(v) for v in zip(col(ref0, what), col(ref1, what))]

    tests = [k for k in sets if k.startswith("test:")]
    print(f"\n{len(plans)} plans. Stability and validity of each search objective "
          f"(Kendall tau; reference {a.reference}, two seeds)\n")  # fmt: skip
    head = "| objective | seed 0 vs seed 1 | " + " | ".join(
        f"vs {t[5:]} AUROC (seed mean)" for t in tests
    )
    print(head + " |")
    print("|---" * (2 + len(tests)) + "|")
    for what in ["nll", *OOD_FAMILIES, *tests]:
        cells = [_tau(col(ref0, what), col(ref1, what))]
        cells += [_tau(ref_mean(what), ref_mean(t)) for t in tests]
        print(f"| {what} | " + " | ".join(cells) + " |")
    print("\nProxy settings: Kendall tau of the proxy (seed 0) against the reference's other "
          "seed (independent of the proxy's initialisation) and the seed mean\n")  # fmt: skip
    print("| setting | objective | vs seed 1 | vs seed mean |")
    print("|---|---|---|---|")
    for tag in settings:
        if tag.startswith(a.reference) or not all(f"{tag}/{p}" in table for p in plans):
            continue
        for what in ["nll", *OOD_FAMILIES]:
            print(f"| {tag} | {what} | {_tau(col(tag, what), col(ref1, what))} | "
                  f"{_tau(col(tag, what), ref_mean(what))} |")  # fmt: skip


if __name__ == "__main__":
    main()
