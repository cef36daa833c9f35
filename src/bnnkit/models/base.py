"""Pieces shared by the model zoo: input normalisation, folding wrappers, input checks."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..nn.ensemble import EnsembleModule, _split, batch_rows, member_pass
from .placement import NaivePath, PlacementFallback, PrefixSplit, run_prefix, split_prefix


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the first layer, so models take images in [0, 1]."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def check_images(x: torch.Tensor, input_shape: tuple[int, ...] | None, finite: bool = True):
    """Raise :class:`InputError` unless ``x`` is a float batch ``[B, *input_shape]``.

    An entry ``None`` of ``input_shape`` matches any size: a dense-prediction model takes
    ``(3, None, None)``, images of any height and width."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"expected a tensor of images, got {type(x).__name__}")
    if input_shape is not None:
        want = tuple(input_shape)
        shown = ", ".join("H" if i == 1 and w is None else "W" if w is None else str(w)
                          for i, w in enumerate(want))  # fmt: skip
        if x.dim() == len(want) and len(want) == 3:
            raise InputError(
                f"expected a batch [B, {shown}], got a single image "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
            )
        if x.dim() != len(want) + 1:
            raise InputError(f"expected input of shape [B, {shown}], got {tuple(x.shape)}")
        if len(want) == 3 and want[0] is not None and x.shape[1] != want[0]:
            raise InputError(
                f"expected {want[0]} channel(s) (input [B, {shown}]), got "
                f"{x.shape[1]} in {tuple(x.shape)}; is this the right data set for the model?"
            )
        if any(w is not None and w != g for w, g in zip(want, x.shape[1:], strict=True)):
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
    lo, hi = float(x.min()), float(x.max())
    if lo < -0.01 or hi > 1.01:  # the models normalise [0, 1] images themselves
        hint = "; divide by 255" if hi > 1.01 and lo >= 0 else ""
        raise InputError(
            f"expected images in [0, 1] (the model normalises them itself), got values in "
            f"[{lo:.3g}, {hi:.3g}]{hint}"
        )


def fold(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """Repeat a batch member-major: ``[B, ...] -> [repeats*B, ...]`` (rows ``r*B + b``)."""
    if repeats == 1:
        return x
    return x.unsqueeze(0).expand(repeats, *x.shape).reshape(repeats * x.shape[0], *x.shape[1:])


def _fold_value(v, repeats: int):
    """A prefix value for the tail: tensors repeated, plain values (sizes) as they are."""
    return fold(v, repeats) if isinstance(v, torch.Tensor) else v


SCHEDULES = ("auto", "fold", "members")


class Folded(nn.Module):
    """Wraps a network whose ensemble layers expect a member-major folded batch.

    ``forward(x, samples=K)`` returns logits ``[M*K, B, C]``: member ``m``'s K samples are rows
    ``m*K : (m+1)*K``. For a network without ensemble layers (``members=1``) ``samples`` gives K
    stochastic passes (MC dropout masks, variational weights) folded into one batch.

    ``schedule`` says how the members are computed; both give the same function:

    * ``"fold"``: the input is repeated to ``[M*K*B, ...]`` and the body runs once; the
      factors scale activations. One large kernel per layer: best on a GPU.
    * ``"members"``: the body runs once per member on ``[K*B, ...]`` rows with its ensemble
      layers in member mode (per-member factors fold into the weights). Costs what a loop over
      M separate networks costs, and keeps one member's activations in cache: best on a CPU.
    * ``"auto"`` (default): ``"members"`` on CPU, ``"fold"`` elsewhere, with two exceptions
      on CPU that use ``"fold"``: a body with shared (not per-member) BatchNorm in training
      mode, because batch statistics over all members' rows differ from statistics over one
      member's rows; and training with factors sampled per row (rank-1, LP-BNN) or with large
      layers (more than 65,536 weights), where the member loop measured slower (BENCHMARKS.md).
    """

    def __init__(
        self, body: nn.Module, members: int = 1, schedule: str = "auto", prefix_once: bool = True
    ) -> None:
        super().__init__()
        if members < 1:
            raise InputError(f"members must be >= 1, got {members}")
        self.body = body
        self.members = members
        self.schedule = schedule
        #: in eval mode, run the deterministic prefix once per input (models/placement.py)
        self.prefix_once = prefix_once
        self.input_shape = getattr(body, "input_shape", None)
        self.num_classes = getattr(body, "num_classes", None)

    @property
    def schedule(self) -> str:
        return self._schedule

    @schedule.setter
    def schedule(self, value: str) -> None:
        if value not in SCHEDULES:
            raise InputError(f"unknown schedule {value!r}; use one of {', '.join(SCHEDULES)}")
        self._schedule = value

    def _by_member(self, x: torch.Tensor) -> bool:
        if self.members == 1 or self._schedule == "fold":
            return False
        if self._schedule == "members":
            return True
        if x.device.type != "cpu":
            return False
        if self.training and _shared_batchnorm(self.body):
            return False
        if torch.is_grad_enabled() and not _member_training_pays(self.body):
            return False
        return True

    def _prefix_split(self) -> PrefixSplit | None:
        """The body's prefix/tail split, rebuilt whenever a module, parameter or buffer object
        of the body is replaced (conversion, ``.to()``) or a module's train/eval mode changes
        (it decides whether dropout and BatchNorm may run once); values are read live. None:
        run the naive way (after a one-time warning when the split was refused)."""
        key = (
            tuple((n, id(m), m.training) for n, m in self.body.named_modules()),
            tuple(id(t) for t in self.body.parameters()),
            tuple(id(t) for t in self.body.buffers()),
        )
        hit = self.__dict__.get("_split_cache")
        if hit is None or hit[0] != key:
            hit = (key, split_prefix(self.body))
            self.__dict__["_split_cache"] = hit
        if isinstance(hit[1], NaivePath):
            self._placement_fallback(hit[1])
            return None
        return hit[1]

    def _placement_fallback(self, naive: NaivePath) -> None:
        """Warn once per model and reason that the naive path runs."""
        warned = self.__dict__.setdefault("_placement_warned", set())
        if naive.reason not in warned:
            warned.add(naive.reason)
            warnings.warn(
                f"placement-aware inference is off for this {type(self.body).__name__}: "
                f"{naive.reason}. Every member and sample runs the whole network instead (the "
                "same predictive, slower); prefix_once=False silences this.",
                PlacementFallback,
                stacklevel=2,
            )

    def _forward_prefix_once(self, x: torch.Tensor, samples: int) -> torch.Tensor | None:
        split = self._prefix_split()
        if split is None or split.n_prefix_ops == 0:
            return None
        values = run_prefix(split, x)
        if isinstance(values, NaivePath):
            self._placement_fallback(values)
            return None
        B = x.shape[0]
        if self._by_member(x):
            folded = [_fold_value(v, samples) for v in values]
            outs = []
            with member_pass(self.body) as select, batch_rows(samples * B):
                for m in range(self.members):
                    select(m)
                    outs.append(_logits(split.tail(*folded), self.body))
            return torch.cat(outs)
        with batch_rows(self.members * samples * B):
            return _logits(split.tail(*[_fold_value(v, self.members * samples) for v in values]),
                           self.body)  # fmt: skip

    def forward(self, x: torch.Tensor, samples: int = 1) -> torch.Tensor:
        B = x.shape[0]
        R = self.members * samples
        if self.prefix_once and not self.training and R > 1:
            out = self._forward_prefix_once(x, samples)
            if out is not None:
                return out.reshape(R, B, *out.shape[1:])
        if self._by_member(x):
            xk = fold(x, samples)
            outs = []
            with member_pass(self.body) as select, batch_rows(xk.shape[0]):
                for m in range(self.members):
                    select(m)
                    outs.append(_logits(self.body(xk), self.body))
            out = torch.cat(outs)
        else:
            with batch_rows(R * B):
                out = _logits(self.body(fold(x, R)), self.body)
        return out.reshape(R, B, *out.shape[1:])

    def forward_folded(self, xf: torch.Tensor) -> torch.Tensor:
        """Run the body on an already folded batch ``[M*n, ...]`` (member m owns rows
        ``m*n:(m+1)*n``), e.g. BatchEnsemble's original protocol of one batch split among the
        members. Returns ``[M*n, C]``."""
        if not self._by_member(xf):
            with batch_rows(xf.shape[0]):
                return _logits(self.body(xf), self.body)
        n = _split(xf, self.members)
        outs = []
        with member_pass(self.body) as select, batch_rows(n):
            for m in range(self.members):
                select(m)
                outs.append(_logits(self.body(xf[m * n : (m + 1) * n]), self.body))
        return torch.cat(outs)


def _logits(out, body: nn.Module) -> torch.Tensor:
    """The body's output must be the logits tensor: a dict (torchvision's ``{"out": ...}``), a
    tuple or anything else is refused by name instead of failing in a reshape."""
    if isinstance(out, torch.Tensor):
        return out
    what = type(out).__name__
    keys = f" with keys {sorted(map(str, out))}" if isinstance(out, dict) else ""
    raise ConfigError(
        f"{type(body).__name__}.forward returned a {what}{keys}, not a logits tensor: bnnkit's "
        "methods need forward(x) -> logits [B, C] (segmentation: [B, C, H, W]); return the "
        "logits (e.g. out['out']) from forward, or wrap the network in a module that does"
    )


def _member_training_pays(body: nn.Module) -> bool:
    """Whether training member by member is the faster schedule on CPU (BENCHMARKS.md):
    every factor is per member (per-row factors still scale activations, and measured slower
    looped) and every weight is small (the backward through M effective weights costs
    O(M x weight size), which for ResNet-size layers outweighs the activation work it saves)."""
    for m in body.modules():
        if isinstance(m, EnsembleModule) and hasattr(m, "factors"):
            if not m._fixed_factors() or m.weight.numel() > m._KEEP_NUMEL:
                return False
    return True


def _shared_batchnorm(body: nn.Module) -> bool:
    """Whether ``body`` has a BatchNorm outside the per-member ensemble layers."""

    def walk(mod: nn.Module) -> bool:
        if isinstance(mod, EnsembleModule):
            return False
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return True
        return any(walk(c) for c in mod.children())

    return walk(body)


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

    def forward_folded(self, xf: torch.Tensor) -> torch.Tensor:
        """Member ``m`` on rows ``m*n:(m+1)*n`` of a batch of ``M*n`` rows (each member its own
        examples); returns logits ``[M*n, C]`` (dense: ``[M*n, C, H, W]``), member-major."""
        n = _split(xf, self.members)
        outs = [m(xf[i * n : (i + 1) * n], 1) for i, m in enumerate(self.ensemble)]
        return torch.cat([o.flatten(0, 1) for o in outs])  # [1, n, C, ...] -> [n, C, ...]
