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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .. import metrics
from ..errors import ConfigError
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
        return torch.cat([
            search_ood_set("synthetic", x_val, sizes[0], seed),
            search_ood_set("corrupted", x_val, sizes[1], seed),
            search_ood_set("scrambled", x_val, sizes[2], seed),
        ])  # fmt: skip
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
