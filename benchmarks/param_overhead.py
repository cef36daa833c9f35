"""Parameter overhead of the efficient-ensemble kinds over one network.

    python benchmarks/param_overhead.py

Counts parameters of ResNet-18 and WideResNet-28-10 (CIFAR-10 geometry) with every Linear/Conv2d
converted to each ensemble kind, for M = 4 and 10 members, relative to the plain network. No
timing: the counts are exact and machine-independent.
"""

from __future__ import annotations

from bnnkit import bayesify
from bnnkit.models import build_model
from bnnkit.nn import count_parameters


def main() -> None:
    print("| model | kind | members | parameters | overhead over one network |")
    print("|---|---|---|---|---|")
    for name, kw in [("resnet18", {}), ("wrn28", {"widen": 10})]:
        base = build_model(name, (3, 32, 32), 10, **kw)
        n0 = count_parameters(base)
        print(f"| {name} | (one network) | 1 | {n0:,} | - |")
        for kind in ["batch_ensemble", "rank1", "lpbnn"]:
            for members in (4, 10):
                net = bayesify(base, {"*": kind}, members=members)
                n = count_parameters(net)
                print(f"| {name} | {kind} | {members} | {n:,} | {100 * (n - n0) / n0:.2f}% |")
        print(f"| {name} | deep ensemble | 4 | {4 * n0:,} | 300.00% |")


if __name__ == "__main__":
    main()
