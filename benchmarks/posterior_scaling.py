"""Time and peak memory of the posterior tools as a collection grows (64 -> 1,024 members).

    python benchmarks/posterior_scaling.py [--reference runs/posterior/ref_lenet]
        [--sizes 64,128,256,512,1024] [--out runs/posterior/scaling]

The collections are made from the reference (``bnnkit posterior collect``): member ``i`` is
reference member ``i mod R`` under a random permutation of every group and a random positive
rescaling of every unit (seeded by ``i``), i.e. the same function at another point of its
symmetry orbit. The tools' cost does not depend on which networks they see, only on their size
and number, so this measures what a collection of that many independently trained networks
would cost without training them. Each (size, step) runs in a fresh process so that its peak
resident memory (ru_maxrss) is its own:

- canonicalize: ``canonical_collection`` (scaling, then permutations), member by member;
- align: ``aligned_collection`` to the first member (balancing + weight matching);
- vectors: all members' weights as one [n, d] float64 matrix (sha256 checked per file);
- mmd2: one Gaussian-kernel MMD^2 between the collection and the reference;
- mmdagg: MMDAgg's test, first half vs second half (20 kernels, 2 x 2,000 permutations).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bnnkit.posterior import Collection
from bnnkit.posterior.collect import build_from
from bnnkit.posterior.mmd import mmd2, mmd_agg_test
from bnnkit.posterior.permutation import permutation_spec, permute, random_permutation
from bnnkit.posterior.scaling import random_scales, rescale, scaling_spec
from bnnkit.posterior.tools import aligned_collection, canonical_collection, example_input

STEPS = ("canonicalize", "align", "vectors", "mmd2", "mmdagg")


def make(reference: Path, root: Path, n: int) -> Path:
    dst = root / f"n{n:04d}"
    ref = Collection.open(reference)
    if dst.exists() and len(Collection.open(dst)) == n:
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    net = build_from(ref.arch).eval()
    x = example_input(ref.arch)
    pspec, sspec = permutation_spec(net, x), scaling_spec(net, x)
    col = Collection.create(dst, ref.arch)
    ids = [m.id for m in ref.members]
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        state = ref.load(ids[i % len(ids)])
        state = rescale(state, sspec, random_scales(sspec, g, spread=0.5))
        state = permute(state, pspec, random_permutation(pspec, g))
        col.add(f"s{i:04d}", {k: v.float() for k, v in state.items()}, "reference-orbit", i)
    return dst


def one(step: str, src: Path, reference: Path, work: Path) -> dict:
    t0 = time.perf_counter()
    if step == "canonicalize":
        shutil.rmtree(work, ignore_errors=True)
        canonical_collection(src, work)
    elif step == "align":
        shutil.rmtree(work, ignore_errors=True)
        aligned_collection(src, work)
    elif step == "vectors":
        Collection.open(src).vectors()
    elif step == "mmd2":
        a, b = Collection.open(src).vectors(), Collection.open(reference).vectors()
        t0 = time.perf_counter()
        mmd2(a, b, "gaussian", 30.0)
    elif step == "mmdagg":
        v = Collection.open(src).vectors()
        t0 = time.perf_counter()
        mmd_agg_test(v[: len(v) // 2], v[len(v) // 2 :])
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step": step, "seconds": seconds, "peak_mb": peak_mb}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default="runs/posterior/ref_lenet")
    ap.add_argument("--sizes", default="64,128,256,512,1024")
    ap.add_argument("--out", default="runs/posterior/scaling")
    ap.add_argument("--one", nargs=3, metavar=("STEP", "SRC", "WORK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    ref, out = Path(a.reference), Path(a.out)
    if a.one:
        print(json.dumps(one(a.one[0], Path(a.one[1]), ref, Path(a.one[2]))))
        return
    sizes = [int(s) for s in a.sizes.split(",")]
    d = sum(v.numel() for v in Collection.open(ref).load(Collection.open(ref).members[0].id)
            .values() if v.is_floating_point())  # fmt: skip
    print(f"reference {ref}: {len(Collection.open(ref))} networks, {d:,} numbers each; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    results = []
    for n in sizes:
        src = make(ref, out, n)
        row = {"n": n}
        for step in STEPS:
            r = subprocess.run([sys.executable, __file__, "--reference", str(ref), "--one", step,
                                str(src), str(out / "work")], capture_output=True, text=True,
                               check=True)  # fmt: skip
            res = json.loads(r.stdout.strip().splitlines()[-1])
            row[step] = (res["seconds"], res["peak_mb"])
        results.append(row)
        print(json.dumps(row), flush=True)
    shutil.rmtree(out / "work", ignore_errors=True)
    (out / "scaling.json").write_text(json.dumps(results, indent=1))
    print("\n| members | " + " | ".join(f"{s} s (peak MB)" for s in STEPS) + " |")
    print("|---" * (len(STEPS) + 1) + "|")
    for r in results:
        print(f"| {r['n']} | " + " | ".join(f"{r[s][0]:.1f} ({r[s][1]:.0f})" for s in STEPS)
              + " |")  # fmt: skip


if __name__ == "__main__":
    main()
