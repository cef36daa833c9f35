"""BatchEnsemble layers (Wen et al., 2020) on a member-major folded batch.

Ensemble folding convention (used by every ensemble layer in bnnkit):
the model repeats its input once at its entry to ``[M*n, ...]``, member-major, i.e. rows
``m*n : (m+1)*n`` belong to member ``m``. Each layer views its input as ``[M, n, ...]`` and
applies member ``m``'s parameters to chunk ``m``. No per-member tensor of the batch's size is
ever built by indexing or ``repeat_interleave``: the member factors broadcast over the chunk,
which keeps the extra work purely elementwise.

Member ``m``'s effective weight is ``W * (s_m r_m^T)``; computing ``((x * r_m) W^T) * s_m`` is
the same thing without forming M weight matrices.

Two execution schedules give the same function (see :class:`bnnkit.models.Folded`):

* ``fold``: one pass over the folded batch; the factors scale activations (one large kernel per
  layer plus elementwise work; what a GPU wants).
* ``members``: the network runs once per member on that member's rows, each ensemble layer in
  *member mode* (:func:`member_mode`). A layer whose factors are per member (not per row) then
  folds them into an effective weight ``W * (s_m r_m^T)`` of the weight's size, so there is no
  elementwise work on activations and no input gradient for a first layer: the cost of a loop
  over M separate networks, with its cache locality (what a CPU wants).
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..options import Option, OptionTable

#: the rows of the batch a folded forward pass feeds its body (members x samples x examples,
#: or one member's samples x examples), set by bnnkit.models.Folded around the body's call: an
#: ensemble layer checks that its input still holds them on axis 0 (None: no check)
_BATCH_ROWS: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "bnnkit_batch_rows", default=None
)


@contextlib.contextmanager
def batch_rows(n: int | None):
    """Within the block, ensemble layers expect their input's axis 0 to hold ``n`` rows (or a
    multiple of ``n``: positions flattened into the batch, e.g. ``x.reshape(-1, d)``)."""
    token = _BATCH_ROWS.set(n)
    try:
        yield
    finally:
        _BATCH_ROWS.reset(token)


def check_rows(x: torch.Tensor, layer: nn.Module) -> None:
    """Refuse an input whose axis 0 is not the folded batch: a body that moves the batch off
    axis 0 (e.g. sequence-first ``x.transpose(0, 1)``) would have the layer give one member's
    factors to another member's rows, silently. Shapes are all it sees: an axis that happens to
    have exactly the batch's size swapped onto axis 0 cannot be told apart from the batch."""
    n = _BATCH_ROWS.get()
    if n is None or x.dim() == 0:
        return
    k = x.shape[0]
    if k % n == 0 and (k == n or n not in tuple(x.shape[1:])):
        return
    raise InputError(
        f"{type(layer).__name__} got an input of shape {tuple(x.shape)} whose axis 0 is not the "
        f"batch of {n} rows the network was called with (members x samples x examples): the "
        "model moves the batch off axis 0 before this layer (e.g. a sequence-first transpose), "
        "and the layer would mix up members' rows; keep the batch on axis 0 around the "
        "Bayesian layers (transpose back before them, or use batch_first layouts)"
    )


def _split(x: torch.Tensor, members: int) -> int:
    n = x.shape[0]
    if n % members:
        raise InputError(
            f"an ensemble layer with {members} members needs a batch that is a multiple of "
            f"{members} (member-major folded input), got batch {n}; wrap the model with "
            "bnnkit.models.Folded or repeat the input M times"
        )
    return n // members


FACTOR_INITS = ("ones", "normal", "random_sign")

BATCH_ENSEMBLE_OPTIONS = OptionTable(
    "layer kind 'batch_ensemble'",
    [
        Option(
            "factor_init",
            "choice",
            "normal",
            "initialisation of the rank-1 factors: ones, N(1, 0.5) or random signs",
            choices=FACTOR_INITS,
        )
    ],
)


def init_factors(t: torch.Tensor, init: str) -> None:
    """Initialise rank-1 factors: 'ones', 'normal' (mean 1, sd 0.5) or 'random_sign' (+-1)."""
    with torch.no_grad():
        if init == "ones":
            t.fill_(1.0)
        elif init == "normal":
            t.normal_(1.0, 0.5)
        elif init == "random_sign":
            t.bernoulli_(0.5).mul_(2).sub_(1)
        else:
            raise InputError(f"unknown factor init {init!r}; use 'ones', 'normal' or 'random_sign'")


class EnsembleModule(nn.Module):
    """A layer that holds M members' parameters and reads a member-major folded batch.

    ``_member`` is ``None`` (the input holds all members' rows) or a member index set by
    :func:`member_mode` / :func:`member_pass` (the input holds that member's rows only).
    ``_pass`` identifies the current member-by-member forward pass (see :func:`member_pass`).
    """

    members: int
    _member: int | None = None
    _pass: object | None = None

    def _end_pass(self) -> None:
        """Drop state kept for the pass that just ended."""


def _ensemble_layers(model: nn.Module) -> list[EnsembleModule]:
    return [m for m in model.modules() if isinstance(m, EnsembleModule)]


@contextlib.contextmanager
def member_pass(model: nn.Module):
    """One forward pass of ``model`` computed member by member.

    Yields ``select(m)``: after ``select(m)`` every ensemble layer acts as member ``m`` alone
    (its input holds member ``m``'s rows only). Within the pass a layer may reuse work shared
    by its members (all members' effective weights, built once); it is dropped at the end.
    """
    layers = _ensemble_layers(model)
    token = object()

    def select(member: int) -> None:
        for layer in layers:
            if not 0 <= member < layer.members:
                raise InputError(f"member {member} out of range for a layer of {layer.members}")
            layer._member = member

    for layer in layers:
        layer._pass = token
    try:
        yield select
    finally:
        for layer in layers:
            layer._member = None
            layer._pass = None
            layer._end_pass()


@contextlib.contextmanager
def member_mode(model: nn.Module, member: int):
    """Within the block, every ensemble layer of ``model`` acts as member ``member`` alone."""
    with member_pass(model) as select:
        select(member)
        yield


def _per_member(t: torch.Tensor) -> bool:
    return t.shape[1] == 1


class _Rank1Structure(EnsembleModule):
    """A layer with shared weight ``W`` and per-member rank-1 factors on a folded batch.

    Member ``m`` computes ``((x * r) W^T) * s + b_m``. Subclasses say where the factors come
    from through :meth:`factors`: learnt vectors (BatchEnsemble), samples from a posterior
    (rank-1 BNN) or decodings of a latent sample (LP-BNN). Factors of shape ``[M, 1, d]``
    broadcast over a member's rows; ``[M, n, d]`` gives every row its own draw.

    In member mode, per-member factors are folded into effective weights
    ``W_m = W * (s_m r_m^T)`` (:meth:`_fold_weight`, all members at once); per-row factors
    scale the member's activations.
    """

    @abc.abstractmethod
    def factors(self, n: int, member: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output factors ``([M, 1 or n, in], [M, 1 or n, out])`` for ``n`` rows.

        With ``member`` set, only that member's: leading dimension 1.
        """

    def _fixed_factors(self) -> bool:
        """Whether :meth:`factors` is a deterministic function of the parameters."""
        return False

    def _forward_member(self, x: torch.Tensor) -> torch.Tensor:
        """Member mode: ``x`` holds member ``_member``'s rows only."""
        m = self._member
        bias = None if self.bias is None else self.bias[m]
        if self._fixed_factors():
            w = self._member_weights()
            if w is not None:  # one weight for all the member's rows: any batch layout is exact
                return self._apply_weight(x, w[m], bias)
        r, s = self.factors(x.shape[0], m)
        if not (_per_member(r) and _per_member(s)):  # per-row factors scale activations
            check_rows(x, self)  # ... of rows that must be the examples
            return self._scale_rows(x, r[0], s[0], bias)
        return self._apply_weight(x, self._fold_weight(r[:, 0], s[:, 0])[0], bias)

    # When are all members' effective weights built once and kept? Within one member-by-member
    # pass only (the pass token is the cache key; the parameters cannot change mid-pass):
    # * recording gradients: autograd keeps every member's effective weight for the backward
    #   anyway, and one batched build (and one backward through it) replaces M chains of small
    #   ops whose dispatch overhead made a small network's member loop slower than a loop over
    #   separate networks;
    # * without gradients, for small layers (at most _KEEP_NUMEL weights). Large layers rebuild
    #   one member's weight at a time, so inference never holds M copies of a large weight.
    # Nothing is kept across passes: a key made of parameter version counters misses writes
    # through ``.data``, which bump no counter, and served stale weights.
    _KEEP_NUMEL = 1 << 16

    def _member_weights(self) -> torch.Tensor | None:
        """All members' effective weights ``[M, *W.shape]`` if kept (see above), else None."""
        if self._pass is None:
            return None
        if not torch.is_grad_enabled() and self.weight.numel() > self._KEEP_NUMEL:
            return None
        hit = self.__dict__.get("_weights")  # (pass token, weights)
        if hit is None or hit[0] is not self._pass:
            r, s = self.factors(1)
            hit = (self._pass, self._fold_weight(r[:, 0], s[:, 0]))
            self.__dict__["_weights"] = hit
        return hit[1]

    def _end_pass(self) -> None:
        self.__dict__.pop("_weights", None)  # the pass's weights (and autograd graph)

    def _init_bias(self, out_dim: int, members: int, bias: bool, fan_in: int) -> None:
        if members < 1:
            raise InputError(f"members must be >= 1, got {members}")
        self.members = members
        self.bias = nn.Parameter(torch.empty(members, out_dim)) if bias else None
        if bias:
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _scale_out(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y * s
        bias = self.bias.view(*self.bias.shape[:1], 1, *self.bias.shape[1:], *([1] * (s.dim() - 3)))
        return torch.addcmul(bias, y, s)


class Rank1StructureLinear(_Rank1Structure):
    """Linear member of the family: ``in_features -> out_features``."""

    def __init__(self, in_features: int, out_features: int, members: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._init_bias(out_features, members, bias, in_features)

    @classmethod
    def from_dense(cls, layer: nn.Linear, members: int, **kw):
        """Copy a trained ``nn.Linear`` into every member (its bias into every ``b_m``)."""
        new = cls(layer.in_features, layer.out_features, members, layer.bias is not None, **kw)
        new = new.to(layer.weight.device, layer.weight.dtype)  # before the copy: no rounding
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias.expand(members, -1))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._member is not None:
            return self._forward_member(x)
        M = self.members
        check_rows(x, self)
        n = _split(x, M)
        # [M, n, P, in]: P positions per example (1 for [B, in]; e.g. pixels for a Linear
        # applied to [B, H, W, C]): factors are per member or per example, never per position
        xm = x.reshape(M, n, -1, self.in_features)
        r, s = self.factors(n)
        y = F.linear(xm * r[:, :, None], self.weight)
        s = s[:, :, None]
        y = y * s if self.bias is None else torch.addcmul(self.bias[:, None, None], y, s)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _fold_weight(self, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Effective weights ``[k, out, in]`` for factors ``r [k, in]``, ``s [k, out]``."""
        return self.weight * (s[:, :, None] * r[:, None, :])

    def _apply_weight(self, x, w, bias):
        return F.linear(x, w, bias)

    def _scale_rows(self, x, r, s, bias):
        xr = x.reshape(x.shape[0], -1, self.in_features)  # positions per example, as above
        y = F.linear(xr * r[:, None], self.weight) * s[:, None]
        y = y if bias is None else y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, members={self.members}"


class Rank1StructureConv2d(_Rank1Structure):
    """Conv2d member of the family: factors scale input and output channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        members: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        # the shared convolution holds W; its own bias is off (biases are per member)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self._init_bias(out_channels, members, bias, self.conv.weight[0].numel())

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, members: int, **kw):
        """Copy a trained ``nn.Conv2d`` into every member (its bias into every ``b_m``)."""
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            members,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            **kw,
        )
        new = new.to(layer.weight.device, layer.weight.dtype)  # before the copy: no rounding
        with torch.no_grad():
            new.conv.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias.expand(members, -1))
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._member is not None:
            return self._forward_member(x)
        M = self.members
        check_rows(x, self)
        n = _split(x, M)
        r, s = self.factors(n)
        xm = x.reshape(M, n, *x.shape[1:]) * r[..., None, None]
        y = self.conv(xm.reshape(x.shape))
        y = self._scale_out(y.reshape(M, n, *y.shape[1:]), s[..., None, None])
        return y.reshape(M * n, *y.shape[2:])

    def _fold_weight(self, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Effective weights ``[k, out, in/groups, kh, kw]`` for ``r [k, in]``, ``s [k, out]``."""
        # input channel g*in_g + j meets weight[o, j] for the output channels o of group g
        out_c, in_g = self.conv.weight.shape[:2]
        g, k = self.conv.groups, r.shape[0]
        r_eff = r.view(k, g, 1, in_g).expand(k, g, out_c // g, in_g).reshape(k, out_c, in_g)
        return self.conv.weight * (s[:, :, None] * r_eff)[..., None, None]

    def _apply_weight(self, x, w, bias):
        return self.conv._conv_forward(x, w, bias)

    def _scale_rows(self, x, r, s, bias):
        y = self.conv(x * r[..., None, None]) * s[..., None, None]
        return y if bias is None else y + bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, members={self.members}"


class _LearntFactors:
    """BatchEnsemble's factors: one learnt vector pair per member."""

    def _make_factors(self, in_dim: int, out_dim: int, factor_init: str) -> None:
        BATCH_ENSEMBLE_OPTIONS.resolve({"factor_init": factor_init})
        self.factor_init = factor_init
        self.r = nn.Parameter(torch.empty(self.members, in_dim))
        self.s = nn.Parameter(torch.empty(self.members, out_dim))
        init_factors(self.r, factor_init)
        init_factors(self.s, factor_init)

    def _fixed_factors(self) -> bool:
        return True

    def _member_vectors(self, member: int | None):
        """The learnt ``(r, s)``, ``[M, d]`` or one member's ``[1, d]``."""
        if member is None:
            return self.r, self.s
        return self.r[member : member + 1], self.s[member : member + 1]

    def factors(self, n: int, member: int | None = None):
        r, s = self._member_vectors(member)
        return r.unsqueeze(1), s.unsqueeze(1)


class BatchEnsembleLinear(_LearntFactors, Rank1StructureLinear):
    """``y_m = ((x * r_m) W^T) * s_m + b_m`` for member ``m`` of ``members``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        members: int,
        bias: bool = True,
        factor_init: str = "normal",
    ) -> None:
        super().__init__(in_features, out_features, members, bias)
        self._make_factors(in_features, out_features, factor_init)


class BatchEnsembleConv2d(_LearntFactors, Rank1StructureConv2d):
    """Conv2d with per-member input/output channel factors ``r_m``, ``s_m`` and bias ``b_m``."""

    def __init__(self, in_channels, out_channels, kernel_size, members, *args, factor_init="normal",
                 **kw) -> None:  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, members, *args, **kw)
        self._make_factors(in_channels, out_channels, factor_init)


class EnsembleBatchNorm2d(EnsembleModule):
    """One BatchNorm2d per member on a member-major folded batch (statistics per member)."""

    def __init__(
        self,
        num_features: int,
        members: int,
        eps: float = 1e-5,
        momentum=0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.members, self.num_features = members, num_features
        # a BatchNorm over M*C channels: member m's channels are m*C:(m+1)*C
        self.bn = nn.BatchNorm2d(
            num_features * members, eps, momentum, affine, track_running_stats, device, dtype
        )

    @classmethod
    def from_dense(cls, layer: nn.BatchNorm2d, members: int):
        """Every member starts as ``layer``: affine parameters, running statistics and the
        batch counter copied; ``affine`` / ``track_running_stats`` / eps / momentum / device /
        dtype kept."""
        like = next(iter([*layer.parameters(), *layer.buffers()]), None)
        new = cls(
            layer.num_features, members, layer.eps, layer.momentum, layer.affine,
            layer.track_running_stats,
            device=None if like is None else like.device,
            dtype=None if like is None or not like.is_floating_point() else like.dtype,
        )  # fmt: skip
        with torch.no_grad():
            if layer.affine:
                new.bn.weight.copy_(layer.weight.repeat(members))
                new.bn.bias.copy_(layer.bias.repeat(members))
            if layer.running_mean is not None:
                new.bn.running_mean.copy_(layer.running_mean.repeat(members))
                new.bn.running_var.copy_(layer.running_var.repeat(members))
                new.bn.num_batches_tracked.copy_(layer.num_batches_tracked)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._member is not None:
            return self._forward_member(x)
        M = self.members
        check_rows(x, self)
        n = _split(x, M)
        C, H, W = x.shape[1:]
        # [M, n, C, H, W] -> [n, M*C, H, W]: one batch_norm call for all members
        z = x.reshape(M, n, C, H, W).transpose(0, 1).reshape(n, M * C, H, W)
        z = self.bn(z)
        return z.reshape(n, M, C, H, W).transpose(0, 1).reshape(M * n, C, H, W)

    def _forward_member(self, x: torch.Tensor) -> torch.Tensor:
        check_rows(x, self)
        bn, C = self.bn, self.num_features
        sl = slice(self._member * C, (self._member + 1) * C)
        use_batch = bn.training or bn.running_mean is None
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats:
            if self._member == 0:  # one step per folded batch, as in the fold schedule
                bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)

        def part(t):
            return None if t is None else t[sl]

        # slices of the running buffers are views: batch_norm updates them in place
        return F.batch_norm(
            x, part(bn.running_mean), part(bn.running_var), part(bn.weight), part(bn.bias),
            use_batch, momentum, bn.eps,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.num_features}, members={self.members}"
