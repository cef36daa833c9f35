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
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from ..options import parse_size

SUPPORTED = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)


@dataclass
class ParamSlot:
    """One parameter tensor of the model and where it sits in the flat vector."""

    name: str
    module: nn.Module
    attr: str  # "weight" or "bias"
    offset: int
    numel: int
    # every (module, attribute) that holds this parameter: more than one for tied weights
    owners: tuple = ()

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


def param_slots(model: nn.Module) -> list[ParamSlot]:
    """Flat layout of the trainable parameters (``parameters_to_vector`` order)."""
    owners: dict[int, list] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            seen = owners.setdefault(id(p), [])
            if not any(m is mod and a == pname for m, a, _ in seen):
                seen.append((mod, pname, f"{mname}.{pname}" if mname else pname))
    slots, offset = [], 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        mod, attr, name = owners[id(p)][0]
        pairs = tuple((m, a) for m, a, _ in owners[id(p)])
        slots.append(ParamSlot(name, mod, attr, offset, p.numel(), pairs))
        offset += p.numel()
    return slots


def param_fingerprint(model: nn.Module) -> tuple[float, float]:
    """Two float64 sums over every parameter and floating buffer (a weighted sum with weights
    ``1 + i mod 1021`` and the sum of squares): any write changes them, whether through the
    autograd-visible tensor or through ``.data`` (which bumps no version counter)."""
    a = b = 0.0
    offset = 0
    for t in [*model.parameters(), *model.buffers()]:
        if not t.is_floating_point():
            continue
        flat = t.detach().reshape(-1).double()
        w = torch.arange(offset, offset + flat.numel(), device=flat.device, dtype=torch.float64)
        a += float(flat @ (w.remainder_(1021).add_(1)))
        b += float(flat @ flat)
        offset += flat.numel()
    return a, b


class Workspace:
    """One reusable float buffer for Jacobian chunks, shared by every :class:`SubnetJacobian`
    of a fit (the chunk Jacobians of a diagonal Laplace): retained memory is one chunk's
    Jacobian, not one per parameter chunk. Fresh large allocations are page-faulted in on every
    chunk on CPU, which is why a buffer is kept at all."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def zeros(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        size = math.prod(shape)
        buf = self.buf
        if (
            buf is None
            or buf.numel() < size
            or buf.device != like.device
            or buf.dtype != like.dtype
        ):
            buf = self.buf = like.new_empty(size)
        return buf[:size].view(shape).zero_()


def logits_of(output) -> torch.Tensor:
    """The logits tensor of a model's output: a tensor as it is, the first element of a tuple or
    list (the convention of models returning ``(logits, extras...)``), a mapping's ``'logits'``
    entry, or an object's ``.logits`` attribute."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        raise InputError(
            f"the model returned a mapping with keys {sorted(map(str, output))}; bnnkit needs a "
            "'logits' entry [batch, classes], or wrap the model so it returns the logits tensor"
        )
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    raise InputError(
        f"the model returned a {type(output).__name__}; bnnkit needs a logits tensor "
        "[batch, classes] (or a tuple whose first element, or a mapping whose 'logits' entry, "
        "is one): wrap the model so it returns the logits"
    )


def check_eval(model: nn.Module) -> None:
    """Per-example derivatives need a deterministic model whose examples do not interact:
    every module in eval mode and every BatchNorm on its running statistics."""
    modules = list(model.named_modules())
    for name, mod in modules:
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and (
            mod.training or mod.running_mean is None
        ):
            raise ConfigError(
                f"BatchNorm layer {name or type(mod).__name__!r} normalises with batch "
                "statistics (training mode or track_running_stats=False), which couples the "
                "examples of a batch: per-example Jacobians need running statistics; call "
                "model.eval() on a model whose BatchNorm layers track running statistics"
            )
    training = [(n, m) for n, m in modules if m.training]
    if training:
        leaves = [(n, m) for n, m in training if not any(True for _ in m.children())]
        name, mod = (leaves or training)[0]
        raise ConfigError(
            f"module {name or type(mod).__name__!r} is in training mode; per-example Jacobians "
            "need a deterministic model: call model.eval() first"
        )


def flat_params(model_or_params) -> torch.Tensor:
    """The trainable parameters as one detached vector (``parameters_to_vector`` order), from
    a model or an iterable of parameters."""
    params = (
        model_or_params.parameters()
        if isinstance(model_or_params, nn.Module)
        else (model_or_params)
    )
    return torch.cat([p.detach().reshape(-1) for p in params if p.requires_grad])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unsupported(slot: ParamSlot) -> str | None:
    """Why subnetwork Jacobians cannot cover ``slot``'s parameter (None: they can): every layer
    using it must be a Linear, Conv2d or BatchNorm, all as the same role (weight or bias)."""
    for mod, _ in slot.owners:
        if not isinstance(mod, SUPPORTED):
            return (
                f"subnetwork includes parameter {slot.name!r} of a {type(mod).__name__} layer; "
                "subnetwork Jacobians support Linear, Conv2d and BatchNorm layers: choose "
                "indices in those"
            )
    if len({a for _, a in slot.owners}) > 1:
        return (
            f"parameter {slot.name!r} is both a weight and a bias of different layers; subnetwork "
            "Jacobians cannot handle that tying: leave it out of the subnetwork"
        )
    return None


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


@dataclass
class _Call:
    """One call of an involved layer during a recorded forward pass."""

    a: torch.Tensor  # its input (detached; shares the version counter)
    a_version: int
    out: torch.Tensor  # its output, a node of the graph
    out_version: int
    g: torch.Tensor | None = None  # d f_c / d out for every class [n, C, ...]
    U: torch.Tensor | None = None  # a convolution's unfolded input, shared by weight and bias


def parse_budget(budget) -> int:
    """Bytes from an int or a string like '512MB', '2GB'."""
    value = parse_size(budget)
    if value <= 0:
        raise InputError(f"memory budget must be a positive size like '2GB', got {budget!r}")
    return value


class SubnetJacobian:
    """Jacobians of ``model``'s logits ``[n, C]`` with respect to ``indices`` (flat).

    Works on any classifier built from ``Linear`` / ``Conv2d`` / ``BatchNorm`` layers whatever
    else it does around them: in-place ops on a layer's output (``nn.ReLU(inplace=True)``,
    ``out += identity``) are detected through the tensor's version counter and the output is
    then recorded before they touch it; a layer applied several times (or a parameter shared
    by several layers) sums the contributions of every call. The first chunk is checked
    against plain autograd (a random projection over the batch, so per-example errors cannot
    cancel): a model that uses a parameter outside its layer's ``forward`` (a functional call,
    a hand-written layer) gets a :class:`ConfigError` naming the layer instead of a wrong
    answer. ``verify=False`` skips that check.
    """

    def __init__(
        self,
        model: nn.Module,
        indices,
        memory_budget="2GB",
        verify: bool = True,
        workspace: Workspace | None = None,
    ):
        self.model = model
        self.workspace = workspace or Workspace()
        self.slots = param_slots(model)
        self.total = sum(s.numel for s in self.slots)
        self.indices = check_indices(indices, self.total)
        self.budget = parse_budget(memory_budget)
        self._work_cache: dict = {}
        self.verify = bool(verify)
        self._verified = False
        self._clone_out: set[int] = set()  # layers whose outputs later ops modify in place
        self.groups: list[_Group] = []
        offsets = torch.tensor([s.offset for s in self.slots])
        which = torch.searchsorted(offsets, self.indices, right=True) - 1
        for k in torch.unique(which).tolist():
            slot = self.slots[k]
            mask = which == k
            cols = torch.nonzero(mask).flatten()
            why = unsupported(slot)
            if why is not None:
                raise ConfigError(why)
            local = self.indices[mask] - slot.offset
            self.groups.append(_Group(slot, local, cols, _as_slice(local), _as_slice(cols)))
        self.modules = list({id(m): m for g in self.groups for m, _ in g.slot.owners}.values())

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

    def _name(self, mod: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is mod:
                return name or type(mod).__name__
        return type(mod).__name__

    @contextlib.contextmanager
    def _recording(self, store: dict):
        """Forward hooks that record, per call of every involved layer, its input and its
        output with their version counters (a clone goes downstream for layers whose output is
        known to be modified in place later, so that the recorded one stays a graph node)."""
        handles = []
        for mod in self.modules:

            def hook(m, inputs, output):
                if not isinstance(output, torch.Tensor):
                    return None
                a = inputs[0].detach()
                store.setdefault(id(m), []).append(_Call(a, a._version, output, output._version))
                return output.clone() if id(m) in self._clone_out else None

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

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Forward with recording; re-run once with output clones where a later op modified a
        recorded output in place (its version moved), refuse if an input was."""
        for _ in range(2):
            store: dict = {}
            with self._recording(store):
                f = logits_of(self.model(x))
            moved = False
            for mod in self.modules:
                for call in store.get(id(mod), []):
                    if call.a._version != call.a_version:
                        raise ConfigError(
                            f"the input of layer {self._name(mod)!r} is modified in place after "
                            "the layer has used it; its per-example derivatives cannot be "
                            "recovered (nor can autograd differentiate it): make that operation "
                            "out of place"
                        )
                    if call.out._version != call.out_version:
                        self._clone_out.add(id(mod))
                        moved = True
            if not moved:
                return f, store
        raise ConfigError("layer outputs keep being modified in place; cannot record them")

    def logits_and_jacobian(
        self, x: torch.Tensor, reuse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f [n, C], J [n, C, S])`` for one chunk of inputs (float32).

        With ``reuse=True`` ``J`` lives in a buffer kept by this object and overwritten by the
        next call (callers that consume it at once, in place if they like): large fresh
        allocations are page-faulted in on every chunk, which dominated the cost on CPU.

        The chunk is worked through in pieces whose intermediate work (every involved layer's
        recorded input, its per-class output gradients and a convolution's unfolded input, all
        per input) fits the memory budget, measured on one input the first time an input shape
        is seen: a chunk sized for ``J`` alone would hold ~100 MB per input of such work on a
        ResNet-18."""
        check_eval(self.model)
        step = self._work_rows(x)
        fs, J = [], None
        for i in range(0, len(x), step):
            xb = x[i : i + step]
            f, store, calls = self._record_with_grads(xb)
            if J is None:
                n, C = len(x), f.shape[1]
                J = self._zeros(f, n, C) if reuse else f.new_zeros(n, C, self.size)
            self._fill(J[i : i + len(xb)], store)
            fs.append(f.detach())
            del store, calls
        f = torch.cat(fs)
        if self.verify and not self._verified:
            self._check_against_autograd(x, J)
            self._verified = True
        return f, J

    def _record_with_grads(self, x: torch.Tensor):
        """Recorded forward, then ``d f_c / d out`` of every involved call for every class (one
        backward pass per class), stored as ``call.g [n, C, ...]``."""
        with torch.enable_grad():
            f, store = self._forward(x)
            if f.dim() != 2:
                raise InputError(
                    f"the model must return logits [batch, classes], got {tuple(f.shape)}"
                )
            C = f.shape[1]
            calls = [c for m in self.modules for c in store.get(id(m), [])]
            outs = [c.out for c in calls]
            per_class: list[list] = [[] for _ in calls]
            if outs and f.requires_grad:
                for c in range(C):
                    g_outs = torch.autograd.grad(
                        f[:, c].sum(), outs, retain_graph=c < C - 1, allow_unused=True
                    )
                    for k, g in enumerate(g_outs):
                        per_class[k].append(g)
        for call, gs in zip(calls, per_class):
            call.g = None if not gs or gs[0] is None else torch.stack([g.detach() for g in gs], 1)
        return f, store, calls

    def _fill(self, J: torch.Tensor, store: dict) -> None:
        """Write every group's per-example derivatives into ``J [n, C, S]`` (a view)."""
        for grp in self.groups:
            live = [
                (mod, call)
                for mod, _ in grp.slot.owners
                for call in store.get(id(mod), [])
                if call.g is not None  # calls that do not influence the logits add nothing
            ]
            if not live:
                continue
            target = J[:, :, grp.cols_ix]
            if len(live) == 1 and self._outer_into(live[0][0], grp, live[0][1], target):
                continue
            total = None
            for mod, call in live:
                part = self._per_example(mod, grp, call)
                total = part if total is None else total.add_(part)
            J[:, :, grp.cols_ix] = total

    def _work_rows(self, x: torch.Tensor) -> int:
        """Inputs per piece so that a piece's intermediate work fits the budget (see
        :meth:`logits_and_jacobian`); measured once per input shape and dtype."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        rows = self._work_cache.get(key)
        if rows is None:
            _, store, calls = self._record_with_grads(x[:1])
            per = 0
            for call in calls:
                per += call.a.numel() + call.out.numel()
                if call.g is not None:
                    per += call.g.numel()
            for mod in self.modules:
                if isinstance(mod, nn.Conv2d):
                    for call in store.get(id(mod), []):
                        L = call.out[0, 0].numel()
                        # its unfolded input (the dense path's full per-example gradient is
                        # only taken when it fits the budget by itself)
                        per += (mod.in_channels // mod.groups) * math.prod(mod.kernel_size) * L
            per_bytes = max(1, 2 * per * x.element_size())  # x2: products and temporaries
            rows = self._work_cache[key] = max(1, self.budget // per_bytes)
        return rows

    def _check_against_autograd(self, x: torch.Tensor, J: torch.Tensor) -> None:
        """For every parameter tensor of the subnetwork, compare ``sum_b w_b J[b, :, k] v_k``
        with the forward-mode derivative of ``sum_b w_b f(x_b)`` along ``v`` (random ``w`` and
        ``v``, so that errors in single examples or entries cannot cancel): one forward pass
        per parameter tensor, no per-class backward and no full-size gradient."""
        from torch.func import functional_call, jvp

        x, J = x[:16], J[:16]  # a few examples suffice; each costs a forward pass
        gen = torch.Generator(device="cpu").manual_seed(0)
        w = torch.randn(J.shape[0], generator=gen, dtype=torch.float64)
        tol = 1e-7 if J.dtype == torch.float64 else 2e-3
        for grp in self.groups:
            p = grp.slot.param
            v = torch.randn(grp.local.numel(), generator=gen, dtype=torch.float64)
            tangent = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            tangent[grp.local.to(p.device)] = v.to(p.device, p.dtype)

            def f(theta, name=grp.slot.name):
                return logits_of(functional_call(self.model, {name: theta}, (x,)))

            try:
                with torch.no_grad():
                    _, df = jvp(f, (p.detach(),), (tangent.view_as(p),))
                ref = (w.to(df.device)[:, None] * df.double()).sum(0)  # [C]
            except (RuntimeError, NotImplementedError):
                # an op without a forward-mode formula (e.g. a custom autograd.Function): the
                # same directional derivative by reverse mode, one backward per class
                ref = self._reverse_directional(x, w, grp, v)
            Jv = J[:, :, grp.cols_ix].double() @ v.to(J.device)  # [n, C]
            ours = (w.to(J.device)[:, None] * Jv).sum(0)
            scale = max(
                float(ref.abs().max()),
                float((w.abs().to(J.device)[:, None] * Jv.abs()).sum(0).max()),
            )
            err = float((ours - ref.to(ours.device)).abs().max())
            if err > tol * scale or (scale == 0 and err > 0):
                layer = grp.slot.name.rsplit(".", 1)[0] if "." in grp.slot.name else grp.slot.name
                raise ConfigError(
                    f"per-example Jacobians of parameter {grp.slot.name!r} disagree with "
                    f"autograd (relative error {err / max(scale, 1e-300):.2g}): the model uses "
                    f"it outside the standard forward of layer {layer!r} (a functional call "
                    "such as F.linear(x, layer.weight), a custom forward, or examples that "
                    "interact); call the layer module itself, or leave its parameters out of "
                    "the subnetwork"
                )

    def _reverse_directional(self, x, w, grp: _Group, v) -> torch.Tensor:
        p = grp.slot.param
        flag = p.requires_grad
        p.requires_grad_(True)
        try:
            with torch.enable_grad():
                f = logits_of(self.model(x))
                out = []
                for c in range(f.shape[1]):
                    (g,) = torch.autograd.grad(
                        (f[:, c] * w.to(f.device, f.dtype)).sum(), p,
                        retain_graph=c < f.shape[1] - 1, allow_unused=True,
                    )  # fmt: skip
                    g = torch.zeros_like(p) if g is None else g
                    out.append(g.reshape(-1)[grp.local.to(p.device)].double().cpu() @ v)
        finally:
            p.requires_grad_(flag)
        return torch.stack(out)

    def _zeros(self, like: torch.Tensor, n: int, C: int) -> torch.Tensor:
        return self.workspace.zeros(like, (n, C, self.size))

    @staticmethod
    def _outer_into(mod, grp: _Group, call: _Call, target: torch.Tensor) -> bool:
        """A whole Linear weight on flat inputs: its per-example derivative is the outer
        product ``g a^T``; write it straight into ``J`` (no [n, C, O, I] temporary)."""
        if not (
            isinstance(mod, nn.Linear)
            and grp.slot.attr == "weight"
            and isinstance(grp.local_ix, slice)
            and isinstance(grp.cols_ix, slice)
            and grp.local.numel() == mod.weight.numel()
            and call.a.dim() == 2
        ):
            return False
        a, g = call.a, call.g
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

    def _per_example(self, mod, grp: _Group, call: _Call) -> torch.Tensor:
        attr, a, g = grp.slot.attr, call.a, call.g
        if isinstance(mod, nn.Linear):
            return self._linear(mod, attr, a, g, grp.local, grp.local_ix)
        if isinstance(mod, nn.Conv2d):
            return self._conv(mod, attr, call, grp.local, grp.local_ix)
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

    def _conv(self, mod: nn.Conv2d, attr, call: _Call, local, local_ix):
        a, g = call.a, call.g
        n, C = g.shape[:2]
        g = g.flatten(3)  # [n, C, O, L]
        if attr == "bias":
            return g.sum(-1)[:, :, local_ix]
        if call.U is None:  # weight and bias groups share the call's unfold
            call.U = self._unfold(mod, a)
        U = call.U
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
    shared = Workspace()
    return [
        SubnetJacobian(model, torch.arange(start, min(start + per, total)), budget,
                       workspace=shared)
        for start in range(0, total, per)
    ]  # fmt: skip


def ggn_diagonal(J: torch.Tensor, p: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``sum_n diag(J_n^T (diag(p_n) - p_n p_n^T) J_n)`` for ``J [n, C, S]``, ``p [n, C]``.

    With ``overwrite=True`` ``J`` is squared in place (and holds ``J**2`` afterwards)."""
    second = torch.bmm(p.unsqueeze(1), J).squeeze(1)  # [n, S]: sum_c p_c J_c
    J2 = J.square_() if overwrite else J.square()
    first = p.reshape(1, -1) @ J2.reshape(-1, J2.shape[-1])
    return first.squeeze(0) - second.square().sum(0)
