"""Search cost with 1 and with N workers sharing one study on PostgreSQL, on this machine.

    python benchmarks/search_workers.py [--trials 16] [--workers 2] [--out runs/search_workers]

Starts a throw-away PostgreSQL server (bnnkit.search.localdb), then runs the same search
(Fashion-MNIST, LeNet-5, the default proxy, no baselines) twice on fresh studies and output
directories: one worker with every core, then N worker processes started together with
cores/N threads each. Prints wall time, completed trials, trials per minute and the number of
candidates trained (a plan drawn twice is trained once in both).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna

from bnnkit.search.localdb import local_postgres


def _worker(out: Path, url: str, study: str, trials: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "bnnkit.cli", "search", "--out", str(out), "--storage", url,
           "--study", study, "--trials", str(trials), "--quiet", "--no-baselines"]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/search_workers")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with local_postgres() as url:
        for n in (1, a.workers):
            out = Path(a.out) / f"workers{n}"
            start = time.perf_counter()
            procs = [_worker(out, url, f"w{n}", a.trials, max(1, cores // n)) for _ in range(n)]
            codes = [p.wait() for p in procs]
            wall = time.perf_counter() - start
            study = optuna.load_study(study_name=f"w{n}", storage=url)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            row = {
                "workers": n,
                "threads_each": max(1, cores // n),
                "exit_codes": codes,
                "wall_s": round(wall, 1),
                "complete_trials": len(done),
                "trials_per_min": round(60 * len(done) / wall, 2),
                "candidates_trained": len(list((out / "candidates").iterdir())),
                "distinct_plans": len({t.user_attrs["plan"] for t in done}),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| workers | threads each | wall | complete trials | trials/min | trained |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['threads_each']} | {r['wall_s']:.0f} s | "
              f"{r['complete_trials']} | {r['trials_per_min']:.2f} | "
              f"{r['candidates_trained']} |")  # fmt: skip
    speedup = rows[0]["wall_s"] / rows[-1]["wall_s"]
    print(f"\nspeed-up of {a.workers} workers over 1: {speedup:.2f}x")


if __name__ == "__main__":
    main()
