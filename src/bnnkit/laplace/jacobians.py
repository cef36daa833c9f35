"""Per-example Jacobians of a classifier's logits restricted to a subnetwork.

The subnetwork is a set of flat parameter indices (into the concatenation of
``model.named_parameters()`` that require gradients, the order of
``torch.nn.utils.parameters_to_vector``). For a batch of ``n`` inputs and ``C`` classes,
:meth:`SubnetJacobian.logits_and_jacobian` returns ``J [n, C, S]`` with
``J[b, c, k] = d f_c(x_b) / d theta_{i_k}`` without ever forming a Jacobian over all parameters:

* one forward pass records each involved layer's input (forward hooks);
* for each class ``c`` one backward pass gives ``d f_c / d out_l`` for every involved layer ``l``
  (``torch.autograd.grad`` with respect to the layer outputs, not the parameters);
* a weight's per-example derivative comes from the layer's input and output gradient:
  ``sum_pos g[b, o, pos] * unfold(a)[b, j, pos]`` for a convolution weight ``(o, j)``,
  ``sum g[b, ..., o] a[b, ..., i]`` for a linear weight, ``sum g * x_hat`` for BatchNorm (eval
  mode). All classes are handled together: when many of a layer's entries are selected, one
  batched GEMM forms the derivatives of the whole layer (or, for a convolution, of the selected
  output channels) and the entries are picked from it; otherwise they are gathered entry by
  entry, in chunks so that memory stays within a byte budget.

Memory is ``O(n * C * S)`` for the result plus ``O(n * chunk * positions)`` for the gathers plus
the network's activations, never ``O(n * C * #all parameters)``. Inputs of the model are
independent of each other (eval mode; BatchNorm uses running statistics), which makes a summed
backward pass give every example's own gradient.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError

SUPPORTED = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)


@dataclass
class ParamSlot:
    """One parameter tensor of the model and where it sits in the flat vector."""

    name: str
    module: nn.Module
    attr: str  # "weight" or "bias"
    offset: int
    numel: int

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


def param_slots(model: nn.Module) -> list[ParamSlot]:
    """Flat layout of the trainable parameters (``parameters_to_vector`` order)."""
    owners = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), (mod, pname, f"{mname}.{pname}" if mname else pname))
    slots, offset = [], 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        mod, attr, name = owners[id(p)]
        slots.append(ParamSlot(name, mod, attr, offset, p.numel()))
        offset += p.numel()
    return slots


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_indices(indices, total: int) -> torch.Tensor:
    """Validate subnetwork indices: 1-D integers in ``[0, total)``, no repeats; sorted copy."""
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or idx.numel() == 0:
        raise InputError(
            f"subnetwork indices must be a non-empty 1-D tensor, got {tuple(idx.shape)}"
        )
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise InputError(f"subnetwork indices must be integers, got {idx.dtype}")
    idx = idx.long()
    if idx.numel() > total:
        raise InputError(
            f"subnetwork of {idx.numel()} parameters is larger than the model ({total} trainable "
            "parameters); choose n_params <= the model size"
        )
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= total:
        raise InputError(
            f"subnetwork index out of range: got [{lo}, {hi}], the model has {total} trainable "
            f"parameters (valid: 0..{total - 1})"
        )
    s = torch.sort(idx).values
    if (s[1:] == s[:-1]).any():
        dup = int(s[1:][s[1:] == s[:-1]][0])
        raise InputError(f"subnetwork indices contain repeats (e.g. {dup}); each parameter once")
    return s


def _as_slice(idx: torch.Tensor):
    """A slice for a sorted run of consecutive indices (indexing without a gather), else idx."""
    if idx.numel() > 0 and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


@dataclass
class _Group:
    slot: ParamSlot
    local: torch.Tensor  # indices into the flattened parameter
    cols: torch.Tensor  # columns of J they fill
    local_ix: slice | torch.Tensor  # the same as slices where they are consecutive runs
    cols_ix: slice | torch.Tensor


def parse_budget(budget) -> int:
    """Bytes from an int or a string like '512MB', '2GB'."""
    if isinstance(budget, (int, float)):
        value = int(budget)
    else:
        s = str(budget).strip().upper()
        units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
        for unit, mult in units.items():
            if s.endswith(unit):
                try:
                    value = int(float(s[: -len(unit)]) * mult)
                except ValueError:
                    break
                break
        else:
            try:
                value = int(s)
            except ValueError:
                value = -1
    if value <= 0:
        raise InputError(f"memory budget must be a positive size like '2GB', got {budget!r}")
    return value


class SubnetJacobian:
    """Jacobians of ``model``'s logits ``[n, C]`` with respect to ``indices`` (flat)."""

    def __init__(self, model: nn.Module, indices, memory_budget="2GB") -> None:
        self.model = model
        self.slots = param_slots(model)
        self.total = sum(s.numel for s in self.slots)
        self.indices = check_indices(indices, self.total)
        self.budget = parse_budget(memory_budget)
        self.groups: list[_Group] = []
        offsets = torch.tensor([s.offset for s in self.slots])
        which = torch.searchsorted(offsets, self.indices, right=True) - 1
        for k in torch.unique(which).tolist():
            slot = self.slots[k]
            mask = which == k
            cols = torch.nonzero(mask).flatten()
            if not isinstance(slot.module, SUPPORTED):
                raise ConfigError(
                    f"subnetwork includes parameter {slot.name!r} of a "
                    f"{type(slot.module).__name__} layer; subnetwork Jacobians support Linear, "
                    "Conv2d and BatchNorm layers: choose indices in those"
                )
            local = self.indices[mask] - slot.offset
            self.groups.append(_Group(slot, local, cols, _as_slice(local), _as_slice(cols)))
        self.modules = list({id(g.slot.module): g.slot.module for g in self.groups}.values())

    @property
    def size(self) -> int:
        return self.indices.numel()

    def rows_per_chunk(self, num_classes: int, extra_per_row: int = 0) -> int:
        """Inputs per chunk so that ``J [n, C, S]`` (x3 for products) fits in the budget."""
        per_row = 4 * (3 * num_classes * self.size + extra_per_row)
        n = self.budget // per_row
        if n < 1:
            raise InputError(
                f"memory budget of {self.budget / 2**20:.1f} MB is too small for one input's "
                f"Jacobian ({per_row / 2**20:.1f} MB for {num_classes} classes x {self.size} "
                "parameters); raise memory_budget or choose a smaller subnetwork"
            )
        return int(n)

    @contextlib.contextmanager
    def _recording(self, store: dict):
        handles = []
        for mod in self.modules:

            def hook(m, inputs, output):
                key = id(m)
                if key in store:
                    raise ConfigError(
                        f"a {type(m).__name__} layer with subnetwork parameters is applied more "
                        "than once per forward pass (shared weights); subnetwork Jacobians need "
                        "each such layer to run once"
                    )
                store[key] = (inputs[0].detach(), output)

            handles.append(mod.register_forward_hook(hook))
        # parameters of the involved layers must be in the graph for their outputs to be
        grads = {}
        for mod in self.modules:
            for p in mod.parameters(recurse=False):
                grads[p] = p.requires_grad
                p.requires_grad_(True)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for p, flag in grads.items():
                p.requires_grad_(flag)

    def logits_and_jacobian(
        self, x: torch.Tensor, reuse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f [n, C], J [n, C, S])`` for one chunk of inputs (float32).

        With ``reuse=True`` ``J`` lives in a buffer kept by this object and overwritten by the
        next call (callers that consume it at once, in place if they like): large fresh
        allocations are page-faulted in on every chunk, which dominated the cost on CPU."""
        for mod in self.model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
                raise ConfigError(
                    "the model has BatchNorm in training mode: per-example Jacobians need "
                    "running statistics; call model.eval() first"
                )
        store: dict = {}
        with torch.enable_grad(), self._recording(store):
            f = self.model(x)
            if f.dim() != 2:
                raise InputError(
                    f"the model must return logits [batch, classes], got {tuple(f.shape)}"
                )
            n, C = f.shape
            outs = [store[id(m)][1] for m in self.modules]
            # d f_c / d out_l for every class: one backward pass per class, stacked [n, C, ...]
            per_class: list[list] = [[] for _ in self.modules]
            for c in range(C):
                g_outs = torch.autograd.grad(
                    f[:, c].sum(), outs, retain_graph=c < C - 1, allow_unused=True
                )
                for k, g in enumerate(g_outs):
                    per_class[k].append(g)
        grads = {
            id(m): None if gs[0] is None else torch.stack([g.detach() for g in gs], 1)
            for m, gs in zip(self.modules, per_class)
        }
        J = self._zeros(f, n, C) if reuse else f.new_zeros(n, C, self.size)
        unfolded: dict = {}
        for grp in self.groups:
            mod = grp.slot.module
            g = grads[id(mod)]
            if g is None:  # the layer does not influence the logits
                continue
            a = store[id(mod)][0]
            target = J[:, :, grp.cols_ix]
            if self._outer_into(mod, grp, a, g, target):
                continue
            J[:, :, grp.cols_ix] = self._per_example(mod, grp.slot.attr, a, g, grp, unfolded)
        return f.detach(), J

    def _zeros(self, like: torch.Tensor, n: int, C: int) -> torch.Tensor:
        size = n * C * self.size
        buf = getattr(self, "_buf", None)
        if buf is None or buf.numel() < size or buf.device != like.device:
            buf = self._buf = like.new_empty(size)
        return buf[:size].view(n, C, self.size).zero_()

    @staticmethod
    def _outer_into(mod, grp: _Group, a, g, target: torch.Tensor) -> bool:
        """A whole Linear weight on flat inputs: its per-example derivative is the outer
        product ``g a^T``; write it straight into ``J`` (no [n, C, O, I] temporary)."""
        if not (
            isinstance(mod, nn.Linear)
            and grp.slot.attr == "weight"
            and isinstance(grp.local_ix, slice)
            and isinstance(grp.cols_ix, slice)
            and grp.local.numel() == mod.weight.numel()
            and a.dim() == 2
        ):
            return False
        n, C = g.shape[:2]
        out = target.view(n, C, mod.out_features, mod.in_features)
        torch.mul(g.reshape(n, C, -1, 1), a.reshape(n, 1, 1, -1), out=out)
        return True

    # ------------------------------------------------------------------ per-layer gathers
    # ``a``: the layer's input [n, ...]; ``g``: d f_c / d output for every class [n, C, ...];
    # each returns the per-example, per-class derivatives of the group's entries [n, C, k].
    def _chunks(self, local: torch.Tensor, rows: int, positions: int):
        per = max(1, self.budget // (4 * 3 * max(1, rows * positions)))
        for i in range(0, local.numel(), per):
            yield i, local[i : i + per]

    def _per_example(self, mod, attr, a, g, grp: _Group, unfolded: dict) -> torch.Tensor:
        if isinstance(mod, nn.Linear):
            return self._linear(mod, attr, a, g, grp.local, grp.local_ix)
        if isinstance(mod, nn.Conv2d):
            return self._conv(mod, attr, a, g, grp.local, grp.local_ix, unfolded)
        return self._batchnorm(mod, attr, a, g, grp.local_ix)

    def _dense(self, local: torch.Tensor, numel: int, rows: int) -> bool:
        """Whether to form the layer's full per-example gradient ``[n, C, numel]`` with one
        batched GEMM and pick the entries from it (many entries of the layer, and it fits the
        budget) instead of gathering entry by entry (memory-bound indexing)."""
        return local.numel() * 8 >= numel and 4 * 2 * rows * numel <= self.budget

    def _linear(self, mod, attr, a, g, local, local_ix):
        n, C = g.shape[:2]
        a = a.reshape(n, -1, mod.in_features)  # [n, L, I]
        g = g.reshape(n, C, -1, mod.out_features)  # [n, C, L, O]
        if attr == "bias":
            return g.sum(2)[:, :, local_ix]
        if self._dense(local, mod.weight.numel(), n * C):
            full = torch.einsum("nclo,nli->ncoi", g, a)
            return full.reshape(n, C, -1)[:, :, local_ix]
        out = a.new_empty(n, C, local.numel())
        for i, part in self._chunks(local, n * C, a.shape[1]):
            o, j = part // mod.in_features, part % mod.in_features
            out[:, :, i : i + part.numel()] = (g[..., o] * a[:, None, :, j]).sum(2)
        return out

    def _unfold(self, mod: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
        if mod.padding_mode != "zeros":
            a = F.pad(a, mod._reversed_padding_repeated_twice, mode=mod.padding_mode)
            padding = 0
        else:
            padding = mod.padding
        if isinstance(padding, str):  # 'same' / 'valid'
            raise ConfigError(
                f"Conv2d with padding={padding!r} is not supported in subnetwork Jacobians; "
                "use numeric padding"
            )
        return F.unfold(a, mod.kernel_size, mod.dilation, padding, mod.stride)  # [n, I*k*k, L]

    def _conv(self, mod: nn.Conv2d, attr, a, g, local, local_ix, unfolded: dict):
        n, C = g.shape[:2]
        g = g.flatten(3)  # [n, C, O, L]
        if attr == "bias":
            return g.sum(-1)[:, :, local_ix]
        if id(mod) not in unfolded:  # weight and bias groups share the layer's unfold
            unfolded[id(mod)] = self._unfold(mod, a)
        U = unfolded[id(mod)]
        per_group_in = mod.weight[0].numel()  # (I/G) * kh * kw
        out_per_group = mod.out_channels // mod.groups
        G, L = mod.groups, g.shape[-1]
        if self._dense(local, mod.weight.numel(), n * C):
            # one batched GEMM per (example, group): [C * O/G, L] @ [L, (I/G) k k]
            gg = g.reshape(n, C, G, out_per_group, L).permute(0, 2, 1, 3, 4)
            gg = gg.reshape(n * G, C * out_per_group, L)
            full = torch.bmm(gg, U.reshape(n * G, per_group_in, L).transpose(1, 2))
            full = full.reshape(n, G, C, out_per_group * per_group_in).transpose(1, 2)
            return full.reshape(n, C, -1)[:, :, local_ix]
        if G == 1:
            # the entries' output channels only: one GEMM [C * O', L] @ [L, I k k] per example
            # (compute-bound) beats a gather of n * C * k * L products (memory-bound) as soon
            # as the selected entries are a few percent of those channels' weights
            o_all = local // per_group_in
            chans, pos = torch.unique(o_all, return_inverse=True)
            width = chans.numel() * per_group_in
            if local.numel() * 32 >= width and 4 * 2 * n * C * width <= self.budget:
                gs = g[:, :, chans, :].reshape(n, C * chans.numel(), L)
                full = torch.bmm(gs, U.transpose(1, 2)).reshape(n, C, width)
                return full[:, :, pos * per_group_in + local % per_group_in]
        out = a.new_empty(n, C, local.numel())
        for i, part in self._chunks(local, n * C, L):
            o, j = part // per_group_in, part % per_group_in
            row = (o // out_per_group) * per_group_in + j
            out[:, :, i : i + part.numel()] = (g[:, :, o, :] * U[:, None, row, :]).sum(-1)
        return out

    def _batchnorm(self, mod, attr, a, g, local):
        n, C = g.shape[:2]
        ch = a.shape[1]
        a = a.reshape(n, ch, -1)
        g = g.reshape(n, C, ch, -1)
        if attr == "bias":
            return g.sum(-1)[:, :, local]
        if mod.running_mean is None:
            raise ConfigError(
                "BatchNorm layer without running statistics in the subnetwork: per-example "
                "Jacobians need track_running_stats=True"
            )
        shape = (1, ch, 1)
        xhat = (a - mod.running_mean.view(shape)) / torch.sqrt(
            mod.running_var.view(shape) + mod.eps
        )
        return (g * xhat[:, None]).sum(-1)[:, :, local]


def full_jacobians(model: nn.Module, budget: int, num_classes: int) -> list[SubnetJacobian]:
    """Jacobians over all trainable parameters, in parameter chunks sized so that at least 16
    inputs' Jacobians of one chunk fit a third of ``budget`` bytes."""
    total = n_params(model)
    per = max(1, budget // (4 * 3 * num_classes * 16))
    return [
        SubnetJacobian(model, torch.arange(start, min(start + per, total)), budget)
        for start in range(0, total, per)
    ]


def ggn_diagonal(J: torch.Tensor, p: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``sum_n diag(J_n^T (diag(p_n) - p_n p_n^T) J_n)`` for ``J [n, C, S]``, ``p [n, C]``.

    With ``overwrite=True`` ``J`` is squared in place (and holds ``J**2`` afterwards)."""
    second = torch.bmm(p.unsqueeze(1), J).squeeze(1)  # [n, S]: sum_c p_c J_c
    J2 = J.square_() if overwrite else J.square()
    first = p.reshape(1, -1) @ J2.reshape(-1, J2.shape[-1])
    return first.squeeze(0) - second.square().sum(0)
