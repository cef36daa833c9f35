"""Folded ensembles against their anchors on CIFAR-10's ResNet-18, side by side in one run.

    python benchmarks/cifar_speed.py --device cuda --out runs/cifar_speed          # the GPU run
    python benchmarks/cifar_speed.py --device cpu --width 16 --batch 16 --repeats 5  # a rehearsal

Inference (eval mode, no grad, batch B): the network's logits for every member, timed
``net(x, 1)`` (softmax and host transfer excluded, as in the anchors) for
- one ResNet-18; a loop of M ResNet-18s (bnnkit's deep ensemble), eager and, on CUDA, replayed
  as one CUDA graph; the floor: one ResNet-18 on the M-times batch (what a folded ensemble
  computes, without its per-member factors);
- bnnkit's folded BatchEnsemble, rank-1 BNN and LP-BNN (M members, one sample each);
- torch-uncertainty's BatchEnsemble ResNet-18 (folded the same way), when it is installed.
Each eager, and compiled with ``torch.compile`` (``--compile`` mode; ``reduce-overhead`` uses CUDA
graphs) where ``--compile`` is not ``none``.

Training step (train mode, batch B, every member sees every example): forward, cross-entropy
(+ KL / 50,000 and LP-BNN's ELBO term), backward, SGD step; for the same variants. The achieved
TFLOP/s of each step is its FLOP count (``torch.utils.flop_counter``, forward + backward) over
its median time, next to the device's measured bf16 (CUDA) or float32 (CPU) matrix-product rate.

All variants run round-robin after warm-up (median of ``--repeats``), bf16 autocast and
channels-last on CUDA (``--dtype``/``--channels-last`` to change). Writes ``speed.json`` and
``speed.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bnnkit.data import get_spec
from bnnkit.methods import ModelSpec, build_method
from bnnkit.nn import aux_loss


def _torch_uncertainty_be(members: int, num_classes: int) -> nn.Module | None:
    """torch-uncertainty's BatchEnsemble ResNet-18 (CIFAR style), or None when not installed.
    Whether its forward repeats the batch M times itself differs between its versions and
    modes; :class:`_Repeat` probes that and repeats where the model does not."""
    try:
        from torch_uncertainty.models.classification import batched_resnet
    except ImportError:
        try:
            from torch_uncertainty.models.resnet import batched_resnet
        except ImportError:
            try:  # the oldest releases: one function per depth
                from torch_uncertainty.models.resnet import batched_resnet18
            except ImportError:
                return None
            return batched_resnet18(in_channels=3, num_classes=num_classes,
                                    num_estimators=members, style="cifar")  # fmt: skip
    try:
        return batched_resnet(
            arch=18, in_channels=3, num_classes=num_classes, num_estimators=members,
            style="cifar",
        )  # fmt: skip
    except TypeError:  # older signature
        return batched_resnet(
            in_channels=3, num_classes=num_classes, num_estimators=members, arch=18,
            style="cifar",
        )  # fmt: skip


class _Variant:
    def __init__(self, name, module, rows, kind):
        self.name, self.module, self.rows, self.kind = name, module, rows, kind
        self.fn = module  # replaced by the compiled or graphed callable


def _loss(v: _Variant, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = v.fn(x)
    out = out.reshape(-1, out.shape[-1])
    loss = F.cross_entropy(out.float(), y.repeat(out.shape[0] // y.shape[0]))
    extra = getattr(v.module, "extra_loss", None)
    return loss + extra() if extra is not None else loss


class _Net(nn.Module):
    """``x -> logits`` of a bnnkit UQModel's network (``[S, B, C]``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.net(x, 1)

    def extra_loss(self):
        return self.model.kl() / 50000 + aux_loss(self.model)


class _Repeat(nn.Module):
    """A folded model that may or may not repeat its input M times itself: probed once per
    mode (train / eval) on two images, then the batch is repeated here only where the model
    does not, so that every member sees every image exactly once either way."""

    def __init__(self, net, members):
        super().__init__()
        self.net, self.members = net, members
        self.repeats_itself: dict[bool, bool] = {}

    def _probe(self, x):
        with torch.no_grad():
            rows = self.net(x[:2]).shape[0]
        if rows not in (2, 2 * self.members):
            raise RuntimeError(f"unexpected output rows {rows} for 2 inputs")
        return rows == 2 * self.members

    def forward(self, x):
        mode = self.training
        if mode not in self.repeats_itself:
            self.repeats_itself[mode] = self._probe(x)
        if not self.repeats_itself[mode]:
            x = x.repeat(self.members, 1, 1, 1)
        return self.net(x)


def _peak_matmul(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphed(fn, x: torch.Tensor):
    """A CUDA graph of ``fn(x)`` for a fixed input buffer; returns ``replay(x)``."""
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = fn(static_x)

    def replay(xb):
        static_x.copy_(xb)
        g.replay()
        return static_out

    return replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--width", type=int, default=64, help="ResNet-18 width (64: the standard)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", default=None, help="torch.compile mode, or none "
                    "(default: reduce-overhead on CUDA, none on CPU)")  # fmt: skip
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--channels-last", choices=("on", "off"), default=None)
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--out", default="runs/cifar_speed")
    a = ap.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    compile_mode = a.compile or ("reduce-overhead" if cuda else "none")
    bf16 = (a.dtype or ("bf16" if cuda else "fp32")) == "bf16"
    channels_last = (a.channels_last or ("on" if cuda else "off")) == "on"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds = get_spec("cifar10")
    spec = ModelSpec("resnet18", ds.input_shape, ds.num_classes, ds.mean, ds.std,
                     {"width": a.width})  # fmt: skip
    M, B = a.members, a.batch
    torch.manual_seed(0)

    def bnnkit(kind, **opts):
        return _Net(build_method(kind, spec, opts))

    base = {
        "one network": (bnnkit("deterministic"), B),
        f"loop of {M} networks": (bnnkit("deep_ensemble", members=M), B),
        f"floor: one network on {M}x batch": (bnnkit("deterministic"), M * B),
        f"BatchEnsemble M={M}": (bnnkit("batch_ensemble", members=M), B),
        f"rank-1 M={M}": (bnnkit("rank1", members=M, samples=1), B),
        f"LP-BNN M={M}": (bnnkit("lpbnn", members=M, samples=1), B),
    }
    tu = _torch_uncertainty_be(M, ds.num_classes)
    if tu is not None:
        base[f"torch-uncertainty BatchEnsemble M={M}"] = (_Repeat(tu, M), B)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for module, _ in base.values():
        module.to(device, memory_format=fmt)
    x_all = {rows: torch.rand(rows, 3, 32, 32, device=device).contiguous(memory_format=fmt)
             for rows in {B, M * B}}  # fmt: skip
    y_all = {rows: torch.randint(0, 10, (rows,), device=device) for rows in x_all}
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16
           else contextlib.nullcontext())  # fmt: skip
    results = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor()
               or platform.machine(), "torch": torch.__version__, "batch": B, "members": M,
               "width": a.width, "bf16": bf16, "channels_last": channels_last,
               "compile": compile_mode, "torch_uncertainty": tu is not None}  # fmt: skip
    results["matmul_tflops"] = _peak_matmul(device, torch.bfloat16 if bf16 else torch.float32)
    for mode in a.modes.split(","):
        variants = []
        for name, (module, rows) in base.items():
            variants.append(_Variant(name, module, rows, "eager"))
            if compile_mode != "none":
                v = _Variant(f"{name}, compiled", module, rows, "compiled")
                v.fn = torch.compile(module, mode=compile_mode)
                variants.append(v)
            if cuda and mode == "infer" and name.startswith("loop"):
                variants.append(_Variant(f"{name}, one CUDA graph", module, rows, "graph"))
        times = _time(mode, variants, x_all, y_all, amp, device, a)
        flops = _flops(mode, variants, x_all, y_all, amp) if mode == "train" else {}
        results[mode] = {
            v.name: {"ms": times[v.name] * 1e3, "rows": v.rows,
                     "tflops": flops.get(v.name, 0) / times[v.name] / 1e12 if flops else None}
            for v in variants
        }  # fmt: skip
        for m, _ in base.values():
            m.zero_grad(set_to_none=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=1))
    md = _markdown(results, M)
    (out / "speed.md").write_text(md)
    print(md)


def _time(mode, variants, x_all, y_all, amp, device, a) -> dict[str, float]:
    train = mode == "train"
    opts = {}
    for v in variants:
        v.module.train(train)
        if train:
            opts[v.name] = torch.optim.SGD(v.module.parameters(), lr=1e-3, momentum=0.9)

    def step(v):
        x, y = x_all[v.rows], y_all[v.rows]
        if not train:
            with torch.no_grad(), amp:
                return v.fn(x)
        with amp:
            loss = _loss(v, x, y)
        loss.backward()
        opts[v.name].step()
        opts[v.name].zero_grad(set_to_none=True)

    for v in variants:
        if v.kind == "graph":
            with torch.no_grad(), amp:
                v.fn = _graphed(v.module, x_all[v.rows])
        for _ in range(a.warmup):
            step(v)
    samples = {v.name: [] for v in variants}
    for _ in range(a.repeats):
        for v in variants:
            _sync(device)
            t0 = time.perf_counter()
            step(v)
            _sync(device)
            samples[v.name].append(time.perf_counter() - t0)
    return {k: statistics.median(s) for k, s in samples.items()}


def _flops(mode, variants, x_all, y_all, amp) -> dict[str, float]:
    out = {}
    for v in variants:
        if v.kind != "eager":
            continue
        counter = FlopCounterMode(display=False)
        with counter, amp:
            loss = _loss(v, x_all[v.rows], y_all[v.rows])  # eager: v.fn is the module
            loss.backward()
        v.module.zero_grad(set_to_none=True)
        total = counter.get_total_flops()
        out[v.name] = total
        out[f"{v.name}, compiled"] = total
    return out


def _markdown(r: dict, M: int) -> str:
    lines = [
        f"{r['device']}, torch {r['torch']}, ResNet-18 (width {r['width']}) CIFAR-10, batch "
        f"{r['batch']}, M={M}, {'bf16 autocast' if r['bf16'] else 'float32'}, "
        f"{'channels-last' if r['channels_last'] else 'contiguous'}, compile: {r['compile']}; "
        f"measured matrix-product rate {r['matmul_tflops']:.1f} TFLOP/s.",
    ]
    for mode in ("infer", "train"):
        if mode not in r:
            continue
        res = r[mode]
        floor = min((v["ms"] for k, v in res.items() if k.startswith("floor")), default=None)
        loop = res.get(f"loop of {M} networks", {}).get("ms")
        tu = min((v["ms"] for k, v in res.items() if k.startswith("torch-uncertainty")),
                 default=None)  # fmt: skip
        head = "| variant | ms | x floor (best) | loop / this | torch-uncertainty / this |"
        if mode == "train":
            head += " TFLOP/s |"
        lines += ["", f"### {'Inference' if mode == 'infer' else 'Training step'}", "", head,
                  "|" + "---|" * (head.count("|") - 1)]  # fmt: skip
        for k, v in res.items():
            cells = [k, f"{v['ms']:.2f}",
                     f"{v['ms'] / floor:.2f}" if floor else "-",
                     f"{loop / v['ms']:.2f}" if loop else "-",
                     f"{tu / v['ms']:.2f}" if tu else "-"]  # fmt: skip
            if mode == "train":
                cells.append(f"{v['tflops']:.3g}" if v.get("tflops") else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
