"""What the checks of placement-aware inference cost, and that the speed-up survives them.

    python benchmarks/placement_overhead.py [--batch 128] [--repeats 20]

For late-Bayesian plans of the library's own models, side by side in one run:

- ``first call``: the first eval-mode prediction, which traces the body, checks the split
  (allow-listed deterministic ops before the first stochastic layer, no in-place write across
  it, rows computed row by row on a doubled batch) and caches it;
- ``prefix once`` / ``naive``: the median of later predictions with the deterministic prefix
  run once per input, and with the input repeated at the entry (``prefix_once = False``);
- ``max |diff|``: the largest difference of the two outputs under the same seed (0 up to float
  rounding: the split is exact or not used).

Prints a Markdown table; CPU threads as torch sets them (``--threads`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnnkit import bayesify
from bnnkit.models import build_model


def _cases():
    yield ("LeNet-5, BatchEnsemble fc3, M=4", "lenet5", (1, 28, 28), {}, {"fc3": "batch_ensemble"},
           4, 1)  # fmt: skip
    yield ("LeNet-5, MC dropout fc2+fc3, 16 samples", "lenet5", (1, 28, 28), {},
           {"fc2": "mc_dropout", "fc3": "mc_dropout"}, 1, 16)  # fmt: skip
    yield ("ResNet-18 (width 16), rank-1 fc, M=4", "resnet18", (3, 32, 32), {"width": 16},
           {"fc": "rank1"}, 4, 1)  # fmt: skip
    yield ("ResNet-18 (width 16), BatchEnsemble layer4+fc, M=4", "resnet18", (3, 32, 32),
           {"width": 16}, {"layer4.*": "batch_ensemble", "fc": "batch_ensemble"}, 4, 1)  # fmt: skip


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for label, name, shape, opts, plan, members, samples in _cases():
        torch.manual_seed(0)
        net = bayesify(build_model(name, shape, 10, **opts), plan, members=members).eval()
        x = torch.rand(a.batch, *shape)
        t0 = time.perf_counter()
        net(x, samples)
        first = time.perf_counter() - t0
        net(x, samples)  # warm
        once = _time(lambda: net(x, samples), a.repeats)  # noqa: B023
        torch.manual_seed(1)
        fast = net(x, samples)
        net.prefix_once = False
        net(x, samples)
        naive = _time(lambda: net(x, samples), a.repeats)  # noqa: B023
        torch.manual_seed(1)
        slow = net(x, samples)
        diff = float((fast - slow).abs().max())
        rows.append((label, first * 1e3, once * 1e3, naive * 1e3, naive / once, diff))
    print(f"batch {a.batch}, {a.threads} threads, torch {torch.__version__}, "
          f"{torch.backends.cpu.get_cpu_capability()}\n")  # fmt: skip
    print("| plan | first call ms | prefix once ms | naive ms | naive / once | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, first, once, naive, ratio, diff in rows:
        print(f"| {label} | {first:.1f} | {once:.1f} | {naive:.1f} | {ratio:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
