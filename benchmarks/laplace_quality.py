"""Post-hoc Laplace variants on one trained deterministic network: fit / predict time, and
quality in-distribution, under rotation and corruption, and for OOD detection.

    python benchmarks/laplace_quality.py [--run runs/bench/runs/deterministic-seed0]
        [--n-fit 5000] [--n-test 2000] [--sizes 1000,5000]

Reads the model the default bench trained (``make bench`` first). Every variant is fitted on
the first ``n-fit`` training images of the bench's split, its prior precision tuned by marginal
likelihood (or validation grid search with ``--prior gridsearch``), and evaluated with the
probit predictive on the first ``n-test`` test images, on
them rotated by 60 and 120 degrees, on gaussian noise and gaussian blur at severity 3, and
against as many MNIST test images (OOD, entropy score).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bnnkit import metrics
from bnnkit.data import corrupt, load_bundle, rotate_by
from bnnkit.laplace import (
    DiagLaplace,
    LastLayerLaplace,
    SubnetLaplace,
    select_subnetwork,
)
from bnnkit.laplace.base import _scalar_marglik_optimum
from bnnkit.methods import UQModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/bench/runs/deterministic-seed0")
    ap.add_argument("--n-fit", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--sizes", default="1000,5000")
    ap.add_argument("--prior", choices=("marglik", "gridsearch"), default="marglik")
    ap.add_argument("--strategies", default="largest_variance,largest_variance_informed,"
                    "largest_variance_naive,"
                    "predictive_variance,random,magnitude")  # fmt: skip
    a = ap.parse_args()
    torch.manual_seed(0)
    run = Path(a.run)
    cfg = json.loads((run / "config.json").read_text())
    model = UQModel.load(run / "model.safetensors").eval()
    d = cfg["data"]
    b = load_bundle(d["dataset"], val_size=d["val_size"], subset=d["subset"],
                    split_seed=d.get("split_seed", 0), ood=["mnist"])  # fmt: skip
    train = (b.train.float()[: a.n_fit], b.train.y[: a.n_fit])
    xt, yt = b.test.float()[: a.n_test], b.test.y[: a.n_test]
    shifts = {
        "rot60": (rotate_by(xt, 60), yt),
        "rot120": (rotate_by(xt, 120), yt),
        "noise3": (corrupt(xt, "gaussian_noise", 3, seed=0), yt),
        "blur3": (corrupt(xt, "gaussian_blur", 3, seed=0), yt),
    }
    ood = b.ood["mnist"].float()[: a.n_test]

    rows = []

    def score(name, predict, fit_s, S):
        t0 = time.perf_counter()
        p = predict(xt)
        pred_s = time.perf_counter() - t0
        row = {"variant": name, "S": S, "fit_s": fit_s, "pred_ms_per_img": 1000 * pred_s / len(xt)}
        row["acc"] = float(metrics.accuracy(p, yt)) * 100
        row["nll"] = float(metrics.nll(p, yt))
        row["ece"] = float(metrics.ece(p, yt)) * 100
        for k, (xs, ys) in shifts.items():
            row[f"nll_{k}"] = float(metrics.nll(predict(xs), ys))
        row["auroc"] = float(metrics.auroc(p.entropy(), predict(ood).entropy())) * 100
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)  # fmt: skip

    score("MAP", lambda x: model.predict(x), 0.0, 0)

    def laplace(name, make, S):
        t0 = time.perf_counter()
        la = make().fit(train)
        if a.prior == "gridsearch":
            la.optimize_prior_precision("gridsearch", val=(b.val.float(), b.val.y))
        else:
            la.optimize_prior_precision("marglik")
        fit_s = time.perf_counter() - t0
        score(name, lambda x: la.predictive(x), fit_s, S)

    laplace("diag LA", lambda: DiagLaplace(model), sum(p.numel() for p in model.parameters()))
    laplace("last-layer LA", lambda: LastLayerLaplace(model), 850)
    t0 = time.perf_counter()
    diag = DiagLaplace(model).fit(train)
    h, q = diag.h, diag.jacobian_energy
    theta = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    prior = _scalar_marglik_optimum(h, float((theta**2).sum()), theta.numel())
    # the paper's rule reads the diagonal posterior with its prior tuned per layer
    diag.optimize_prior_precision("marglik", per_layer=True)
    per_layer = diag._prior_diag(diag.prior_precision)
    stats_s = time.perf_counter() - t0
    print(f"diagonal statistics: {stats_s:.1f} s, diag prior precision {prior:.3g}, informed "
          f"weights {(h > 0.01 * prior).sum().item()} of {h.numel()}", flush=True)  # fmt: skip
    for S in [int(s) for s in a.sizes.split(",")]:
        for strat in a.strategies.split(","):
            try:
                delta = per_layer if strat == "largest_variance" else prior
                idx = select_subnetwork(model, strat, S, train, prior_precision=delta,
                                        stats=(h, q))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{strat} S={S}: {e}")
                continue
            laplace(f"subnet {strat}", lambda idx=idx: SubnetLaplace(model, idx), S)

    print()
    cols = ["acc", "nll", "ece", "nll_rot60", "nll_rot120", "nll_noise3", "nll_blur3", "auroc"]
    print("| variant | S | fit s | predict ms/img | Acc % | NLL | ECE % | NLL rot 60 | NLL rot 120 "
          "| NLL noise 3 | NLL blur 3 | AUROC % |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vals = " | ".join(f"{r[c]:.2f}" if c in ("acc", "ece", "auroc") else f"{r[c]:.4f}"
                          for c in cols)  # fmt: skip
        head = f"| {r['variant']} | {r['S']} | {r['fit_s']:.1f} | {r['pred_ms_per_img']:.2f}"
        print(f"{head} | {vals} |")


if __name__ == "__main__":
    main()
