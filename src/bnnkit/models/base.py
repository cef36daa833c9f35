"""Pieces shared by the model zoo: input normalisation, folding wrappers, input checks."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the first layer, so models take images in [0, 1]."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def check_images(x: torch.Tensor, input_shape: tuple[int, ...] | None, finite: bool = True):
    """Raise :class:`InputError` unless ``x`` is a float batch ``[B, *input_shape]``."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a tensor of images, got {type(x).__name__}")
    if input_shape is not None:
        want = tuple(input_shape)
        if x.dim() == len(want) and len(want) == 3:
            raise InputError(
                f"expected a batch [B, {', '.join(map(str, want))}], got a single image "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
            )
        if x.dim() != len(want) + 1:
            raise InputError(
                f"expected input of shape [B, {', '.join(map(str, want))}], got {tuple(x.shape)}"
            )
        if len(want) == 3 and x.shape[1] != want[0]:
            raise InputError(
                f"expected {want[0]} channel(s) (input [B, {', '.join(map(str, want))}]), got "
                f"{x.shape[1]} in {tuple(x.shape)}; is this the right data set for the model?"
            )
        if tuple(x.shape[1:]) != want:
            raise InputError(
                f"expected images of shape {want}, got {tuple(x.shape[1:])}; "
                "resize or choose a model built for this size"
            )
    if x.shape[0] == 0:
        raise InputError("empty batch: at least one input is needed")
    if not x.dtype.is_floating_point:
        raise InputError(
            f"expected float images in [0, 1], got dtype {x.dtype}; convert with x.float() / 255"
        )
    if finite and not torch.isfinite(x).all():
        raise InputError("input contains NaN or inf values; clean the data before predicting")


def fold(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """Repeat a batch member-major: ``[B, ...] -> [repeats*B, ...]`` (rows ``r*B + b``)."""
    if repeats == 1:
        return x
    return x.unsqueeze(0).expand(repeats, *x.shape).reshape(repeats * x.shape[0], *x.shape[1:])


class Folded(nn.Module):
    """Wraps a network whose ensemble layers expect a member-major folded batch.

    ``forward(x, samples=K)`` repeats ``x`` to ``[M*K*B, ...]`` once, runs the body in one pass
    and returns logits ``[M*K, B, C]``: member ``m``'s K samples are rows ``m*K : (m+1)*K``.
    For a network without ensemble layers (``members=1``) ``samples`` gives K stochastic passes
    (MC dropout masks, variational weights) folded into one batch.
    """

    def __init__(self, body: nn.Module, members: int = 1) -> None:
        super().__init__()
        if members < 1:
            raise InputError(f"members must be >= 1, got {members}")
        self.body = body
        self.members = members
        self.input_shape = getattr(body, "input_shape", None)
        self.num_classes = getattr(body, "num_classes", None)

    def forward(self, x: torch.Tensor, samples: int = 1) -> torch.Tensor:
        B = x.shape[0]
        R = self.members * samples
        out = self.body(fold(x, R))
        return out.reshape(R, B, *out.shape[1:])


class Stacked(nn.Module):
    """Independent networks (a deep ensemble); ``forward`` stacks their logits ``[M*K, B, C]``."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.ensemble = nn.ModuleList(members)
        self.members = len(members)
        first = members[0]
        self.input_shape = getattr(first, "input_shape", None)
        self.num_classes = getattr(first, "num_classes", None)

    def forward(self, x: torch.Tensor, samples: int = 1) -> torch.Tensor:
        return torch.cat([m(x, samples) for m in self.ensemble], dim=0)
