"""Evaluate any Predictive-producing model: in-distribution, OOD, corruptions, rotation, cost.

Returns result rows ``{"split", "metric", "value"}`` plus the arrays figures need. Splits:

- ``test``: accuracy, nll, brier, ece
- ``ood:<set>``: auroc/aupr/fpr95 for each uncertainty score (``auroc_entropy`` ...)
- ``corrupt:<type>:<severity>``: accuracy, nll, ece; ``corrupt:mean`` averages them
- ``mnist_c:<name>``: accuracy, nll, ece under each MNIST-C corruption asked for (28x28 grey
  images only, the same first ``n_corrupt`` test images); ``mnist_c:mean`` averages them
- ``rotate:<angle>``: accuracy, nll, ece on the test set rotated by that angle
- ``cost``: parameters, latency_ms (median per batch), throughput (images/s), peak_mem_mb

A segmentation bundle (``bundle.dense``) is scored per pixel by :func:`evaluate_segmentation`:

- ``test``: miou, pixel_accuracy, nll, brier, ece over the non-void pixels; ``iou:<class>``
- ``anomaly``: auroc/aupr/fpr95 per score over pixels, the held-out classes' pixels positive
- ``corrupt:<type>:<severity>``: miou, nll, ece (the same label maps); ``corrupt:mean``;
  ``corrupt:clean:0``: the same ``n_corrupt`` images uncorrupted
- ``cost``: as above, plus latency_ms_per_image
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm

from . import metrics
from .data import CORRUPTIONS, DataBundle, corrupt, corrupt_mnist_c, rotate_by
from .data.bundle import to_float
from .data.corruptions import corruption_names
from .data.mnist_c import MNIST_C_SHAPE, mnist_c_names
from .errors import ConfigError
from .metrics.uncertainty import SCORES
from .options import Option, OptionTable, declared_by, parse_size
from .predictive import Predictive

EVAL_OPTIONS = OptionTable(
    "evaluation config",
    [
        Option("severities", "int_list", [1, 2, 3, 4, 5], "corruption severities", low=1,
               high=5),
        Option("n_corrupt", "int", 2000, "test images per corruption and severity", low=1),
        Option("mnist_c", "str", "", "MNIST-C corruptions to score on the first n_corrupt test "
               "images of a 28x28 grey data set: comma-separated names (any case) or 'all' (a "
               "config may also give a list); '' or 'none' for none"),
        Option("angles", "int_list", list(range(0, 181, 15)), "rotation angles in degrees "
               "([]: none)", empty=True),
        Option("n_rotate", "int", 2000, "test images per rotation angle", low=1),
        Option("latency_batch", "int", 128, "images per timed forward pass (segmentation: at "
               "most 4 full-size images)", low=1),
        Option("latency_repeats", "int", 20, "timed passes (the median is reported)", low=1),
        Option("batch_size", "int", 256, "rows per forward pass at evaluation (inputs x "
               "members x samples); larger on a GPU", low=1),
        Option("seed", "int", 0, "seed of the corruptions' random draws and of the stochastic "
               "passes (MC dropout masks, sampled factors) of the evaluation", low=0),
        Option("memory_budget", "size", "512MB", "segmentation: bound on one chunk's "
               "per-member probability maps (chunks of images, then members one at a time)"),
        Option("map_images", "int", 4, "segmentation: fixed test images kept for the "
               "uncertainty-map figures", low=0),
        Option("progress", "bool", True, "progress bars"),
    ],
)  # fmt: skip


@dataclass
@declared_by(EVAL_OPTIONS)
class EvalConfig:
    """What an evaluation measures: one field per option of :data:`EVAL_OPTIONS`, plus the
    corruptions: a list of names of :data:`~bnnkit.data.CORRUPTIONS` or a comma-separated
    string, ``'all'``, or ``''`` / ``'none'`` / ``[]`` for none (:meth:`validate` turns it into
    the list of registry names)."""

    corruptions: list[str] = field(default_factory=lambda: list(CORRUPTIONS))

    def validate(self) -> EvalConfig:
        # mnist_c may also be a list of names: checked by name below, not as the flag's text
        EVAL_OPTIONS.resolve(
            {o.name: getattr(self, o.name) for o in EVAL_OPTIONS if o.name != "mnist_c"}
        )
        self.corruptions = corruption_names(self.corruptions)
        self.mnist_c_names()
        return self

    def mnist_c_names(self) -> list[str]:
        """The MNIST-C corruptions to score, in the order given (``'all'``: the 15)."""
        return mnist_c_names(self.mnist_c)


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
    if getattr(bundle, "dense", False):
        return evaluate_segmentation(model, bundle, cfg)
    with seeded(cfg.seed):
        return _evaluate_classification(model, bundle, cfg)


@contextlib.contextmanager
def seeded(seed: int):
    """Torch's random streams seeded with ``seed`` inside, restored after: the stochastic
    passes of an evaluation (MC dropout masks, sampled factors) are the same on every call."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _evaluate_classification(model, bundle: DataBundle, cfg: EvalConfig):
    spec = getattr(model, "spec", None)
    n_classes = getattr(spec, "num_classes", None) or getattr(model, "num_classes", None)
    if n_classes is not None and n_classes != bundle.num_classes:
        raise ConfigError(
            f"model predicts {n_classes} classes but {bundle.name} has "
            f"{bundle.num_classes}; evaluate on the data set the model was trained for"
        )
    mnist_c = cfg.mnist_c_names()
    if mnist_c and tuple(bundle.input_shape) != MNIST_C_SHAPE:
        raise ConfigError(
            f"MNIST-C is defined on 28x28 grey images, but {bundle.name} has images of shape "
            f"{tuple(bundle.input_shape)} (C, H, W); leave mnist_c empty for this data set"
        )
    rows: list[tuple[str, str, float]] = []
    bs = cfg.batch_size
    xt, yt = bundle.test.float(), bundle.test.y
    steps = 1 + len(bundle.ood) + len(cfg.corruptions) * len(cfg.severities) + len(cfg.angles)
    steps += len(mnist_c)
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
    # (family, [(row split, cache key, corruption function, its arguments)]): each family's
    # rows and its ":mean" row over them
    families = [
        ("corrupt", [(f"corrupt:{c}:{sev}", ("corrupt", c, sev, cfg.seed, cfg.n_corrupt),
                      corrupt, (c, sev)) for c in cfg.corruptions for sev in cfg.severities]),
        ("mnist_c", [(f"mnist_c:{c}", ("mnist_c", c, cfg.seed, cfg.n_corrupt), corrupt_mnist_c,
                      (c,)) for c in mnist_c]),
    ]  # fmt: skip
    for family, sets in families:
        per_metric: dict[str, list[float]] = {"accuracy": [], "nll": [], "ece": []}
        for split_name, key, fn, args in sets:
            xc = _shifted(bundle, key, fn, xs, *args, seed=cfg.seed)
            for split, metric, value in classification_rows(
                model.predict(xc, bs), ys, split_name, full=False
            ):
                rows.append((split, metric, value))
                per_metric[metric].append(value)
            bar.update()
        if sets:
            for metric, values in per_metric.items():
                rows.append((f"{family}:mean", metric, sum(values) / len(values)))

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


#: full-size images per timed prediction of a segmentation model (at most; fewer when the
#: memory budget says so): a 128-image batch of 180x240 frames would take tens of seconds
SEG_LATENCY_IMAGES = 4

#: what `bnnkit evaluate` uses on a segmentation data set where the classification defaults
#: would not do (2,000 images per corruption is the whole CamVid test set 50 times over)
SEG_EVAL_DEFAULTS = {
    "n_corrupt": 24,
    "corruptions": ["gaussian_noise", "gaussian_blur", "contrast", "jpeg"],
}

#: corruptions that move pixels: the label maps would no longer match the images
GEOMETRIC_CORRUPTIONS = ("elastic", "rotate")


def _probe_chunk(model, x: torch.Tensor, budget: int) -> int:
    """Images per chunk so that one chunk's per-member maps ``[S, b, C, H, W]`` (float32, and
    about as much again for the softmax) stay within ``budget``."""
    S = getattr(model, "eval_samples", 1) * getattr(model, "members", 1)
    per_image = 8 * S * bundle_classes(model, x) * x.shape[-2] * x.shape[-1]
    return max(1, budget // max(per_image, 1))


def bundle_classes(model, x) -> int:
    spec = getattr(model, "spec", None)
    return int(getattr(spec, "num_classes", 0) or getattr(model, "num_classes", 0) or 1)


def _member_groups(model, xc: torch.Tensor, budget: int, bs: int):
    """Per-member probability groups of a chunk: the model's own bounded generator when it
    has one (every bnnkit UQModel), else its ``predict``."""
    if hasattr(model, "member_probs"):
        yield from model.member_probs(xc, budget)
    else:
        yield model.predict(xc, bs).probs


def segmentation_pass(model, x, y, cfg: EvalConfig, anomaly=None, keep=(), progress=None):
    """Stream ``x`` through ``model`` in chunks within ``cfg.memory_budget``; return the
    :class:`SegmentationMetrics`, the anomaly metrics per score (when ``anomaly`` is given)
    and the maps of the images whose indices are in ``keep``."""
    from .metrics import PixelAnomalyMetrics, SegmentationMetrics, uncertainty_maps

    budget = parse_size(cfg.memory_budget)
    n_classes = bundle_classes(model, x)
    seg = SegmentationMetrics(n_classes)
    anom: dict[str, PixelAnomalyMetrics] = {}
    kept: dict[int, dict] = {}
    step = _probe_chunk(model, x, budget)
    members = None
    for i in range(0, len(x), step):
        xc = to_float(x[i : i + step])
        groups = _member_groups(model, xc, budget, cfg.batch_size)
        maps = uncertainty_maps(m for g in groups for m in g.unbind(0))
        members = maps.num_members
        yc = y[i : i + step].long()
        seg.update(maps, yc)
        if anomaly is not None:
            names = [n for n in SCORES if not (n == "mutual_info" and members == 1)]
            for name in names:
                anom.setdefault(name, PixelAnomalyMetrics()).update(
                    maps.score(name), anomaly[i : i + step], yc
                )
        for j in range(len(xc)):
            if i + j in keep:
                kept[i + j] = {
                    "image": x[i + j],
                    "truth": y[i + j],
                    "prediction": maps.prediction()[j].to(torch.uint8),
                    "entropy": maps.entropy[j].half(),
                    "mutual_info": maps.mutual_information[j].half(),
                    "anomaly": None if anomaly is None else anomaly[i + j],
                }
        if progress is not None:
            progress()
    return seg, anom, kept, members


def evaluate_segmentation(model, bundle: DataBundle, cfg: EvalConfig | None = None):
    """Per-pixel evaluation of a segmentation model on ``bundle`` (module docstring); returns
    ``(rows, artefacts)``. ``artefacts``: ``iou`` per class, ``class_names``, and ``maps``
    (image, truth, prediction, entropy, mutual information and anomaly mask) of
    ``cfg.map_images`` fixed test images (the first ones with anomalous pixels)."""
    cfg = (cfg or EvalConfig()).validate()
    with seeded(cfg.seed):
        return _evaluate_segmentation(model, bundle, cfg)


def _evaluate_segmentation(model, bundle: DataBundle, cfg: EvalConfig):
    if cfg.mnist_c_names():
        raise ConfigError(
            f"MNIST-C is a classification evaluation of 28x28 grey images; {bundle.name} is a "
            "segmentation data set: leave mnist_c empty (no --mnist-c)"
        )
    moving = [c for c in cfg.corruptions if c in GEOMETRIC_CORRUPTIONS]
    if moving:
        raise ConfigError(
            f"corruption(s) {moving} move pixels, so the label maps would no longer match the "
            "images; leave them out for segmentation (e.g. --corruptions gaussian_noise,contrast)"
        )
    spec = getattr(model, "spec", None)
    n_classes = getattr(spec, "num_classes", None) or getattr(model, "num_classes", None)
    if n_classes is not None and n_classes != bundle.num_classes:
        raise ConfigError(
            f"model predicts {n_classes} classes but {bundle.name} has {bundle.num_classes} "
            "(after holding out the anomaly classes); evaluate on the data set and held-out "
            "classes the model was trained with"
        )
    if getattr(spec, "task", "segmentation") != "segmentation":
        raise ConfigError(
            f"{bundle.name} is a segmentation data set but the model is a {spec.task} model"
        )
    test = bundle.test
    anomaly = test.anomaly
    with_anomaly = anomaly is not None and bool(anomaly.any())
    if not with_anomaly:
        held = ", ".join(getattr(bundle, "anomaly_classes", ())) or "none held out"
        warnings.warn(
            f"no anomalous pixels in the {len(test)} test images of {bundle.name} (held-out "
            f"classes: {held}): the anomaly rows (AUROC / AUPR / FPR95) are left out",
            stacklevel=2,
        )
    has = anomaly.flatten(1).any(1) if with_anomaly else torch.zeros(len(test), dtype=bool)
    keep = [int(i) for i in torch.nonzero(has).flatten()[: cfg.map_images]]
    keep += [i for i in range(len(test)) if i not in keep][: cfg.map_images - len(keep)]
    sub = test.head(cfg.n_corrupt)
    steps = 1 + len(cfg.corruptions) * len(cfg.severities)
    bar = tqdm(total=steps, desc=f"evaluate {getattr(model, 'method', type(model).__name__)}",
               disable=not cfg.progress, leave=False)  # fmt: skip

    seg, anom, kept, members = segmentation_pass(
        model, test.x, test.y, cfg, anomaly if with_anomaly else None, set(keep)
    )
    res = seg.compute()
    rows = [("test", k, res[k]) for k in ("miou", "pixel_accuracy", "nll", "brier", "ece")]
    names = bundle.class_names or [str(c) for c in range(bundle.num_classes)]
    # a class absent from both truth and prediction has no IoU (NaN): no row
    rows += [("test", f"iou:{c}", v) for c, v in zip(names, res["iou"], strict=True) if v == v]
    for sname, m in anom.items():
        r = m.compute()
        rows += [("anomaly", f"{k}_{sname}", r[k]) for k in ("auroc", "aupr", "fpr95")]
    bar.update()

    per_metric: dict[str, list[float]] = {"miou": [], "nll": [], "ece": []}
    if cfg.corruptions:
        # the same images uncorrupted (severity 0): the corrupted rows are scored on the first
        # n_corrupt test images, whose clean mIoU differs from the whole test set's
        cres = segmentation_pass(model, sub.x, sub.y, cfg)[0].compute()
        rows += [("corrupt:clean:0", metric, cres[metric]) for metric in per_metric]
    for cname in cfg.corruptions:
        for sev in cfg.severities:
            key = ("corrupt", cname, sev, cfg.seed, cfg.n_corrupt)
            xc = _shifted(bundle, key, _corrupt_uint8, sub.x, cname, sev, cfg.seed)
            cres = segmentation_pass(model, xc, sub.y, cfg)[0].compute()
            for metric in per_metric:
                rows.append((f"corrupt:{cname}:{sev}", metric, cres[metric]))
                per_metric[metric].append(cres[metric])
            bar.update()
    if cfg.corruptions:
        for metric, values in per_metric.items():
            rows.append(("corrupt:mean", metric, sum(values) / len(values)))
    bar.close()

    budget = parse_size(cfg.memory_budget)
    n_time = max(1, min(cfg.latency_batch, SEG_LATENCY_IMAGES, _probe_chunk(model, test.x, budget),
                        len(test)))  # fmt: skip
    cost = measure_cost(model, to_float(test.x[:n_time]), cfg.latency_repeats)
    cost["latency_ms_per_image"] = cost["latency_ms"] / n_time
    cost["latency_images"] = float(n_time)
    rows += [("cost", k, v) for k, v in cost.items()]
    art = {
        "iou": res["iou"],
        "class_names": names,
        "maps": [kept[i] for i in keep if i in kept],
        "members": members,
    }
    return [{"split": s, "metric": m, "value": float(v)} for s, m, v in rows], art


def _corrupt_uint8(x: torch.Tensor, name: str, severity: int, seed: int) -> torch.Tensor:
    """A corrupted copy of uint8 images, kept as uint8 (chunked: CamVid at full size is large
    as float)."""
    out = torch.empty_like(x)
    for i in range(0, len(x), 32):
        xc = corrupt(to_float(x[i : i + 32]), name, severity, seed=seed + i)
        out[i : i + 32] = (xc * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out
