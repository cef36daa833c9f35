"""Evaluate any Predictive-producing model: in-distribution, OOD, corruptions, rotation, cost.

Returns result rows ``{"split", "metric", "value"}`` plus the arrays figures need. Splits:

- ``test``: accuracy, nll, brier, ece
- ``ood:<set>``: auroc/aupr/fpr95 for each uncertainty score (``auroc_entropy`` ...)
- ``corrupt:<type>:<severity>``: accuracy, nll, ece; ``corrupt:mean`` averages them
- ``rotate:<angle>``: accuracy, nll, ece on the test set rotated by that angle
- ``cost``: parameters, latency_ms (median per batch), throughput (images/s), peak_mem_mb
"""

from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from . import metrics
from .data import CORRUPTIONS, DataBundle, corrupt, rotate_by
from .errors import ConfigError
from .options import Option, OptionTable, declared_by
from .predictive import Predictive

EVAL_OPTIONS = OptionTable(
    "evaluation config",
    [
        Option("severities", "int_list", [1, 2, 3, 4, 5], "corruption severities", low=1,
               high=5),
        Option("n_corrupt", "int", 2000, "test images per corruption and severity", low=1),
        Option("angles", "int_list", list(range(0, 181, 15)), "rotation angles in degrees "
               "([]: none)", empty=True),
        Option("n_rotate", "int", 2000, "test images per rotation angle", low=1),
        Option("latency_batch", "int", 128, "images per timed forward pass", low=1),
        Option("latency_repeats", "int", 20, "timed passes (the median is reported)", low=1),
        Option("batch_size", "int", 256, "rows per forward pass at evaluation (inputs x "
               "members x samples); larger on a GPU", low=1),
        Option("seed", "int", 0, "seed of the corruptions' random draws", low=0),
        Option("progress", "bool", True, "progress bars"),
    ],
)  # fmt: skip


@dataclass
@declared_by(EVAL_OPTIONS)
class EvalConfig:
    """What an evaluation measures: one field per option of :data:`EVAL_OPTIONS`, plus the
    corruptions (names checked against the registry)."""

    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))

    def validate(self) -> EvalConfig:
        EVAL_OPTIONS.resolve({o.name: getattr(self, o.name) for o in EVAL_OPTIONS})
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        if bad:
            raise ConfigError(f"unknown corruption(s) {bad}; valid: {', '.join(CORRUPTIONS)}")
        return self


def classification_rows(pred: Predictive, labels: torch.Tensor, split: str, full: bool = True):
    rows = [
        (split, "accuracy", metrics.accuracy(pred, labels)),
        (split, "nll", metrics.nll(pred, labels)),
        (split, "ece", metrics.ece(pred, labels)),
    ]
    if full:
        rows.append((split, "brier", metrics.brier(pred, labels)))
    return rows


class _PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storage created during a region (any device).

    Only new storage counts: an op's output whose storage is one of its inputs' (a view, an
    in-place or ``out=`` op) or one already counted adds nothing. A storage is released when
    the last tensor seen on it is freed. Wrapper tensors without a storage of their own (dual
    or functorch tensors) are skipped; their data is counted where it is allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        try:
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if nbytes == 0:
            return
        if key in self._refs:
            self._refs[key][1] += 1
        elif key in inputs:
            return  # an alias of a tensor made before the region
        else:
            self._refs[key] = [nbytes, 1]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = set()
        for a in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                try:
                    inputs.add(a.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError):
                    pass
        out = func(*args, **kwargs)
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                self._track(o, inputs)
        return out


def _forward_fn(model, xb: torch.Tensor):
    """The timed call, the same for every method: ``predict(x)`` from images to the
    Predictive (all members and samples, a post-hoc posterior's predictive included)."""
    return lambda: model.predict(xb)


@torch.no_grad()
def measure_cost(model, x: torch.Tensor, repeats: int = 20) -> dict[str, float]:
    """Median latency of one batch's prediction (after warm-up), peak memory, parameters.

    ``model``: a :class:`UQModel` (its ``predict`` with all members and samples is timed)
    or any module with ``predict(x)``.
    """
    if isinstance(model, torch.nn.Module):
        model.eval()
    params = list(model.parameters()) if hasattr(model, "parameters") else []
    device = params[0].device if params else torch.device("cpu")
    xb = x.to(device)
    fwd = _forward_fn(model, xb)
    for _ in range(3):
        fwd()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _PeakMemory() as pm:
            fwd()
        peak = pm.peak
    med = statistics.median(times)
    return {
        "parameters": float(sum(p.numel() for p in params)),
        "latency_ms": med * 1000,
        "throughput": len(x) / med,
        "peak_mem_mb": peak / 2**20,
    }


def _shifted(bundle: DataBundle, key: tuple, make, *args, **kwargs) -> torch.Tensor:
    """A corrupted or rotated test set, made once per bundle: every method of a bench is scored
    on the same images without recomputing them (the corruptions run on the CPU and cost more
    than a GPU's predictions). Keyed by everything that determines the images."""
    hit = bundle.derived.get(key)
    if hit is None:
        hit = bundle.derived[key] = make(*args, **kwargs)
    return hit


def evaluate(model, bundle: DataBundle, cfg: EvalConfig | None = None):
    """Run every evaluation; return ``(rows, artefacts)``.

    ``model`` is anything with ``predict(x, batch_size) -> Predictive`` (every bnnkit method's
    :class:`UQModel`, or your own wrapper). ``artefacts`` holds test mean probabilities,
    labels and OOD scores for figures.
    """
    cfg = (cfg or EvalConfig()).validate()
    spec = getattr(model, "spec", None)
    n_classes = getattr(spec, "num_classes", None) or getattr(model, "num_classes", None)
    if n_classes is not None and n_classes != bundle.num_classes:
        raise ConfigError(
            f"model predicts {n_classes} classes but {bundle.name} has "
            f"{bundle.num_classes}; evaluate on the data set the model was trained for"
        )
    rows: list[tuple[str, str, float]] = []
    bs = cfg.batch_size
    xt, yt = bundle.test.float(), bundle.test.y
    steps = 1 + len(bundle.ood) + len(cfg.corruptions) * len(cfg.severities) + len(cfg.angles)
    bar = tqdm(
        total=steps,
        desc=f"evaluate {getattr(model, 'method', type(model).__name__)}",
        disable=not cfg.progress,
        leave=False,
    )

    pred = model.predict(xt, bs)
    rows += classification_rows(pred, yt, "test")
    art = {"test_probs": pred.mean(), "test_labels": yt}
    # the mutual information of a single-sample predictive is 0 everywhere: no score at all
    # (reported as "-"), rather than an AUROC of 50% that reads like a measurement
    scores = {
        name: fn
        for name, fn in metrics.SCORES.items()
        if not (name == "mutual_info" and pred.probs.shape[0] == 1)
    }
    scores_in = {name: fn(pred) for name, fn in scores.items()}
    for name, s in scores_in.items():
        art[f"score_in:{name}"] = s
    bar.update()

    for ood_name, split in bundle.ood.items():
        pred_out = model.predict(split.float(), bs)
        for sname, fn in scores.items():
            s_out = fn(pred_out)
            art[f"score_out:{ood_name}:{sname}"] = s_out
            s_in = scores_in[sname]
            rows += [
                (f"ood:{ood_name}", f"auroc_{sname}", metrics.auroc(s_in, s_out)),
                (f"ood:{ood_name}", f"aupr_{sname}", metrics.aupr(s_in, s_out)),
                (f"ood:{ood_name}", f"fpr95_{sname}", metrics.fpr_at_95_tpr(s_in, s_out)),
            ]
        bar.update()

    sub = bundle.test.head(cfg.n_corrupt)
    xs, ys = sub.float(), sub.y
    per_metric: dict[str, list[float]] = {"accuracy": [], "nll": [], "ece": []}
    for cname in cfg.corruptions:
        for sev in cfg.severities:
            key = ("corrupt", cname, sev, cfg.seed, cfg.n_corrupt)
            xc = _shifted(bundle, key, corrupt, xs, cname, sev, seed=cfg.seed)
            for split, metric, value in classification_rows(
                model.predict(xc, bs), ys, f"corrupt:{cname}:{sev}", full=False
            ):
                rows.append((split, metric, value))
                per_metric[metric].append(value)
            bar.update()
    if cfg.corruptions:
        for metric, values in per_metric.items():
            rows.append(("corrupt:mean", metric, sum(values) / len(values)))

    sub = bundle.test.head(cfg.n_rotate)
    xs, ys = sub.float(), sub.y
    for angle in cfg.angles:
        xr = _shifted(bundle, ("rotate", angle, cfg.n_rotate), rotate_by, xs, float(angle))
        rows += classification_rows(model.predict(xr, bs), ys, f"rotate:{angle}", full=False)
        bar.update()
    bar.close()

    cost = measure_cost(model, xt[: cfg.latency_batch], cfg.latency_repeats)
    rows += [("cost", k, v) for k, v in cost.items()]
    return [{"split": s, "metric": m, "value": float(v)} for s, m, v in rows], art
