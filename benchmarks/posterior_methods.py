"""How close each method's approximate posterior is to a reference of independently trained
networks, in weight space (before and after symmetry removal) and in function space, beside the
method's OOD AUROC (Laurent et al., ICLR 2024, Table 2 in spirit).

    python benchmarks/posterior_methods.py [--reference runs/posterior/ref_lenet]
        [--bench runs/bench] [--out runs/posterior/methods] [--probe 500]

Needs: the reference collection (``bnnkit posterior collect --model lenet5 --members 128
--epochs 5 --out runs/posterior/ref_lenet``, the bench's training) and the default bench's runs
(``make bench``). Every method's samples (all members of both seeds; draws per member where the
kind samples) become a collection; reference and methods are canonicalised (scaling, then
permutations); MMD^2 uses one Gaussian kernel whose bandwidth is the median inter-sample
distance of the reference (in each space), so rows compare; MMDAgg's test says whether a
method's samples are distinguishable from the reference's at 5%.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import kendalltau

from bnnkit.data import load_bundle
from bnnkit.posterior import Collection, canonical_collection, collect_samples
from bnnkit.posterior.mmd import mmd2, mmd_agg_test, pairwise
from bnnkit.posterior.tools import function_vectors
from bnnkit.report import ResultStore

#: method -> draws per member (1 where the members are fixed networks)
METHODS = {"deterministic": 1, "deep_ensemble": 1, "batch_ensemble": 1, "mc_dropout": 8,
           "mfvi": 8, "rank1": 2, "lpbnn": 2}  # fmt: skip


def _median_bandwidth(v: torch.Tensor) -> float:
    d = pairwise(v, 2).sqrt()
    return float(d[~torch.eye(len(d), dtype=torch.bool)].median())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default="runs/posterior/ref_lenet")
    ap.add_argument("--bench", default="runs/bench")
    ap.add_argument("--out", default="runs/posterior/methods")
    ap.add_argument("--probe", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=2)
    a = ap.parse_args()
    out = Path(a.out)
    ref = Collection.open(a.reference)
    t0 = time.perf_counter()
    ref_c = canonical_collection(a.reference, out / "reference-canonical")
    t_canon = time.perf_counter() - t0
    bundle = load_bundle("fashion_mnist", ood=[], test_size=a.probe)
    probe = bundle.test.float()
    space = {
        "weight": (ref.vectors(), None),
        "weight, canonical": (ref_c.vectors(), None),
        "function": (function_vectors(ref, probe), None),
    }
    bw = {k: _median_bandwidth(v) for k, (v, _) in space.items()}
    t0 = time.perf_counter()
    mmd_agg_test(space["weight"][0][: len(ref) // 2], space["weight"][0][len(ref) // 2 :],
                 b1=500, b2=500)  # fmt: skip
    t_mmd = time.perf_counter() - t0
    with ResultStore(Path(a.bench) / "results.sqlite") as store:
        rows = store.rows(dataset="fashion_mnist", model="lenet5")
    auroc = {}
    for r in rows:
        if r["split"].startswith("ood:") and r["metric"] == "auroc_entropy":
            auroc.setdefault(r["method"], []).append(r["value"])
    table = []
    for method, draws in METHODS.items():
        col_dir = out / method
        for seed in range(a.seeds):
            collect_samples(col_dir, Path(a.bench) / "runs" / f"{method}-seed{seed}", draws, seed)
        col = Collection.open(col_dir)
        can = canonical_collection(col_dir, out / f"{method}-canonical")
        vecs = {"weight": col.vectors(), "weight, canonical": can.vectors(),
                "function": function_vectors(col, probe)}  # fmt: skip
        row = {"method": method, "networks": len(col)}
        for name, v in vecs.items():
            refv = space[name][0]
            row[f"MMD2 {name}"] = mmd2(refv, v, "gaussian", bw[name]) if len(v) > 1 else None
            row[f"differs {name}"] = (
                mmd_agg_test(refv, v, b1=500, b2=500).reject if len(v) > 1 else None
            )
        row["OOD AUROC"] = sum(auroc.get(method, [float("nan")])) / max(
            1, len(auroc.get(method, []))
        )
        table.append(row)
        print(json.dumps(row), flush=True)
    (out / "table.json").write_text(json.dumps(table, indent=1))
    cols = ["MMD2 weight", "MMD2 weight, canonical", "MMD2 function"]
    print("\n| method | networks | " + " | ".join(cols) + " | differs (function) | OOD AUROC % |")
    print("|---" * (len(cols) + 4) + "|")
    for r in table:
        cells = [f"{r[c]:.4f}" if r[c] is not None else "–" for c in cols]
        print(f"| {r['method']} | {r['networks']} | " + " | ".join(cells)
              + f" | {r['differs function']} | {100 * r['OOD AUROC']:.1f} |")  # fmt: skip
    print(f"\ncanonicalising the reference ({len(ref)} networks, scaling + permutations): "
          f"{t_canon:.1f} s (0 if it was done by an earlier run); one MMDAgg test of "
          f"{len(ref) // 2} vs {len(ref) - len(ref) // 2} weight vectors (20 kernels, 1,000 "
          f"permutations): {t_mmd:.1f} s")  # fmt: skip
    ok = [r for r in table if r["MMD2 function"] is not None]
    t = kendalltau([r["MMD2 function"] for r in ok], [r["OOD AUROC"] for r in ok])
    print(f"\nKendall tau (function-space MMD^2 vs OOD AUROC), {len(ok)} methods: "
          f"{t.statistic:+.2f} (p={t.pvalue:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
