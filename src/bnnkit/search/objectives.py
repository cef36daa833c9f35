"""What the placement search measures for one trained candidate: validation NLL, OOD AUROC on a
*search-time* OOD set and counted FLOPs (the three objectives its sampler sees, all
deterministic), and inference latency (measured and reported beside them: wall-clock timing
noise must not steer which plans a seeded search proposes).

No test data ever steers the search: NLL is measured on the validation split, and the OOD
objective on a *search-time* OOD set built from synthetic images or validation images
(:func:`search_ood_set`): noise and blob images, validation images under severity-5
corruptions, validation images as shuffled jigsaws, or a mix of the three (the default: of the
four it agrees best with the test OOD sets, while noise images alone rank plans differently
from one training seed to the next; BENCHMARKS.md). Latency is the median time of ``predict``
on a fixed batch after warm-up, on the device the model is on; FLOPs are counted by
``torch.utils.flop_counter`` on the forward that prediction runs (placement-aware: a
deterministic prefix counts once, the stochastic tail once per member and sample).

Segmentation (:func:`evaluate_segmentation_candidate`, a data set with label maps): the pixel
NLL over the non-void validation pixels (mIoU recorded beside it), the pixel AUPR of the
predictive entropy on *synthetic* anomalies (:func:`synthetic_anomalies`) and the FLOPs per
image. The data's own anomalies (held-out classes) are void in training and validation and
only the test split marks them, so the search cannot score them without test data; instead
each validation image gets one rectangle of search-time OOD content pasted in (the families of
:func:`search_ood_set`, built from validation images), and the pasted pixels are the positives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import metrics
from ..data.bundle import to_float
from ..data.segmentation import IGNORE_INDEX
from ..errors import ConfigError, InputError
from ..evaluate import measure_cost


def search_ood_images(shape: tuple[int, int, int], n: int, seed: int = 0) -> torch.Tensor:
    """``n`` synthetic OOD images in [0, 1]: half uniform noise, half smooth blobs (random
    4x4 fields upsampled bilinearly), deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    noise = torch.rand(n - n // 2, c, h, w, generator=g)
    coarse = torch.rand(n // 2, c, 4, 4, generator=g)
    blobs = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return torch.cat([noise, blobs]).clamp_(0.0, 1.0)


#: severity-5 corruptions used for the ``corrupted`` search-OOD family (the bench's corruption
#: evaluation runs on test images, never on these validation images)
SEARCH_CORRUPTIONS = ("gaussian_noise", "impulse_noise", "defocus_blur", "contrast", "pixelate",
                      "elastic")  # fmt: skip


def scrambled_images(x: torch.Tensor, seed: int = 0, grid: int = 4) -> torch.Tensor:
    """In-distribution images with their semantics destroyed and their pixel statistics kept:
    each image cut into a ``grid`` x ``grid`` jigsaw whose tiles are shuffled (a fresh
    permutation per image); sides that do not divide keep their last rows/columns in place."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    th, tw = h // grid, w // grid
    core = x[:, :, : th * grid, : tw * grid]
    tiles = core.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, grid * grid, c, th, tw)
    perm = torch.stack([torch.randperm(grid * grid, generator=g) for _ in range(n)])
    tiles = tiles[torch.arange(n)[:, None], perm]
    tiles = tiles.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5)
    out = x.clone()
    out[:, :, : th * grid, : tw * grid] = tiles.reshape(n, c, th * grid, tw * grid)
    return out


def search_ood_set(family: str, x_val: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """The search-time OOD images of ``family``, built from synthetic images or from the
    validation images ``x_val`` (float, [0, 1]); never from test data.

    ``synthetic``: uniform noise and smooth blobs; ``corrupted``: validation images under the
    severity-5 corruptions of :data:`SEARCH_CORRUPTIONS`; ``scrambled``: validation images as
    shuffled 4x4 jigsaws; ``mixed``: a third of each."""
    from ..data import corrupt

    shape = tuple(x_val.shape[1:])
    g = torch.Generator().manual_seed(seed + 7919)
    pick = x_val[torch.randint(len(x_val), (n,), generator=g)]
    if family == "synthetic":
        return search_ood_images(shape, n, seed)
    if family == "corrupted":
        parts = torch.tensor_split(pick, len(SEARCH_CORRUPTIONS))
        return torch.cat(
            [corrupt(p, c, 5, seed) for p, c in zip(parts, SEARCH_CORRUPTIONS) if len(p)]
        ).clamp_(0.0, 1.0)
    if family == "scrambled":
        return scrambled_images(pick, seed)
    if family == "mixed":
        k = n // 3
        sizes = (n - 2 * k, k, k)
        parts = ("synthetic", "corrupted", "scrambled")
        return torch.cat(
            [search_ood_set(f, x_val, m, seed) for f, m in zip(parts, sizes) if m]
        )  # fmt: skip
    raise ConfigError(f"unknown search OOD family {family!r}; use one of {', '.join(OOD_FAMILIES)}")


OOD_FAMILIES = ("synthetic", "corrupted", "scrambled", "mixed")


def forward_flops(model, x: torch.Tensor) -> float:
    """FLOPs of one prediction forward for the batch ``x`` (all members and samples).

    Counted with gradients enabled: the counter's module tracker hooks the autograd graph and
    fails on some layers (LP-BNN's VAE) under ``no_grad``; nothing is kept. One uncounted call
    first: a folded network checks and caches its prefix split on its first call (the check
    runs part of the network on extra rows), which prediction pays once, not per batch."""
    model.eval()
    with torch.no_grad():
        model.net(x, model.eval_samples)
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        model.net(x, model.eval_samples)
    return float(counter.get_total_flops())


@dataclass
class Objectives:
    val_nll: float
    ood_auroc: float
    latency_ms: float
    flops_per_image: float
    parameters: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate_candidate(
    model,
    val: tuple[torch.Tensor, torch.Tensor],
    ood: torch.Tensor,
    latency_batch: int = 128,
    repeats: int = 10,
    seed: int = 0,
) -> Objectives:
    """The search objectives of a trained :class:`~bnnkit.methods.UQModel`. Stochastic
    predictions draw from a generator seeded with ``seed`` (the caller's RNG is left as it was),
    so a candidate's objectives are reproducible."""
    with torch.random.fork_rng():  # CPU and every initialised CUDA device
        torch.manual_seed(seed)
        return _objectives(model, val, ood, latency_batch, repeats)


def _objectives(model, val, ood, latency_batch: int, repeats: int) -> Objectives:
    x_val, y_val = val
    pred = model.predict(x_val)
    pred_ood = model.predict(ood)
    score = metrics.SCORES["entropy"]
    auroc = metrics.auroc(score(pred), score(pred_ood))
    xb = x_val[:latency_batch]
    if len(xb) < latency_batch:  # a fixed batch size, whatever the validation size
        xb = xb.repeat((latency_batch + len(xb) - 1) // len(xb), 1, 1, 1)[:latency_batch]
    cost = measure_cost(model, xb, repeats=repeats)
    with torch.enable_grad():
        flops = forward_flops(model, xb[:1])
    return Objectives(
        float(metrics.nll(pred, y_val)), float(auroc), cost["latency_ms"], flops,
        cost["parameters"],
    )  # fmt: skip


# ---------------------------------------------------------------------------- segmentation

#: the objectives of a segmentation search, in the order its sampler sees them (directions:
#: minimise, maximise, minimise, as for classification)
SEG_OBJECTIVES = ("val_nll", "anomaly_aupr", "flops_per_image")


def synthetic_anomalies(
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    family: str = "mixed",
    n: int | None = None,
    seed: int = 0,
    side: tuple[float, float] = (1 / 8, 1 / 3),
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validation images with one synthetic anomaly each, and its mask: ``(x, y, mask)``.

    The first ``n`` validation images (all by default; each at most once) each get one
    axis-aligned rectangle, of height and width drawn uniformly between ``side`` fractions of
    the image's, at a uniform position, whose pixels are replaced by the same rectangle of a
    search-time OOD image of ``family`` (:func:`search_ood_set`: uniform noise or smooth blobs,
    a severity-5 corrupted validation image, a validation image as a shuffled 4x4 jigsaw, or a
    mix). ``mask`` (bool ``[n, H, W]``) marks the pasted pixels; ``y`` is ``y_val`` with them
    set to ``ignore_index``, so they are not scored as their former class. Everything is drawn
    from generators seeded by ``seed``: the same arguments give the same images and masks.
    ``x`` keeps the dtype of ``x_val`` (uint8 images are rounded back to uint8).

    What it measures, honestly: how much more uncertain the network is on pasted patches of
    unfamiliar texture (noise, blur, contrast, pixelation) or of displaced scene content (a
    jigsaw tile of another street scene is unusual in context, but its texture is familiar),
    which is a proxy for a held-out object class, not the same thing: the edges of a pasted
    rectangle are sharper than an object's, and a real anomaly looks like an object. It uses
    validation images only; the test split's anomaly mask is never read."""
    if not isinstance(x_val, torch.Tensor) or x_val.dim() != 4:
        raise InputError(f"x_val must be images [N, C, H, W], got {getattr(x_val, 'shape', x_val)}")
    if not isinstance(y_val, torch.Tensor) or tuple(y_val.shape) != (len(x_val), *x_val.shape[-2:]):
        got = tuple(y_val.shape) if isinstance(y_val, torch.Tensor) else type(y_val).__name__
        raise InputError(
            f"y_val must be label maps [N, H, W] = {[len(x_val), *x_val.shape[-2:]]} for the "
            f"images, got {got}"
        )
    lo, hi = side
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"side must be fractions 0 < low <= high <= 1, got {side}")
    n = len(x_val) if n is None else min(int(n), len(x_val))
    if n < 1:
        raise InputError("synthetic anomalies need at least one validation image")
    xf = to_float(x_val)
    src = search_ood_set(family, xf, n, seed)
    h, w = xf.shape[-2:]
    g = torch.Generator().manual_seed(seed + 104729)
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        rh = int(torch.randint(max(1, round(lo * h)), max(1, round(hi * h)) + 1, (), generator=g))
        rw = int(torch.randint(max(1, round(lo * w)), max(1, round(hi * w)) + 1, (), generator=g))
        top = int(torch.randint(0, h - rh + 1, (), generator=g))
        left = int(torch.randint(0, w - rw + 1, (), generator=g))
        mask[i, top : top + rh, left : left + rw] = True
    x = torch.where(mask[:, None], src, xf[:n])
    if x_val.dtype == torch.uint8:
        x = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    y = y_val[:n].clone()
    y[mask] = ignore_index
    return x, y, mask


@dataclass
class SegObjectives:
    """The objectives of a segmentation candidate (module docstring): pixel NLL and mIoU on
    the validation images, AUPR and AUROC of the predictive entropy on the synthetic anomalies,
    predict latency (ms per timed batch of ``latency_images`` images, and per image), FLOPs per
    image and parameters."""

    val_nll: float
    val_miou: float
    anomaly_aupr: float
    anomaly_auroc: float
    latency_ms: float
    latency_ms_per_image: float
    latency_images: float
    flops_per_image: float
    parameters: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def evaluate_segmentation_candidate(
    model,
    val: tuple[torch.Tensor, torch.Tensor],
    anomalies: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    latency_batch: int = 128,
    repeats: int = 10,
    seed: int = 0,
    memory_budget: str | int = "512MB",
) -> SegObjectives:
    """The search objectives of a trained segmentation :class:`~bnnkit.methods.UQModel`.

    ``val``: validation images ``[N, C, H, W]`` (uint8 or float in [0, 1]) and label maps
    ``[N, H, W]`` (``255``: void); ``anomalies``: ``(x, y, mask)`` of
    :func:`synthetic_anomalies`. Both are streamed by
    :func:`bnnkit.evaluate.segmentation_pass` in chunks within ``memory_budget``. NLL and mIoU
    are over the non-void validation pixels; the anomaly AUPR / AUROC score the predictive
    entropy with the pasted pixels positive and the other non-void pixels negative
    (:class:`bnnkit.metrics.PixelAnomalyMetrics`). The timed batch is ``latency_batch`` images
    or fewer, as many as fit the memory budget (as the bench times a segmentation model).
    Stochastic predictions draw from a generator seeded with ``seed`` (the caller's RNG is left
    as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _seg_objectives(model, val, anomalies, latency_batch, repeats, memory_budget)


def _seg_objectives(model, val, anomalies, latency_batch, repeats, memory_budget):
    from ..evaluate import EvalConfig, _probe_chunk, segmentation_pass
    from ..options import parse_size

    cfg = EvalConfig(memory_budget=memory_budget, progress=False)
    x_val, y_val = val
    seg = segmentation_pass(model, x_val, y_val, cfg)[0].compute()
    xa, ya, mask = anomalies
    anom = segmentation_pass(model, xa, ya, cfg, anomaly=mask)[1]["entropy"].compute()
    n_time = max(1, min(latency_batch, _probe_chunk(model, x_val, parse_size(memory_budget)),
                        len(x_val)))  # fmt: skip
    xb = to_float(x_val[:n_time])
    cost = measure_cost(model, xb, repeats=repeats)
    with torch.enable_grad():
        flops = forward_flops(model, xb[:1])
    return SegObjectives(
        float(seg["nll"]), float(seg["miou"]), float(anom["aupr"]), float(anom["auroc"]),
        cost["latency_ms"], cost["latency_ms"] / n_time, float(n_time), flops,
        cost["parameters"],
    )  # fmt: skip
