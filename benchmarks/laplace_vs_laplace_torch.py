"""Subnetwork Laplace side by side: bnnkit vs laplace-torch 0.3, same model, subnetwork, data.

    python benchmarks/laplace_vs_laplace_torch.py [--run runs/bench/runs/deterministic-seed0]
        [--sizes 1000,5000,20000] [--n-fit 512] [--n-test 256]

Needs laplace-torch in the same environment. It is not a bnnkit dependency (a plain install
pulls a CUDA torch and a torchvision that breaks beside torch 2.13.0); install it with
``pip install --no-deps laplace-torch==0.3 asdfghjkl==0.1a4 backpack-for-pytorch
curvlinops-for-pytorch`` and then ``pip install einops unfoldNd einconv linear_operator
opt-einsum torchmetrics tqdm torch==2.13.0``.

Every (library, subnetwork size) runs in its own subprocess so that its peak resident memory
is its own. Both libraries get the same trained LeNet, the same random subnetwork (the choice
does not change the cost) and the same images. Measured per run: GGN fit time per training
image and the peak resident memory above the process's baseline during the fit; scalar
marginal-likelihood tuning of the prior precision (laplace-torch: its default 100 Adam steps,
each refactorising; bnnkit: bisection on the GGN eigenvalues); probit predictive time per test
image (laplace-torch fed batches of 128). The subprocesses also write the GGN and the
predictive at prior precision 1, which the parent compares: both libraries must compute the
same posterior.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(run: str, n_fit: int, n_test: int):
    from bnnkit.data import load_bundle
    from bnnkit.methods import UQModel

    cfg = json.loads((Path(run) / "config.json").read_text())
    model = UQModel.load(Path(run) / "model.safetensors").eval()
    d = cfg["data"]
    b = load_bundle(d["dataset"], val_size=d["val_size"], subset=d["subset"], ood=[])
    x, y = b.train.float()[:n_fit], b.train.y[:n_fit]
    return model, (x, y), b.test.float()[:n_test]


def child(a) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # laplace-torch / BackPack chatter on every batch
    torch.manual_seed(0)
    model, (x, y), xt = _load(a.run, a.n_fit, a.n_test)
    from bnnkit.laplace import as_logits_model

    net = as_logits_model(model)  # a plain nn.Module returning logits [batch, classes]
    total = sum(p.numel() for p in net.parameters())
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(0))[: a.size].sort()[0]
    out = {"library": a.library, "S": a.size, "n_fit": len(x), "n_test": len(xt)}
    for dt in (torch.float32, torch.float64):  # torch.linalg's one-off start-up (~3 s) excluded
        torch.linalg.eigvalsh(torch.eye(4, dtype=dt))
        torch.linalg.cholesky(torch.eye(4, dtype=dt))
    base = _rss_mb()
    if a.library == "bnnkit":
        from bnnkit.laplace import SubnetLaplace

        t0 = time.perf_counter()
        la = SubnetLaplace(net, idx, prior_precision=1.0).fit((x, y))
        out["fit_s"] = time.perf_counter() - t0
        out["fit_peak_mb"] = _peak_mb() - base
        ggn = la.ggn
        probs = la.predict(xt[:200]) if a.size <= 5000 else None  # for the agreement check
        if a.marglik:
            t0 = time.perf_counter()
            la.optimize_prior_precision("marglik")
            out["marglik_s"] = time.perf_counter() - t0
            out["prior"] = float(la.prior_precision.flatten()[0])
        t0 = time.perf_counter()
        la.predict(xt)
        out["predict_s"] = time.perf_counter() - t0
    else:
        from laplace import Laplace
        from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN
        from torch.utils.data import DataLoader, TensorDataset

        backend = {"curvlinops": CurvlinopsGGN, "backpack": BackPackGGN, "asdl": AsdlGGN}

        loader = DataLoader(TensorDataset(x, y), batch_size=128)
        t0 = time.perf_counter()
        la = Laplace(
            net,
            "classification",
            subset_of_weights="subnetwork",
            hessian_structure="full",
            subnetwork_indices=idx,
            backend=backend[a.library.split(":")[1]],
        )
        la.fit(loader)
        out["fit_s"] = time.perf_counter() - t0
        out["fit_peak_mb"] = _peak_mb() - base
        out["backend"] = type(la.backend).__name__
        ggn = la.H.double()
        probs = None
        if a.size <= 5000:
            probs = torch.cat(
                [la(xb, pred_type="glm", link_approx="probit") for xb in xt[:200].split(128)]
            )
        if a.marglik:
            t0 = time.perf_counter()
            la.optimize_prior_precision(method="marglik")
            out["marglik_s"] = time.perf_counter() - t0
            out["prior"] = float(la.prior_precision.flatten()[0])
        t0 = time.perf_counter()
        with torch.no_grad():
            for xb in xt.split(128):
                la(xb, pred_type="glm", link_approx="probit")
        out["predict_s"] = time.perf_counter() - t0
    out["peak_mb"] = _peak_mb() - base
    if a.size <= 5000:
        torch.save({"ggn": ggn.double(), "probs": probs.double()}, Path(a.dump) / "arrays.pt")
    Path(a.dump, "result.json").write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/bench/runs/deterministic-seed0")
    ap.add_argument("--sizes", default="1000,5000,20000")
    ap.add_argument("--n-fit", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=256)
    ap.add_argument("--big", type=int, default=5000, help="sizes above: fewer images")
    ap.add_argument("--libraries", default="bnnkit,laplace-torch:curvlinops,"
                    "laplace-torch:backpack,laplace-torch:asdl")  # fmt: skip
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--library", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    ap.add_argument("--marglik", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    rows, agreement = [], []
    for S in [int(s) for s in a.sizes.split(",")]:
        big = S > a.big
        n_fit, n_test = (a.n_fit // 4, a.n_test // 4) if big else (a.n_fit, a.n_test)
        arrays = {}
        for lib in a.libraries.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                # laplace-torch refactorises S x S at each of its 100 marglik steps: at 20k that
                # is hours on CPU; bnnkit's bisection needs one eigendecomposition
                # (its tuning loop is the same code for every backend: timed with BackPack)
                marglik = int(lib == "bnnkit" or (lib == "laplace-torch:backpack" and not big))
                cmd = [sys.executable, __file__, "--child", "--library", lib, "--size", str(S),
                       "--run", a.run, "--n-fit", str(n_fit), "--n-test", str(n_test),
                       "--dump", tmp, "--marglik", str(marglik)]  # fmt: skip
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
                if proc.returncode != 0:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    row = {"library": lib, "S": S, "error": " / ".join(tail)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    continue
                row = json.loads(Path(tmp, "result.json").read_text())
                row["wall_s"] = time.perf_counter() - t0
                if (Path(tmp) / "arrays.pt").is_file():
                    arrays[lib] = torch.load(Path(tmp) / "arrays.pt")
            print(json.dumps(row), flush=True)
            rows.append(row)
        for lib, arr in arrays.items():
            if lib == "bnnkit" or "bnnkit" not in arrays:
                continue
            g1, g2 = arrays["bnnkit"]["ggn"], arr["ggn"]
            p1, p2 = arrays["bnnkit"]["probs"], arr["probs"]
            agree = {"S": S, "vs": lib, "ggn_rel_diff": float((g1 - g2).norm() / g2.norm()),
                     "probs_max_abs_diff": float((p1 - p2).abs().max())}  # fmt: skip
            agreement.append(agree)
            print(json.dumps(agree), flush=True)
    print()
    for r in agreement:
        print(
            f"S={r['S']}: bnnkit vs {r['vs']}: GGN relative difference "
            f"{r['ggn_rel_diff']:.1e}, largest probability difference {r['probs_max_abs_diff']:.1e}"
        )
    print("| library | S | fit ms/img | fit peak MB | marglik s | predict ms/img | prior |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['library']} | {r['S']} | failed: {r['error'][:80]} | | | | |")
            continue
        ml = f"{r['marglik_s']:.2f}" if "marglik_s" in r else "not run"
        prior = f"{r['prior']:.3g}" if "prior" in r else ""
        print(f"| {r['library']} | {r['S']} | {1000 * r['fit_s'] / r['n_fit']:.2f} | "
              f"{r['fit_peak_mb']:.0f} | {ml} | {1000 * r['predict_s'] / r['n_test']:.2f} | "
              f"{prior} |")  # fmt: skip


if __name__ == "__main__":
    main()
