"""Semantic segmentation metrics over pixels, streamed batch by batch (plain torch).

A segmentation predictive is the classification one with pixels as extra batch axes:
probabilities ``[B, C, H, W]`` (or per member ``[S, B, C, H, W]``, averaged over ``S``) and label
maps ``[B, H, W]`` in which ``ignore_index`` (default 255) marks pixels that are not scored.
Every metric is a sum over the valid pixels, so feeding a data set in any number of batches
gives the same numbers as one batch.

Conventions:
- the predicted class is the argmax of the mean probabilities (first index on ties);
- ``iou[c] = TP / (TP + FP + FN)`` from the confusion matrix of the valid pixels; ``miou`` is its
  mean over the classes whose union ``TP + FP + FN`` is not 0 (present in truth or prediction),
  as in the Cityscapes scripts and mmsegmentation; a class absent from both is NaN in ``iou``
  and left out of the mean, not counted as 0;
- ``pixel_accuracy``: correct valid pixels / valid pixels;
- ``nll``, ``brier``, ``ece``: :mod:`bnnkit.metrics.classification`'s definitions with every
  valid pixel an example (probabilities clamped at 1e-12 in the log; ECE with the same
  right-closed equal-width bins, computed by the same code);
- anomaly metrics (:class:`PixelAnomalyMetrics`): anomalous pixels are the positives, valid
  non-anomalous pixels the negatives, void pixels are left out; AUROC / AUPR / FPR95 are
  :mod:`bnnkit.metrics.ood`'s exact tie-aware implementations on the concatenated pixel scores
  (exact by default; ``sample_rate < 1`` keeps a seeded random subset of the pixels instead).

Per-pixel uncertainty maps (:func:`uncertainty_maps`) are accumulated member by member (sum of
``p`` and of ``sum_c p log p``), so ``[S, B, C, H, W]`` is never held in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..errors import InputError, unknown_name
from .classification import _binned
from .ood import aupr, auroc, fpr_at_95_tpr

#: the default label of pixels that are not scored (void; held-out anomaly classes)
IGNORE_INDEX = 255

_EPS = 1e-12
_ATOL = 1e-3


def _check_probs(probs, what: str = "probs") -> torch.Tensor:
    """Check one probability map ``[B, C, H, W]`` (float, finite, in [0, 1], sums to 1 over C)."""
    if not isinstance(probs, torch.Tensor):
        raise InputError(f"{what} must be a tensor, got {type(probs).__name__}")
    if probs.dim() != 4:
        raise InputError(
            f"{what} must have shape [B, C, H, W], got {tuple(probs.shape)}; per-member "
            "probabilities are [S, B, C, H, W]"
        )
    if not probs.dtype.is_floating_point:
        raise InputError(f"{what} must be floating-point probabilities, got dtype {probs.dtype}")
    probs = probs.detach()
    if probs.numel() == 0:
        raise InputError(f"{what} is empty {tuple(probs.shape)}; metrics need at least one pixel")
    if not torch.isfinite(probs).all():
        raise InputError(f"{what} contains NaN or inf; check the model's outputs")
    if (probs < -_ATOL).any() or (probs > 1 + _ATOL).any():
        raise InputError(f"{what} must lie in [0, 1]; did you pass logits? apply softmax first")
    sums = probs.sum(1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=_ATOL):
        worst = (sums - 1).abs().max().item()
        raise InputError(
            f"{what} must sum to 1 over the class axis (dim 1 of [B, C, H, W]); the worst pixel "
            f"is off by {worst:.3g}: apply softmax over the classes first"
        )
    return probs.clamp(0.0, 1.0)


def _mean_probs(probs) -> torch.Tensor:
    if isinstance(probs, PixelUncertainty):
        return probs.mean
    if isinstance(probs, torch.Tensor) and probs.dim() == 5:
        if probs.shape[0] == 0 or not probs.dtype.is_floating_point:
            raise InputError(
                f"per-member probs [S, B, C, H, W] must be floating-point with S >= 1, got "
                f"{probs.dtype} {tuple(probs.shape)}"
            )
        return _check_probs(probs.detach().mean(0))
    return _check_probs(probs)


def _check_label_map(labels, shape: tuple[int, ...], num_classes: int, ignore_index: int):
    """Label maps ``[B, H, W]`` matching ``shape``, in ``[0, C-1]`` or ``ignore_index``."""
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"labels must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(shape):
        raise InputError(
            f"labels must have shape [B, H, W] = {list(shape)} to match the probabilities, got "
            f"{list(labels.shape)}; each image needs its own label map at the output's size"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.detach().long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        found = torch.unique(labels[bad])[:5].tolist()
        raise InputError(
            f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes or equal "
            f"ignore_index={ignore_index}; found {found}: remap void / unknown labels to "
            "ignore_index"
        )
    return labels


class SegmentationMetrics:
    """Streaming mIoU, per-class IoU, pixel accuracy, pixel NLL, Brier and top-label ECE.

    ``update(probs, labels)`` with ``probs`` ``[B, C, H, W]``, ``[S, B, C, H, W]`` (members are
    averaged) or a :class:`PixelUncertainty`, and ``labels`` ``[B, H, W]``; ``compute()`` returns
    every metric (see the module's conventions). Sums are float64 / int64 on the CPU."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, n_bins: int = 15):
        if num_classes < 2:
            raise InputError(f"num_classes must be >= 2, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise InputError(
                f"ignore_index={ignore_index} is a class label for {num_classes} classes; use a "
                f"value outside [0, {num_classes - 1}] (e.g. 255)"
            )
        if n_bins < 1:
            raise InputError(f"n_bins must be >= 1, got {n_bins}")
        self.num_classes, self.ignore_index, self.n_bins = num_classes, ignore_index, n_bins
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)  # truth x pred
        self._nll = torch.zeros((), dtype=torch.float64)
        self._brier = torch.zeros((), dtype=torch.float64)
        self._conf_sum = torch.zeros(n_bins, dtype=torch.float64)
        self._acc_sum = torch.zeros(n_bins, dtype=torch.float64)

    def update(self, probs, labels: torch.Tensor) -> None:
        p = _mean_probs(probs)
        b, c, h, w = p.shape
        if c != self.num_classes:
            raise InputError(
                f"probs have {c} classes on the class axis (dim 1 of [B, C, H, W]) but the "
                f"metrics were built for num_classes={self.num_classes}; check the model's head"
            )
        y = _check_label_map(labels, (b, h, w), c, self.ignore_index).to(p.device)
        valid = y != self.ignore_index
        if not valid.any():
            return
        pv = p.permute(0, 2, 3, 1)[valid]  # [N, C], valid pixels only
        yv = y[valid]
        pred = pv.argmax(-1)
        self.confusion += torch.bincount(yv * c + pred, minlength=c * c).reshape(c, c).cpu()
        picked = pv.gather(1, yv.unsqueeze(1)).squeeze(1).double()
        self._nll += -torch.log(picked.clamp_min(_EPS)).sum().cpu()
        onehot = torch.nn.functional.one_hot(yv, c).double()
        self._brier += ((pv.double() - onehot) ** 2).sum().cpu()
        conf_sum, acc_sum, _ = _binned(pv.cpu(), yv.cpu(), self.n_bins)  # the ECE's own bins
        self._conf_sum += conf_sum
        self._acc_sum += acc_sum

    @property
    def pixels(self) -> int:
        """Valid (scored) pixels seen so far."""
        return int(self.confusion.sum())

    def _n(self) -> int:
        n = self.pixels
        if n == 0:
            raise InputError(
                "no valid pixels seen: every label was ignore_index (or update was never "
                "called); segmentation metrics need labelled pixels"
            )
        return n

    def iou(self) -> torch.Tensor:
        """Per-class IoU ``[C]`` (float64), NaN for a class absent from truth and prediction."""
        self._n()
        cm = self.confusion.double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        return self.iou().nanmean().item()

    def pixel_accuracy(self) -> float:
        return (self.confusion.diagonal().sum() / self._n()).item()

    def nll(self) -> float:
        return (self._nll / self._n()).item()

    def brier(self) -> float:
        return (self._brier / self._n()).item()

    def ece(self) -> float:
        return ((self._conf_sum - self._acc_sum).abs().sum() / self._n()).item()

    def compute(self) -> dict:
        """``miou``, ``pixel_accuracy``, ``nll``, ``brier``, ``ece``, ``iou`` (list, NaN for
        absent classes) and ``pixels`` (valid pixels scored)."""
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "nll": self.nll(),
            "brier": self.brier(),
            "ece": self.ece(),
            "iou": self.iou().tolist(),
            "pixels": self.pixels,
        }


class PixelAnomalyMetrics:
    """Streaming anomaly AUROC / AUPR (anomaly = positive) / FPR95 over pixels from any score
    map (higher = more anomalous).

    ``update(score, anomaly, labels=None)``: ``score`` float ``[B, H, W]``, ``anomaly`` bool
    ``[B, H, W]`` (the positives), ``labels`` ``[B, H, W]`` in-distribution label maps whose
    ``ignore_index`` pixels that are not anomalous are left out (void); without ``labels`` every
    non-anomalous pixel is a negative. The kept scores are stored (on the CPU, in their own
    dtype) and ``compute`` runs :mod:`bnnkit.metrics.ood`'s exact functions on them.
    ``sample_rate < 1`` keeps each pixel with that probability (a ``torch.Generator`` seeded
    with ``seed``; reproducible for the same batches in the same order) to bound the memory."""

    def __init__(self, ignore_index: int = IGNORE_INDEX, sample_rate: float = 1.0, seed: int = 0):
        if not 0.0 < sample_rate <= 1.0:
            raise InputError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        self.ignore_index, self.sample_rate = ignore_index, sample_rate
        self._gen = torch.Generator().manual_seed(seed)
        self._in: list[torch.Tensor] = []
        self._out: list[torch.Tensor] = []

    def update(self, score: torch.Tensor, anomaly: torch.Tensor, labels=None) -> None:
        if not isinstance(score, torch.Tensor) or not isinstance(anomaly, torch.Tensor):
            raise InputError("score and anomaly must be tensors [B, H, W]")
        if score.dim() != 3:
            raise InputError(f"score must be a map [B, H, W], got shape {tuple(score.shape)}")
        if tuple(anomaly.shape) != tuple(score.shape):
            raise InputError(
                f"anomaly mask {tuple(anomaly.shape)} and score {tuple(score.shape)} differ; "
                "both are [B, H, W] at the same resolution"
            )
        if anomaly.dtype != torch.bool:
            raise InputError(f"anomaly must be a bool mask, got dtype {anomaly.dtype}")
        if score.dtype == torch.bool or not torch.isfinite(score).all():
            raise InputError("score must be a finite real map (NaN or inf found, or a bool mask)")
        score, anomaly = score.detach().cpu(), anomaly.cpu()
        negative = ~anomaly
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(score.shape):
                got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
                raise InputError(f"labels must be [B, H, W] = {tuple(score.shape)}, got {got}")
            negative &= labels.cpu() != self.ignore_index
        if self.sample_rate < 1.0:
            keep = torch.rand(score.shape, generator=self._gen) < self.sample_rate
            anomaly, negative = anomaly & keep, negative & keep
        self._out.append(score[anomaly])
        self._in.append(score[negative])

    def compute(self) -> dict:
        """``auroc``, ``aupr``, ``fpr95`` and the pixel counts ``anomalous`` / ``normal``."""
        s_out = torch.cat(self._out) if self._out else torch.zeros(0)
        s_in = torch.cat(self._in) if self._in else torch.zeros(0)
        if len(s_out) == 0 or len(s_in) == 0:
            raise InputError(
                f"anomaly metrics need both anomalous and normal pixels; seen {len(s_out)} "
                f"anomalous and {len(s_in)} normal (are the held-out classes in these images?)"
            )
        return {
            "auroc": auroc(s_in, s_out),
            "aupr": aupr(s_in, s_out),
            "fpr95": fpr_at_95_tpr(s_in, s_out),
            "anomalous": len(s_out),
            "normal": len(s_in),
        }


@dataclass
class PixelUncertainty:
    """Per-pixel predictive maps from ``S`` members: ``mean`` ``[B, C, H, W]``, and ``[B, H, W]``
    maps ``entropy`` (of the mean: total), ``expected_entropy`` (mean of the members': aleatoric)
    and ``mutual_information`` (their difference clamped at 0: epistemic), as in
    :class:`bnnkit.predictive.Predictive`."""

    mean: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    num_members: int

    def confidence(self) -> torch.Tensor:
        return self.mean.max(1).values

    def prediction(self) -> torch.Tensor:
        return self.mean.argmax(1)

    def score(self, name: str) -> torch.Tensor:
        """Anomaly score map ``[B, H, W]`` (higher = more anomalous) by the names of
        :data:`bnnkit.metrics.SCORES`: ``max_prob`` (1 - confidence), ``entropy``,
        ``mutual_info``."""
        scores = {
            "max_prob": lambda: 1.0 - self.confidence(),
            "entropy": lambda: self.entropy,
            "mutual_info": lambda: self.mutual_information,
        }
        if name not in scores:
            raise unknown_name("uncertainty score", name, scores)
        return scores[name]()


def uncertainty_maps(members: Iterable[torch.Tensor] | torch.Tensor) -> PixelUncertainty:
    """Mean, entropy, expected entropy and mutual information maps from members' probabilities.

    ``members``: an iterable (e.g. a generator running one member at a time) of ``[B, C, H, W]``
    probability maps, or a tensor ``[S, B, C, H, W]`` (or ``[B, C, H, W]``: one member). Only
    the running sums of ``p`` ``[B, C, H, W]`` and of ``sum_c p log p`` ``[B, H, W]`` are kept
    (float32, or float64 for float64 input)."""
    if isinstance(members, torch.Tensor):
        members = [members] if members.dim() == 4 else members.unbind(0)
    sum_p = sum_plogp = None
    s = 0
    for m in members:
        p = _check_probs(m, f"member {s}")
        p = p.to(torch.promote_types(p.dtype, torch.float32))
        plogp = (p * torch.log(p.clamp_min(_EPS))).sum(1)
        if sum_p is None:
            sum_p, sum_plogp = p.clone(), plogp
        elif p.shape != sum_p.shape:
            raise InputError(
                f"member {s} has shape {tuple(p.shape)}, member 0 has {tuple(sum_p.shape)}; "
                "every member predicts the same [B, C, H, W]"
            )
        else:
            sum_p += p
            sum_plogp += plogp
        s += 1
    if s == 0:
        raise InputError("uncertainty_maps needs at least one member's probabilities")
    mean = sum_p / s
    entropy = -(mean * torch.log(mean.clamp_min(_EPS))).sum(1)
    expected = -sum_plogp / s
    return PixelUncertainty(mean, entropy, expected, (entropy - expected).clamp_min(0.0), s)
