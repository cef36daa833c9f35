"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation NLL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.segmentation import IGNORE_INDEX
from ..errors import InputError
from ..options import OptionTable
from .base import Method, UQModel, register


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising ``NLL(softmax(logits / T), labels)``; logits ``[B, C]``.

    Optimised over ``log T`` with L-BFGS in float64 (a 1-D convex problem in 1/T).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise InputError(
            f"temperature scaling needs logits [B, C] and labels [B], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    z = logits.detach().double()
    y = labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


#: at most this many validation pixels enter a segmentation model's temperature fit
MAX_PIXELS = 2_000_000


def pixel_logits(model: UQModel, x: torch.Tensor, y: torch.Tensor, images: int = 8, seed=0):
    """The mean logits ``[P, C]`` and labels ``[P]`` of the non-void pixels of label maps ``y``
    ``[N, H, W]``, at most :data:`MAX_PIXELS` of them (a seeded uniform subset beyond that)."""
    zs, ys = [], []
    for i in range(0, len(x), images):
        z = model.logits(x[i : i + images]).mean(0)  # [b, C, H, W]
        yb = y[i : i + images].long()
        keep = yb != IGNORE_INDEX
        zs.append(z.movedim(1, -1)[keep])
        ys.append(yb[keep])
    z, y = torch.cat(zs), torch.cat(ys)
    if len(y) == 0:
        raise InputError("every validation pixel is void: no labels to fit a temperature on")
    if len(y) > MAX_PIXELS:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(y), generator=g)[:MAX_PIXELS]
        z, y = z[pick], y[pick]
    return z, y


def _fit(model: UQModel, bundle, batch_size: int = 1000):
    x_val, y_val = bundle.val.float(), bundle.val.y
    if model.spec.task == "segmentation":
        # one temperature for every pixel, fitted on the validation pixels' NLL
        z, y = pixel_logits(model, x_val, y_val)
        model.temperature.fill_(fit_temperature(z, y))
        return
    logits = model.logits(x_val, batch_size)
    # a single deterministic network: S = 1; for ensembles the mean logit is tempered
    model.temperature.fill_(fit_temperature(logits.mean(0), y_val))


register(
    Method(
        "temperature_scaling",
        build=None,  # type: ignore[arg-type]  (post-hoc: built from `posthoc_of`)
        options=OptionTable("method 'temperature_scaling'", []),
        summary="deterministic network with a softmax temperature fitted on validation NLL",
        posthoc_of="deterministic",
        fit=_fit,
    )
)
