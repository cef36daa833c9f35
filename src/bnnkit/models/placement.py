"""Placement-aware inference: the deterministic prefix runs once per input, when that is exact.

A network whose stochastic layers (ensemble members, MC dropout, variational weights, rank-1
factors) sit late computes the same prefix for every member and sample. The body is traced with
``torch.fx`` (stochastic layers are leaves) and its graph split in two: the *prefix* holds every
node that does not depend on a stochastic layer, the *tail* the rest. At prediction the prefix
runs once on the ``[B, ...]`` batch; each prefix value the tail reads (the activations entering
the first stochastic layer, and any skip connection that bypasses it, e.g. the identity of a
residual block whose first convolution is stochastic) is repeated member-major to ``[R*B, ...]``
at the boundary, and the tail runs as before.

Running the prefix once and the tail after it is exact only under two preconditions, which
:func:`split_prefix` checks on the traced graph instead of assuming them:

* **Nothing in the prefix is random, or otherwise depends on being run once per row.** Every
  prefix op must be on an allow-list of ops known to be deterministic (``_FRESH_*`` and
  ``_ALIAS_*`` below, keyed on the function, method name or module type, with conditions on
  their arguments: ``F.dropout`` only with ``training=False``, ``nn.Dropout`` / ``RReLU`` only in
  eval mode, BatchNorm only when it does not update running statistics). An op that is random
  (``torch.rand*``, ``randn_like``, ``bernoulli``, ``F.dropout(training=True)``, ``uniform_``...)
  or merely unknown makes the naive path run. bnnkit's stochastic layers are the tail anyway.
* **No in-place write changes what a reader sees across the split.** The prefix runs in full
  before the tail, and the tail works on repeated copies of the boundary values. Values are
  grouped by may-alias (views, ``getitem``, in-place results share their input's group); the
  split is refused when a tail node writes in place to a group the prefix holds (e.g.
  ``h.add_(block(h))`` around a stochastic block, which ``torch.fx`` records as the next layer
  reading ``h`` before the add), when a prefix node writes to a group after a tail node has
  read it (e.g. ``nn.ReLU(inplace=True)`` on features a stochastic head has read), when the
  input, a parameter or a buffer is written in place, or when an op the tail applies to a
  prefix value is not known. Augmented assignments (``h += y``) and item assignments are
  traced as the in-place ops they are (plain ``torch.fx`` records ``h += y`` as ``h + y``).

A third precondition depends on shapes and is checked on the first input (:func:`run_prefix`):
every value the prefix hands over is computed row by row with the batch on axis 0, so that
repeating the batch repeats it (not so after a softmax, sum or std over the batch, or a
``transpose(0, 1)`` whose other axis has B entries). Buffers are graph inputs, read live.

When a check fails, the body cannot be traced (data-dependent control flow) or assigns
attributes in its forward (``self.ema = ...``: tracing would leave proxies there; the model is
restored), or the prefix hands the tail a value that is neither a ``[B, ...]`` tensor nor a
plain value independent of the batch size (a size such as ``x.shape[-2:]`` for an upsample to
the input size passes unrepeated; ``x.size(0)`` used in a later reshape does not), the model
warns once with the reason
(:class:`PlacementFallback`) and runs the naive way (input repeated at the entry), which is always
exact. An error raised by this module's own code is not taken for an untraceable body: it
propagates. The split is only used in eval mode: in training, BatchNorm's running variance is
updated with the unbiased batch variance, whose correction depends on the batch size. A custom
layer kind marks itself stochastic with ``bnnkit_stochastic = True``.
"""

from __future__ import annotations

import builtins
import inspect
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn.dropout import MCDropout
from ..nn.ensemble import EnsembleModule
from ..nn.variational import _Variational


class PlacementFallback(UserWarning):
    """Placement-aware inference is off for a model; it runs the naive (exact) way."""


def is_stochastic(module: nn.Module) -> bool:
    """A layer whose output differs between members or samples."""
    return isinstance(module, (EnsembleModule, MCDropout, _Variational)) or bool(
        getattr(module, "bnnkit_stochastic", False)
    )


# --- tracing: augmented and item assignments recorded as the in-place ops they are -----------


def augmented(op: str, target: Any, value: Any) -> Any:
    """``target op= value`` as Python runs it (``op`` names an ``operator`` function such as
    ``"iadd"``): in place for a tensor, a new value for a number."""
    return getattr(operator, op)(target, value)


def setitem(target: Any, key: Any, value: Any) -> None:
    """``target[key] = value``."""
    target[key] = value


class _OwnError(Exception):
    """An error raised by this module's tracing hooks while the user's forward was traced: it
    is re-raised as is, not taken for an untraceable body."""


def _own(fn):
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise _OwnError() from e

    return wrapped


class _Proxy(fx.Proxy):
    @_own
    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", setitem, (self, key, value), {})


_AUGMENTED = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul",
              "iand", "ior", "ixor", "ilshift", "irshift")  # fmt: skip

for _op in _AUGMENTED:

    def _method(self, other, _op=_op):
        return self.tracer.create_proxy("call_function", augmented, (_op, self, other), {})

    setattr(_Proxy, f"__{_op}__", _own(_method))


class _Tracer(fx.Tracer):
    # a buffer is a graph input (get_attr), read live: not folded into a constant at tracing
    proxy_buffer_attributes = True

    @_own
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_stochastic(m) or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)


# --- what each op does: allow-lists of deterministic ops, keyed on function, method, module ---
# "fresh" ops return new memory; "alias" ops may return (a view of) an input. Anything not
# listed is unknown: it may be random or write in place, so the naive path runs.

_TORCH_FRESH = """abs absolute acos acosh add addbmm addcdiv addcmul addmm addmv all amax amin
any arange argmax argmin argsort asin asinh atan atan2 atanh baddbmm bmm bucketize cat cdist
ceil clamp clip clone concat concatenate cos cosh count_nonzero cross cummax cummin cumprod
cumsum diff div divide dot einsum eq erf erfc erfinv exp exp2 expm1 eye flip floor floor_divide
fmod full full_like gather ge gt heaviside hypot index_select isfinite isinf isnan kron le lerp
linspace log log10 log1p log2 log_softmax logaddexp logical_and logical_not logical_or
logical_xor logit logsumexp lt masked_fill matmul max maximum mean median min minimum mm mul
multiply mv nan_to_num nanmean nansum ne neg negative norm ones ones_like outer pow prod
quantile reciprocal relu remainder repeat_interleave roll round rsqrt rsub searchsorted sigmoid
sign sin sinh softmax sort sqrt square stack std std_mean sub subtract sum tan tanh tensordot
tile topk tril triu trunc var var_mean where zeros zeros_like conv1d conv2d conv3d layer_norm
group_norm avg_pool1d max_pool1d max_pool2d adaptive_avg_pool1d""".split()

_TORCH_ALIAS = """as_strided atleast_1d atleast_2d atleast_3d broadcast_tensors broadcast_to
chunk detach diagonal dsplit flatten hsplit imag moveaxis movedim narrow permute real reshape
select split squeeze swapaxes swapdims t tensor_split transpose unbind unflatten unsqueeze
view_as_complex view_as_real vsplit""".split()

_F_FRESH = """adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
adaptive_max_pool2d adaptive_max_pool3d avg_pool1d avg_pool2d avg_pool3d bilinear celu conv1d
conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d cosine_similarity elu fold gelu
glu group_norm hardshrink hardsigmoid hardswish hardtanh interpolate layer_norm leaky_relu linear
local_response_norm log_softmax logsigmoid lp_pool1d lp_pool2d max_pool1d max_pool2d max_pool3d
mish normalize one_hot pairwise_distance pixel_shuffle pixel_unshuffle prelu relu relu6 rms_norm
scaled_dot_product_attention selu sigmoid silu softmax softmin softplus softshrink softsign tanh
tanhshrink threshold unfold upsample upsample_bilinear upsample_nearest batch_norm instance_norm
embedding""".split()

_F_ALIAS = """pad dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
rrelu""".split()

_METHOD_FRESH = """abs add addcdiv addcmul addmm all amax amin any argmax argmin argsort baddbmm
bmm ceil clamp clamp_max clamp_min clip clone cos cosh cumprod cumsum diff dim div dot eq erf exp
expm1 flip floor floor_divide fmod frac gather ge gt index_select isfinite isnan le lerp log
log10 log1p log2 log_softmax logical_and logical_not logical_or logsumexp lt masked_fill
masked_select matmul max maximum mean min minimum mm mul mv ndimension ne neg nelement new_full
new_ones new_tensor new_zeros nonzero norm numel outer pow prod reciprocal relu remainder repeat
repeat_interleave roll round rsqrt sigmoid sign sin size softmax sort sqrt square std sub sum
tan tanh tile topk tril triu true_divide trunc var where""".split()

_METHOD_ALIAS = """as_strided bfloat16 bool broadcast_to chunk contiguous cpu cuda detach diagonal
double expand expand_as flatten float half imag int long moveaxis movedim narrow permute real
reshape reshape_as select split squeeze swapaxes swapdims t tensor_split to transpose type
type_as unbind unflatten unfold unsqueeze view view_as""".split()

_OPERATOR_FRESH = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                   operator.mod, operator.pow, operator.matmul, operator.neg, operator.pos,
                   operator.abs, operator.invert, operator.and_, operator.or_, operator.xor,
                   operator.lshift, operator.rshift, operator.eq, operator.ne, operator.lt,
                   operator.le, operator.gt, operator.ge, operator.not_, math.sqrt, math.ceil,
                   math.floor, math.prod)  # fmt: skip
_OPERATOR_ALIAS = (operator.getitem, builtins.getattr)
_TENSOR_ATTRIBUTES = ("T", "mT", "H", "mH", "data", "real", "imag", "grad")

# random whatever their arguments (named in the reason; unknown to the allow-list anyway)
_RANDOM = set(
    """rand rand_like randn randn_like randint randint_like randperm bernoulli
multinomial normal poisson binomial dropout alpha_dropout feature_alpha_dropout rrelu
native_dropout feature_dropout gumbel_softmax empty
empty_like new_empty uniform_ normal_ bernoulli_ random_ exponential_ geometric_ cauchy_
log_normal_""".split()
)
# random unless their ``training`` argument is False
_RANDOM_IN_TRAINING = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                       F.feature_alpha_dropout, F.rrelu}  # fmt: skip


def _by_name(namespace, names) -> dict:
    return {getattr(namespace, n): n for n in names if callable(getattr(namespace, n, None))}


_FUNCTIONS: dict[Any, tuple[str, bool]] = {}  # callable -> (name, aliases)
for _ns, _fresh, _alias, _prefix in ((torch, _TORCH_FRESH, _TORCH_ALIAS, "torch."),
                                     (F, _F_FRESH, _F_ALIAS, "F.")):  # fmt: skip
    _FUNCTIONS.update({f: (_prefix + n, False) for f, n in _by_name(_ns, _fresh).items()})
    _FUNCTIONS.update({f: (_prefix + n, True) for f, n in _by_name(_ns, _alias).items()})
_FUNCTIONS.update({f: (f"{f.__module__}.{f.__name__}", False) for f in _OPERATOR_FRESH})
_FUNCTIONS.update({f: (f"{f.__module__}.{f.__name__}", True) for f in _OPERATOR_ALIAS})

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)  # fmt: skip
_FRESH_MODULES = {
    getattr(nn, n)
    for n in """Linear Bilinear Conv1d Conv2d Conv3d ConvTranspose1d
ConvTranspose2d ConvTranspose3d BatchNorm1d BatchNorm2d BatchNorm3d SyncBatchNorm InstanceNorm1d
InstanceNorm2d InstanceNorm3d LayerNorm GroupNorm RMSNorm LocalResponseNorm MaxPool1d MaxPool2d
MaxPool3d AvgPool1d AvgPool2d AvgPool3d AdaptiveAvgPool1d AdaptiveAvgPool2d AdaptiveAvgPool3d
AdaptiveMaxPool1d AdaptiveMaxPool2d AdaptiveMaxPool3d LPPool1d LPPool2d ReLU ReLU6 LeakyReLU ELU
SELU CELU GELU SiLU Mish Sigmoid Tanh Hardtanh Hardswish Hardsigmoid Softplus Softsign Softshrink
Hardshrink Tanhshrink Threshold LogSigmoid PReLU GLU Softmax Softmax2d LogSoftmax Softmin
PixelShuffle PixelUnshuffle Upsample UpsamplingNearest2d UpsamplingBilinear2d Embedding
CosineSimilarity PairwiseDistance Unfold Fold ChannelShuffle""".split()
    if hasattr(nn, n)
}
_ALIAS_MODULES = {nn.Identity, nn.Flatten, nn.Unflatten, nn.RReLU, *_DROPOUT_MODULES} | {
    getattr(nn, n)
    for n in """ZeroPad1d ZeroPad2d ZeroPad3d ConstantPad1d ConstantPad2d
    ConstantPad3d ReflectionPad1d ReflectionPad2d ReflectionPad3d ReplicationPad1d
    ReplicationPad2d ReplicationPad3d CircularPad1d CircularPad2d CircularPad3d""".split()
    if hasattr(nn, n)
}


@dataclass(frozen=True)
class _Effect:
    what: str  # the op, as a reason names it
    known: bool  # on the allow-list: deterministic given its arguments
    aliases: bool  # the result may share memory with an input
    writes: tuple = ()  # nodes (or values) written in place
    refusal: str | None = None  # why it cannot run once in the prefix (random, state update)
    alias_of: tuple = ()  # the inputs the result may alias (empty: all of them)


def _is_true(v) -> bool:
    """A flag that may be true: True, or a traced value not known before the run."""
    return v is not False and v is not None and v != 0


def _bound(fn, args, kwargs) -> dict:
    try:
        b = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):  # a builtin without a signature, or an odd call
        return dict(kwargs)
    b.apply_defaults()
    return dict(b.arguments)


def _effect(node: fx.Node, modules: dict[str, nn.Module]) -> _Effect:
    """What ``node`` does, for the checks of :func:`split_prefix` (stochastic leaves excepted)."""
    args, kwargs = node.args, node.kwargs
    out = (kwargs["out"],) if kwargs.get("out") is not None else ()
    if node.op == "call_module":
        m = modules[node.target]
        t = type(m)
        torch_nn = t.__module__.startswith("torch.nn")
        what = f"{'nn.' if torch_nn else ''}{t.__name__} at '{node.target}'"
        inplace = bool(getattr(m, "inplace", False))
        refusal = None
        if isinstance(m, (*_DROPOUT_MODULES, nn.RReLU)) and m.training:
            refusal = f"{what} is random in training mode"
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            refusal = f"{what} updates its running statistics in training mode"
        elif isinstance(m, nn.Embedding) and m.max_norm is not None:
            refusal = f"{what} renormalises its weight in place (max_norm)"
        known = t in _FRESH_MODULES or t in _ALIAS_MODULES
        writes = (args[0],) if inplace and args else ()
        if inplace:
            what += " (inplace=True)"
        return _Effect(what, known, t in _ALIAS_MODULES or inplace, writes, refusal, writes)
    if node.op == "call_method":
        name = node.target
        what = f"Tensor.{name}"
        if name in _RANDOM:
            writes = (args[0],) if name.endswith("_") else ()
            return _Effect(what, False, True, writes, f"{what} is random", writes)
        dunder = name.startswith("__") and name.endswith("__")
        inplace = (name.endswith("_") and not dunder) or name in (
            *(f"__{op}__" for op in _AUGMENTED),
            "__setitem__",
        )
        if inplace:
            base = name[:-1]
            known = base in _METHOD_FRESH or base in _METHOD_ALIAS or dunder
            return _Effect(what, known, True, (args[0], *out), alias_of=(args[0],))
        known = name in _METHOD_FRESH or name in _METHOD_ALIAS
        # a known view (view, reshape, transpose...) aliases its tensor, not its other
        # arguments (sizes such as x.size(0), another tensor's shape in view_as); an unknown
        # method may alias any of its inputs
        alias_of = (args[0],) if name in _METHOD_ALIAS and args else ()
        return _Effect(what, known, name not in _METHOD_FRESH, out, alias_of=alias_of)
    # call_function
    fn = node.target
    if fn is augmented:
        return _Effect(f"'{args[0]}' (augmented assignment)", True, True, (args[1],),
                       alias_of=(args[1],))  # fmt: skip
    if fn is setitem:
        return _Effect("item assignment", True, False, (args[0],))
    if fn is builtins.getattr and args[1:2] and args[1] not in _TENSOR_ATTRIBUTES:
        return _Effect(f"getattr(.., {args[1]!r})", True, False)  # metadata: shape, dtype...
    entry = _FUNCTIONS.get(fn)
    name = entry[0] if entry else getattr(fn, "__name__", repr(fn))
    what = entry[0] if entry else f"{getattr(fn, '__module__', None) or ''}.{name}".lstrip(".")
    if entry is None:
        refusal = f"{what} is random" if name in _RANDOM else None
        return _Effect(what, False, True, out, refusal)
    python_fn = getattr(fn, "__module__", "").startswith("torch.nn")  # F.*: has a signature
    bound = _bound(fn, args, kwargs) if python_fn else dict(kwargs)
    refusal = None
    if fn in _RANDOM_IN_TRAINING and _is_true(bound.get("training", fn is not F.rrelu)):
        refusal = f"{what} is random (training={bound.get('training', True)!r})"
    elif fn is F.scaled_dot_product_attention and _is_true(bound.get("dropout_p", 0.0)):
        refusal = f"{what} is random (dropout_p > 0)"
    elif fn in (F.batch_norm, F.instance_norm):
        flag = "training" if fn is F.batch_norm else "use_input_stats"
        if _is_true(bound.get(flag, True)) and bound.get("running_mean") is not None:
            refusal = f"{what} updates its running statistics ({flag}=True)"
    elif fn is F.embedding and bound.get("max_norm") is not None:
        refusal = f"{what} renormalises its weight in place (max_norm)"
    inplace = _is_true(bound.get("inplace", False))
    writes = ((args[0],) if inplace and args else ()) + out
    if inplace:
        what += " (inplace=True)"
    alias_of = writes if writes and not entry[1] else ()  # an in-place result is its target
    return _Effect(what, True, entry[1] or bool(writes), writes, refusal, alias_of)


# --- the split -------------------------------------------------------------------------------


@dataclass
class PrefixSplit:
    """``prefix(x) -> tuple`` of boundary values; ``tail(*values) -> output``."""

    prefix: fx.GraphModule
    tail: fx.GraphModule
    n_prefix_ops: int  # call nodes in the prefix (0: nothing to save)
    checked: bool = False  # the boundary values were found to be computed row by row
    refused: str | None = None  # why they are not (then the naive path runs)


@dataclass(frozen=True)
class NaivePath:
    """The split is refused: the model runs the naive way, and warns once with ``reason``."""

    reason: str


_CALLS = ("call_module", "call_function", "call_method")


def _name(node: fx.Node) -> str:
    return f"'{node.name}'"


def _check(nodes: list[fx.Node], tail: set, modules: dict) -> str | None:
    """Why running the non-tail nodes once, before the tail, would not be exact; None if it is."""
    # may-alias groups (union-find over nodes)
    parent: dict[fx.Node, fx.Node] = {}

    def find(n):
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    effects = {}
    for n in nodes:
        if n.op not in _CALLS or (n.op == "call_module" and is_stochastic(modules[n.target])):
            continue
        e = effects[n] = _effect(n, modules)
        if n not in tail:
            if e.refusal is not None:
                return (
                    f"{e.refusal} (node {_name(n)}, before the first stochastic layer); move it "
                    "after that layer, or into a layer marked bnnkit_stochastic = True"
                )
            if not e.known:
                return (
                    f"{e.what} (node {_name(n)}, before the first stochastic layer) is not known "
                    "to be deterministic (allow-list in bnnkit.models.placement)"
                )
        if e.aliases:
            for i in e.alias_of or n.all_input_nodes:
                if not isinstance(i, fx.Node):
                    continue
                a, b = find(n), find(i)
                if a is not b:
                    parent[a] = b
    fix = "; use the out-of-place form (nn.ReLU(), h = h + y)"
    order = {n: k for k, n in enumerate(nodes)}
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in nodes:
        groups.setdefault(find(n), []).append(n)
    for n, e in effects.items():
        for w in e.writes:
            if not isinstance(w, fx.Node):
                continue
            group = groups[find(w)]
            if any(g.op == "placeholder" for g in group):
                return f"{e.what} (node {_name(n)}) writes to the input in place{fix}"
            if any(g.op == "get_attr" for g in group):
                return f"{e.what} (node {_name(n)}) writes to a parameter or buffer in place{fix}"
            if n in tail and any(g not in tail for g in group):
                return (
                    f"{e.what} (node {_name(n)}, after the first stochastic layer) writes in "
                    f"place to {_name(w)}, a value computed before it{fix}"
                )
            if n not in tail:
                members = set(group)
                for r in nodes[: order[n]]:
                    if r in tail and any(i in members for i in r.all_input_nodes):
                        return (
                            f"{e.what} (node {_name(n)}) writes in place to {_name(w)} after "
                            f"{_name(r)}, which depends on a stochastic layer, has read it{fix}"
                        )
    # an op of the tail that reads a prefix value must be known not to write to it
    prefix_groups = {find(n) for n in nodes if n not in tail}
    for n, e in effects.items():
        if n in tail and not e.known:
            if any(find(i) in prefix_groups for i in n.all_input_nodes):
                return (
                    f"{e.what} (node {_name(n)}) reads a value computed before the first "
                    "stochastic layer and is not known to leave it unchanged"
                )
    return None


def _attributes(body: nn.Module) -> list:
    """Each module's attributes, parameters, buffers and children (what a forward that
    assigns ``self.x = ...`` changes), to restore after tracing."""
    return [
        (name, m, {k: dict(v) if k in _SLOTS else v for k, v in m.__dict__.items()})
        for name, m in body.named_modules(remove_duplicate=False)
    ]


_SLOTS = ("_parameters", "_buffers", "_modules")


def _restore(body: nn.Module, saved: list) -> str | None:
    """Undo the attribute assignments the forward made while it was traced (a buffer set to a
    proxy would break the model); name the first one, None if there was none. The constants
    ``torch.fx`` itself stores on the root (``_tensor_constant*``) stay: the graph reads them."""
    assigned = None
    for name, m, before in saved:
        now = m.__dict__
        for key in list(now):
            if key in _SLOTS:
                slot, old = now[key], before[key]
                changed = [k for k in slot if k not in old or slot[k] is not old[k]]
                changed += [k for k in old if k not in slot]
                if changed:
                    assigned = assigned or f"'{'.'.join(filter(None, (name, changed[0])))}'"
                    slot.clear()
                    slot.update(old)
            elif key not in before:
                if not (m is body and key.startswith("_tensor_constant")):
                    assigned = assigned or f"'{'.'.join(filter(None, (name, key)))}'"
                    del now[key]
            elif now[key] is not before[key]:
                assigned = assigned or f"'{'.'.join(filter(None, (name, key)))}'"
                now[key] = before[key]
    return assigned


def split_prefix(body: nn.Module) -> PrefixSplit | NaivePath | None:
    """The prefix/tail split of ``body``; :class:`NaivePath` with the reason when running the
    prefix once would not be exact (or cannot be checked); None without a stochastic layer."""
    saved = _attributes(body)
    try:
        graph = _Tracer().trace(body)
    except _OwnError as e:  # a bug of this module, not the user's forward: let it surface
        raise e.__cause__ from None
    except Exception as e:  # noqa: BLE001 - the user's forward, whatever it raises
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return NaivePath(
            f"torch.fx cannot trace the body ({type(e).__name__}: {msg[:200]}); data-dependent "
            "control flow is the usual cause"
        )
    finally:
        assigned = _restore(body, saved)
    if assigned:
        return NaivePath(
            f"the forward assigns {assigned} (state kept between calls, which tracing cannot "
            "record)"
        )
    modules = dict(body.named_modules())
    nodes = list(graph.nodes)
    if not any(n.op == "call_module" and is_stochastic(modules[n.target]) for n in nodes):
        return None
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return NaivePath(f"the body's forward takes {len(placeholders)} inputs, not one")
    # nodes that depend on the input, and nodes that depend on a stochastic layer (the tail)
    on_input, tail = set(placeholders), set()
    for n in nodes:
        ins = n.all_input_nodes
        if any(i in on_input for i in ins):
            on_input.add(n)
        stochastic_call = n.op == "call_module" and is_stochastic(modules[n.target])
        if stochastic_call or any(i in tail for i in ins):
            tail.add(n)
    reason = _check(nodes, tail, modules)
    if reason is not None:
        return NaivePath(reason)
    # prefix values the tail reads and that depend on the input: the boundary
    boundary: list[fx.Node] = []
    for n in nodes:
        if n in tail or n.op == "output":
            for i in n.all_input_nodes:
                if i not in tail and i in on_input and i not in boundary:
                    boundary.append(i)
    prefix_graph, env = fx.Graph(), {}
    for n in nodes:
        if n in tail or n.op == "output":
            continue
        env[n] = prefix_graph.node_copy(n, lambda a: env[a])
    prefix_graph.output(tuple(env[b] for b in boundary))
    # the tail: boundary placeholders, the tail nodes, and copies of the input-independent
    # nodes (attributes, constants) it reads; what it does not read is dropped
    tail_graph, tenv = fx.Graph(), {}
    for k, b in enumerate(boundary):
        tenv[b] = tail_graph.placeholder(f"boundary_{k}")
    for n in nodes:
        if n in tenv or n.op == "placeholder":
            continue
        if n in tail or n.op == "output" or n not in on_input:
            tenv[n] = tail_graph.node_copy(n, lambda a: tenv[a])
    n_ops = sum(n.op in _CALLS for n in prefix_graph.nodes)
    return PrefixSplit(fx.GraphModule(body, prefix_graph), fx.GraphModule(body, tail_graph), n_ops)


def run_prefix(split: PrefixSplit, x: torch.Tensor) -> list[torch.Tensor] | NaivePath:
    """Boundary values for ``x``, or :class:`NaivePath` when they cannot be repeated (not all
    ``[B, ...]`` tensors, or not computed row by row): the caller then runs the naive way."""
    if split.refused is not None:
        return NaivePath(split.refused)
    values = split.prefix(x)
    B = x.shape[0]
    for v in values:
        if isinstance(v, torch.Tensor):
            ok = v.dim() >= 1 and v.shape[0] == B
        else:  # sizes, e.g. x.shape[-2:] for an upsample to the input size: checked below
            ok = _is_metadata(v)
        if not ok:
            what = (
                f"a tensor of shape {tuple(v.shape)}"
                if isinstance(v, torch.Tensor)
                else (f"a value of type {type(v).__name__}")
            )
            return NaivePath(
                f"the part before the first stochastic layer hands {what} to the rest, not a "
                f"[B, ...] tensor with B = {B} (e.g. x.size(0) used after that layer)"
            )
    if not split.checked:
        split.refused = _not_row_by_row(split, x, values)
        split.checked = split.refused is None
        if split.refused is not None:
            return NaivePath(split.refused)
    return list(values)


_METADATA = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _is_metadata(v) -> bool:
    """A plain value (number, size, dtype...) that the tail may read unrepeated, provided it
    does not depend on the batch size (:func:`_not_row_by_row` checks that)."""
    if isinstance(v, (tuple, list)):
        return all(_is_metadata(e) for e in v)
    return isinstance(v, _METADATA)


def _not_row_by_row(split: PrefixSplit, x: torch.Tensor, values) -> str | None:
    """Why a boundary value is not computed row by row, batch on axis 0 (row ``b`` from input
    row ``b`` alone: repeating the batch then repeats the value); None when it is. An op that
    mixes the rows (a softmax, sum or std over the batch) or moves the batch axis (a
    ``transpose(0, 1)`` whose other axis happens to have B entries) passes the allow-list and
    the shape check but not this: the prefix runs, once per split, on ``[x, x]`` and on
    ``[x, z]`` with ``z`` other rows, and the first half of every value must not change.
    (``z`` is not a permutation of the rows of ``x``: a softmax over the batch would not see it.)
    A plain value (``values``: the prefix's on ``x``; e.g. ``x.shape[-2:]``) reaches the tail
    unrepeated, so it must be the same on ``[x, x]`` as on ``x``: ``x.size(0)`` is refused. (A
    value equal at B and 2B rows but not at the R x B rows the tail sees, e.g.
    ``x.size(0) < 8``, would pass: the check is by example.)"""
    outputs = next(n for n in split.prefix.graph.nodes if n.op == "output").args[0]
    B = x.shape[0]
    with torch.no_grad():
        same = split.prefix(torch.cat([x, x]))
    for node, v, a in zip(outputs, values, same):
        if not isinstance(v, torch.Tensor) and v != a:
            return (
                f"the part before the first stochastic layer hands the value {_name(node)} = "
                f"{v!r} to the rest, which depends on the batch size ({a!r} for {2 * B} rows), "
                f"not a [B, ...] tensor with B = {B} (e.g. x.size(0) used after that layer)"
            )
    axes = [d for d in range(1, x.dim()) if x.shape[d] > 1]
    others = ([x.roll(1, axes[-1])] if axes else []) + [x[:1].expand_as(x)]
    z = next((o for o in others if not torch.equal(o, x)), None)
    if z is None:  # every row and entry equal: nothing to tell the rows apart by
        return None
    with torch.no_grad():
        other = split.prefix(torch.cat([x, z]))
    for node, a, b in zip(outputs, same, other):
        if not isinstance(a, torch.Tensor):
            continue
        shape_ok = a.dim() >= 1 and a.shape[0] == 2 * B and a.shape == b.shape
        if shape_ok and (a.is_floating_point() or a.is_complex()):
            scale = float(torch.nan_to_num(a[:B].abs(), 0.0, 0.0, 0.0).amax()) if a.numel() else 0
            tol = 64 * torch.finfo(a.dtype).eps
            ok = torch.allclose(a[:B], b[:B], rtol=tol, atol=tol * scale, equal_nan=True)
        else:
            ok = shape_ok and torch.equal(a[:B], b[:B])
        if not ok:
            return (
                f"the value {_name(node)} the part before the first stochastic layer hands to "
                "the rest is not computed row by row with the batch on axis 0 (an op mixes the "
                "rows of the batch, e.g. a softmax, sum or std over it, or moves its axis, e.g. "
                "x.transpose(0, 1)); keep batch-wide ops after the first stochastic layer"
            )
    return None
