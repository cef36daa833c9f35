"""How close each method's approximate posterior is to a reference of independently trained
networks, in weight space (before and after symmetry removal) and in function space, how many
modes it covers, beside its OOD AUROC (Laurent et al., ICLR 2024, Table 2 in spirit).

    python benchmarks/posterior_methods.py [--reference runs/posterior/ref_lenet]
        [--bench runs/posterior/bench_lenet] [--out runs/posterior/methods_lenet] [--seeds 4]

Needs the reference collection (``bnnkit posterior collect --model lenet5 --members 128
--epochs 5 --out runs/posterior/ref_lenet``: the bench's training recipe, 128 seeds) and bench
runs of every method with ``--seeds`` seeds (``bnnkit bench --seeds 4 --out ...``). For every
method two collections of equal size (16 networks where the method allows):

- ``one run``: samples of the seed-0 run only (a single-mode posterior for the methods that
  sample around one solution: MC dropout, MFVI, Laplace; the 4 members of the ensembles);
- ``4 runs``: the same number of samples spread over the runs of all seeds (multi-mode: one
  mode per run, as in the paper's multi-mode versions).

SWAG (not a bench method) starts from the ``deterministic`` runs. Then ``bnnkit posterior
report`` over all of them (MMD^2 with the reference's median bandwidth, MMDAgg verdicts, modes
among the first 8 networks, mutual information, accuracy / NLL / OOD AUROC of each collection's
averaged prediction), and the Kendall tau between each collection's MMD^2 and its OOD AUROC
(predictive entropy, mean over the OOD sets).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scipy.stats import kendalltau

from bnnkit.posterior import Collection, collect_samples, collect_swag
from bnnkit.report.posterior import PosteriorReportConfig, posterior_report

#: method -> members per run (1 for single networks)
METHODS = {"deterministic": 1, "deep_ensemble": 4, "batch_ensemble": 4, "mc_dropout": 1,
           "mfvi": 1, "rank1": 4, "lpbnn": 4, "laplace_last_layer": 1,
           "laplace_subnetwork": 1, "laplace_diag": 1, "swag": 1}  # fmt: skip
#: methods whose members are fixed networks (no draws)
FIXED = {"deterministic", "deep_ensemble", "batch_ensemble"}


def build(method: str, bench: Path, out: Path, seeds: int, target: int) -> dict[str, str]:
    """The method's collections: ``{label: path}``."""
    members = METHODS[method]
    source = "deterministic" if method == "swag" else method  # SWAG starts from the MAP runs
    runs = [bench / "runs" / f"{source}-seed{s}" for s in range(seeds)]
    cols = {}
    if method == "deterministic":
        plan = {"4 runs": (runs, 1)}
    elif method in FIXED:
        plan = {"one run": (runs[:1], 1), "4 runs": (runs, 1)}
    else:
        plan = {
            "one run": (runs[:1], max(1, target // members)),
            "4 runs": (runs, max(1, target // (members * seeds))),
        }
    for label, (rs, draws) in plan.items():
        d = out / "collections" / f"{method}-{label.replace(' ', '')}"
        for r in rs:
            seed = int(r.name.rsplit("seed", 1)[1])
            if method == "swag":
                collect_swag(d, r, draws, seed=seed)
            else:
                collect_samples(d, r, draws, seed=seed)
        cols[f"{method} ({label})"] = str(d)
    return cols


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default="runs/posterior/ref_lenet")
    ap.add_argument("--bench", default="runs/posterior/bench_lenet")
    ap.add_argument("--out", default="runs/posterior/methods_lenet")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--target", type=int, default=16, help="networks per collection")
    ap.add_argument("--modes-members", type=int, default=8)
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    out, bench = Path(a.out), Path(a.bench)
    t0 = time.perf_counter()
    cols: dict[str, str] = {}
    for method in a.methods.split(","):
        cols.update(build(method, bench, out, a.seeds, a.target))
    t_collect = time.perf_counter() - t0
    names = {label: label.replace(" ", "_").replace("(", "").replace(")", "") for label in cols}
    cfg = PosteriorReportConfig(reference=a.reference, collections={names[k]: v for k, v in
                                cols.items()}, out=str(out / "report"),
                                modes_members=a.modes_members)  # fmt: skip
    t0 = time.perf_counter()
    posterior_report(cfg)
    t_report = time.perf_counter() - t0
    res = json.loads((out / "report" / "report.json").read_text())

    ood_names = [k[len("auroc ") :] for k in res["rows"][0] if k.startswith("auroc ")]
    table = []
    for r in res["rows"]:
        if r["collection"] == "reference":
            continue
        r["ood auroc"] = sum(r[f"auroc {k}"] for k in ood_names) / len(ood_names)
        table.append(r)
    (out / "table.json").write_text(json.dumps(table, indent=1))
    spaces = ("weight", "weight, canonical", "function")

    def f(v, spec=".4f"):
        return "–" if v is None else ("yes" if v is True else "no" if v is False else
                                      format(v, spec))  # fmt: skip

    print("\n| collection | networks | " + " | ".join(f"MMD² {s}" for s in spaces)
          + " | differs (w / cw / f) | modes | MI in | MI mnist | acc % | NLL"
          + " | OOD AUROC % |")  # fmt: skip
    print("|---" * 12 + "|")
    for r in table:
        print(f"| {r['collection']} | {r['networks']} | "
              + " | ".join(f(r.get(f"mmd2 {s}")) for s in spaces) + " | "
              + " / ".join(f(r.get(f"differs {s}")) for s in spaces) + f" | "
              f"{r.get('modes', '–')} of {r.get('modes of', '–')} | {f(r.get('mi in'))} | "
              f"{f(r.get('mi mnist'))} | {100 * r['accuracy']:.2f} | {r['nll']:.4f} | "
              f"{100 * r['ood auroc']:.1f} |")  # fmt: skip
    ok = [r for r in table if r.get("mmd2 function") is not None]
    for space in spaces:
        t = kendalltau([r[f"mmd2 {space}"] for r in ok], [r["ood auroc"] for r in ok])
        print(f"Kendall tau (MMD^2 {space} vs OOD AUROC), {len(ok)} collections: "
              f"{t.statistic:+.2f} (p={t.pvalue:.3f})")  # fmt: skip
    print(f"\ncollections from the bench runs: {t_collect:.0f} s; report: {t_report:.0f} s")
    print(f"reference: {len(Collection.open(a.reference))} networks")


if __name__ == "__main__":
    main()
