"""Does the channels-last memory layout pay on a CPU? A ResNet-18 (CIFAR stem) training step
and inference in the standard and the channels-last layout, side by side in one run.

    python benchmarks/channels_last_cpu.py [--width 16] [--batch 32] [--repeats 5]

Each (layout, pass) runs in its own subprocess under a time limit, because oneDNN's float32
channels-last convolution backward crashes (segmentation fault, double free) or never returns
on some AVX2-only CPUs with torch 2.13: such a cell is reported as ``crashed`` / ``hung``
instead of ending the benchmark. Training steps and inferences alternate between the layouts
(``--repeats`` rounds) and the median of each is reported, with the ratio channels-last /
standard (below 1: channels-last faster). Prints a Markdown table and the CPU's vector ISA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

_CHILD = r"""
import json, sys, time, torch
from bnnkit.models import build_model
layout, mode, width, batch, steps, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
torch.manual_seed(0)
net = build_model("resnet18", (3, 32, 32), 10, width=int(width))
x = torch.randn(int(batch), 3, 32, 32)
y = torch.randint(0, 10, (int(batch),))
if layout == "channels_last":
    net = net.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
opt = torch.optim.SGD(net.parameters(), lr=0.01)

def step():
    if mode == "train":
        net.train()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    else:
        net.eval()
        with torch.no_grad():
            net(x)

step()  # warm-up
t0 = time.perf_counter()
for _ in range(int(steps)):
    step()
print(json.dumps({"s": (time.perf_counter() - t0) / int(steps)}))
"""


def _cell(layout: str, mode: str, a) -> float | str:
    args = [sys.executable, "-c", _CHILD, layout, mode, str(a.width), str(a.batch),
            str(a.steps), str(a.threads)]  # fmt: skip
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=a.limit)
    except subprocess.TimeoutExpired:
        return "hung"
    if out.returncode != 0:
        return f"crashed (exit {out.returncode})"
    return json.loads(out.stdout.strip().splitlines()[-1])["s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per cell")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per cell")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--limit", type=float, default=120.0, help="seconds before a cell is 'hung'")
    a = ap.parse_args()
    layouts = ("standard", "channels_last")
    rows = []
    for mode in ("train", "infer"):
        times: dict[str, list] = {k: [] for k in layouts}
        for _ in range(a.repeats):
            for layout in layouts:
                times[layout].append(_cell(layout, mode, a))
        cells = {}
        for layout in layouts:
            ok = [t for t in times[layout] if isinstance(t, float)]
            bad = [t for t in times[layout] if not isinstance(t, float)]
            cells[layout] = statistics.median(ok) if ok and not bad else (bad or ["-"])[0]
        std, cl = cells["standard"], cells["channels_last"]
        ratio = f"{cl / std:.2f}" if isinstance(std, float) and isinstance(cl, float) else "-"
        fmt = [f"{c * 1e3:.1f} ms" if isinstance(c, float) else c for c in (std, cl)]
        rows.append((mode, *fmt, ratio))
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"ResNet-18 width {a.width}, batch {a.batch}, float32, {a.threads} threads, "
          f"torch {torch.__version__}, CPU capability {isa}\n")  # fmt: skip
    print("| pass | standard | channels-last | channels-last / standard |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
