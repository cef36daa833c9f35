"""`UQModel`, the runtime object of every method, and the method registry.

A method is a recipe: which layers become which kind (a placement plan through
:func:`bnnkit.bayesify`), how many members or samples, and, for post-hoc methods, how to fit
on validation data after training. Every method produces a :class:`UQModel` whose
``predict(x)`` returns a :class:`~bnnkit.Predictive`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import io
from ..convert import bayesify
from ..errors import CheckpointError, ConfigError, unknown_name
from ..models import Stacked, build_model, check_images
from ..nn import aux_loss, count_parameters, kl_divergence
from ..nn.dropout import MC_DROPOUT_OPTIONS
from ..nn.ensemble import BATCH_ENSEMBLE_OPTIONS
from ..nn.lpbnn import LPBNN_OPTIONS
from ..nn.rank1 import RANK1_OPTIONS
from ..nn.variational import VARIATIONAL_OPTIONS
from ..options import Option, OptionTable
from ..predictive import Predictive

#: what a network predicts: one label per image, or one per pixel
TASKS = ("classification", "segmentation")


@dataclass
class ModelSpec:
    """What is needed to rebuild a network: architecture and data geometry.

    ``task``: ``"classification"`` (logits ``[B, C]``, inputs of exactly ``input_shape``) or
    ``"segmentation"`` (logits ``[B, C, H, W]`` at the input's size, inputs with
    ``input_shape[0]`` channels and any height and width; ``input_shape`` is the data set's)."""

    arch: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    arch_options: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")

    @property
    def accepts(self) -> tuple:
        """The input shape ``predict`` checks (``None``: any size on that axis)."""
        if self.task == "segmentation":
            return (self.input_shape[0], None, None)
        return tuple(self.input_shape)

    def build(self) -> nn.Module:
        return build_model(
            self.arch,
            self.input_shape,
            self.num_classes,
            mean=self.mean,
            std=self.std,
            **self.arch_options,
        )


class UQModel(nn.Module):
    """A network returning logits ``[S, B, C]`` plus what prediction needs.

    ``forward(x, samples)`` is the training-time call (one stochastic pass per member);
    ``predict(x)`` runs in eval mode with ``eval_samples`` passes per member, applies the
    (post-hoc) temperature and returns a Predictive.
    """

    def __init__(
        self,
        net: nn.Module,
        method: str,
        options: dict[str, Any],
        spec: ModelSpec,
        eval_samples: int = 1,
    ) -> None:
        super().__init__()
        self.net = net
        self.method = method
        self.options = dict(options)
        self.spec = spec
        self.eval_samples = eval_samples
        self.register_buffer("temperature", torch.ones(()))
        #: a fitted Laplace approximation of ``net`` (post-hoc Laplace methods), else None
        self.posterior = None

    @property
    def members(self) -> int:
        return getattr(self.net, "members", 1)

    @property
    def data_streams(self) -> int:
        """Independent data orders training feeds this model: one per member for a deep
        ensemble with ``data_order='independent'``, else 1 (every member sees the same batch)."""
        return self.members if self.options.get("data_order") == "independent" else 1

    def forward(self, x: torch.Tensor, samples: int = 1) -> torch.Tensor:
        return self.net(x, samples)

    def kl(self) -> torch.Tensor:
        return kl_divergence(self.net)

    def aux_loss(self) -> torch.Tensor:
        """Extra training losses of the layers (LP-BNN's VAE terms); 0 for most methods."""
        return aux_loss(self.net)

    def num_parameters(self) -> int:
        return count_parameters(self.net)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 1024, samples: int | None = None):
        """Eval-mode logits ``[S, B, C]`` (segmentation: ``[S, B, C, H, W]``; temperature not
        applied).

        ``batch_size`` counts rows of the folded batch (inputs x members x samples), so
        memory stays bounded whatever the number of samples.
        """
        check_images(x, self.spec.accepts)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        S = self.eval_samples if samples is None else samples
        step = max(1, batch_size // (S * self.members))
        try:
            outs = [
                self.net(x[i : i + step].to(device), S).float().cpu()
                for i in range(0, len(x), step)
            ]
        finally:
            self.train(was_training)
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> Predictive:
        """Per-member probabilities for float images ``x [B, C, H, W]`` in [0, 1]:
        ``[S, B, C]``, or ``[S, B, C, H, W]`` for a segmentation model (see
        :func:`bnnkit.evaluate_segmentation` for maps accumulated member by member within a
        memory budget)."""
        if self.posterior is not None:
            check_images(x, self.spec.accepts)
            self.eval()
            out = self.posterior.predictive(
                x, link=self.options.get("link", "probit"), n_samples=self.eval_samples
            )
        else:
            logits = self.logits(x, batch_size)
            self._check_output(x, logits)
            out = Predictive.from_logits(logits, self.temperature.cpu())
        if not torch.isfinite(out.probs).all():
            raise ConfigError(
                "the model produced NaN/inf probabilities; training diverged (try a lower "
                "learning rate) or the checkpoint is damaged"
            )
        return out

    @torch.no_grad()
    def member_probs(self, x: torch.Tensor, max_bytes: int):
        """Per-member probabilities of ``x`` in groups ``[s, B, C, ...]`` whose size stays
        within about ``max_bytes``: everything at once (``predict``) when it fits, else one
        stochastic pass of all members at a time (a post-hoc posterior: a few of its samples
        at a time). Feed them to :func:`bnnkit.metrics.uncertainty_maps` for mean, entropy and
        mutual-information maps that never hold ``[S, B, C, H, W]`` at once. Deterministic
        members give the same maps whichever way; sampled ones (MC dropout masks, a posterior's
        draws) are other draws from the same predictive when the grouping changes, so a
        sampled method's metrics move within their Monte Carlo error with the memory budget."""
        S = self.eval_samples * self.members
        per_member = 4 * len(x) * self.spec.num_classes
        for d in x.shape[2:] if self.spec.task == "segmentation" else ():
            per_member *= d
        if S * per_member <= max_bytes or S == 1:
            yield self.predict(x).probs
            return
        if self.posterior is not None:
            group = max(1, max_bytes // per_member)
            link = self.options.get("link", "probit")
            for i, start in enumerate(range(0, self.eval_samples, group)):
                n = min(group, self.eval_samples - start)
                out = self.posterior.predictive(x, link=link, n_samples=n, seed=i)
                yield out.probs
            return
        for _ in range(self.eval_samples):
            logits = self.logits(x, samples=1)
            self._check_output(x, logits)
            yield Predictive.from_logits(logits, self.temperature.cpu()).probs

    def _check_output(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """The network's output has the task's shape: ``[S, B, C]`` or ``[S, B, C, H, W]`` at
        the input's size, with the spec's number of classes."""
        spec = self.spec
        if spec.task == "segmentation":
            want = f"[S, B, {spec.num_classes}, {x.shape[-2]}, {x.shape[-1]}]"
            ok = logits.dim() == 5 and logits.shape[2] == spec.num_classes
            ok = ok and tuple(logits.shape[-2:]) == tuple(x.shape[-2:])
            fix = ("a segmentation network maps [B, 3, H, W] to logits [B, C, H, W] at the "
                   "input's size (upsample its output)")  # fmt: skip
        else:
            want = f"[S, B, {spec.num_classes}]"
            ok = logits.dim() == 3 and logits.shape[2] == spec.num_classes
            fix = "a classifier maps [B, ...] to logits [B, C]"
        if not ok:
            raise ConfigError(
                f"the {spec.arch} network returned {tuple(logits.shape)} for input "
                f"{tuple(x.shape)}, expected {want}: {fix}"
            )

    # ---------------------------------------------------------------- persistence
    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "options": self.options,
            "spec": {
                "arch": self.spec.arch,
                "input_shape": list(self.spec.input_shape),
                "num_classes": self.spec.num_classes,
                "mean": list(self.spec.mean),
                "std": list(self.spec.std),
                "arch_options": self.spec.arch_options,
                "task": self.spec.task,
            },
            "eval_samples": self.eval_samples,
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Weights (safetensors) plus the recipe to rebuild them (JSON inside the file)."""
        blob = {"describe": self.describe(), "extra": extra or {}, "state_dict": self.state_dict()}
        if self.posterior is not None:
            blob["posterior"] = self.posterior.state()
        io.save(blob, path, kind="uqmodel")

    @staticmethod
    def load(path: str | Path, map_location="cpu") -> UQModel:
        blob = io.load(path, kind="uqmodel")
        d = blob["describe"]
        s = d["spec"]
        spec = ModelSpec(
            s["arch"],
            tuple(s["input_shape"]),
            s["num_classes"],
            tuple(s["mean"]),
            tuple(s["std"]),
            s.get("arch_options", {}),
            s.get("task", "classification"),
        )
        model = build_method(d["method"], spec, d["options"])
        try:
            model.load_state_dict(blob["state_dict"])
        except RuntimeError as e:
            raise CheckpointError(
                f"{path} does not match the {d['method']} / {s['arch']} model it describes: "
                f"{str(e).splitlines()[0]}"
            ) from e
        if blob.get("posterior") is not None:
            from ..laplace import laplace_from_state

            model.posterior = laplace_from_state(model, blob["posterior"], d["options"])
            model.eval_samples = int(d.get("eval_samples", model.eval_samples))
        return model.to(map_location)


# -------------------------------------------------------------------- registry


@dataclass
class Method:
    name: str
    build: Callable[[ModelSpec, dict[str, Any]], UQModel]
    #: every option of the method, declared once (type, range or choices, default, help)
    options: OptionTable
    summary: str
    #: post-hoc methods start from a trained model of this method and fit on validation data
    posthoc_of: str | None = None
    fit: Callable[..., None] | None = None
    #: training-loss options the routine reads (kl_weight, ...)
    train_options: tuple[str, ...] = ()
    #: the tasks (ModelSpec.task) the method has a form for
    tasks: tuple[str, ...] = TASKS
    #: ``check(model, bundle)``: the method's preconditions on a built, untrained model
    #: (e.g. a Laplace's head), run before anything is trained or written
    check: Callable[..., None] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        return self.options.defaults


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown_name("method", name, METHODS)
    return METHODS[name]


def method_options(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's options, validated against its table, defaults filled in."""
    return get_method(name).options.resolve(options)


def _default(option: Option, value) -> Option:
    """A layer kind's option with the method's own default."""
    return dataclasses.replace(option, default=value)


MEMBERS = Option("members", "int", 4, "ensemble members", low=2)
SAMPLES = Option("samples", "int", 16, "stochastic passes per member at prediction", low=1)
KL_WEIGHT = Option("kl_weight", "float", 1.0, "weight of KL / N in the loss", low=0.0)
ENSEMBLE_BN = Option(
    "ensemble_batchnorm", "bool", False, "per-member BatchNorm statistics and affine parameters"
)


def build_method(name: str, spec: ModelSpec, options: dict[str, Any] | None = None) -> UQModel:
    m = get_method(name)
    if spec.task not in m.tasks:
        fit = [k for k, v in METHODS.items() if spec.task in v.tasks]
        raise ConfigError(
            f"method {name!r} has no {spec.task} form; for a {spec.task} model use one of: "
            f"{', '.join(fit)}"
        )
    if m.posthoc_of is not None:
        base = get_method(m.posthoc_of)
        opts = method_options(name, options)
        model = base.build(spec, method_options(base.name, {}))
        model.method, model.options = name, opts
        return model
    opts = method_options(name, options)
    return m.build(spec, opts)


# -------------------------------------------------------------------- the baselines


def _linear_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]


def _build_deterministic(spec, opts):
    return UQModel(bayesify(spec.build(), {"*": "deterministic"}), "deterministic", opts, spec)


def _build_mc_dropout(spec, opts):
    base = spec.build()
    # before every Linear layer; a network without any (a dense-prediction network) gets
    # channel dropout before every Conv2d: MC dropout over the whole network
    names = _linear_names(base) or [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ConfigError(
            f"mc_dropout needs Linear or Conv2d layers to put dropout before; {spec.arch} has none"
        )
    plan = {name: "mc_dropout" for name in names}
    net = bayesify(base, plan, options={"mc_dropout": {"p": opts["p"]}})
    net.prefix_once = opts["prefix_once"]
    return UQModel(net, "mc_dropout", opts, spec, eval_samples=opts["samples"])


def _build_deep_ensemble(spec, opts):
    nets = [bayesify(spec.build(), {"*": "deterministic"}) for _ in range(opts["members"])]
    return UQModel(Stacked(nets), "deep_ensemble", opts, spec)


def _rank1_family(kind: str, layer_keys: tuple[str, ...]):
    """Builder for a method that converts every layer to one kind of the rank-1 family."""

    def build(spec, opts):
        net = bayesify(
            spec.build(),
            {"*": kind},
            members=opts["members"],
            ensemble_batchnorm=opts["ensemble_batchnorm"],
            options={kind: {k: opts[k] for k in layer_keys}},
        )
        return UQModel(net, kind, opts, spec, eval_samples=opts.get("samples", 1))

    return build


_build_batch_ensemble = _rank1_family("batch_ensemble", tuple(BATCH_ENSEMBLE_OPTIONS.options))
_build_rank1 = _rank1_family("rank1", tuple(RANK1_OPTIONS.options))
_build_lpbnn = _rank1_family("lpbnn", tuple(LPBNN_OPTIONS.options))


def _build_mfvi(spec, opts):
    net = bayesify(
        spec.build(),
        {"*": "variational"},
        options={"variational": {k: opts[k] for k in VARIATIONAL_OPTIONS.options}},
    )
    return UQModel(net, "mfvi", opts, spec, eval_samples=opts["samples"])


_M = "method "


def _rank1_family_table(name: str, kind_table: OptionTable, samples: bool, **defaults):
    """members (+ samples) + the kind's layer options (with method defaults) + extras."""
    opts = [MEMBERS]
    if samples:
        opts.append(_default(SAMPLES, 4))
    for o in kind_table:
        opts.append(_default(o, defaults[o.name]) if o.name in defaults else o)
    opts.append(ENSEMBLE_BN)
    if name == "rank1":
        opts.append(KL_WEIGHT)
    return OptionTable(_M + repr(name), opts, kind_table.checks)


register(
    Method(
        "deterministic",
        _build_deterministic,
        OptionTable(_M + "'deterministic'", []),
        "one network, softmax outputs",
    )
)
register(
    Method(
        "mc_dropout",
        _build_mc_dropout,
        OptionTable(
            _M + "'mc_dropout'",
            [
                dataclasses.replace(
                    MC_DROPOUT_OPTIONS["p"],
                    default=0.25,
                    nullable=False,
                    help="drop probability before every Linear layer (a network without Linear "
                    "layers: channel dropout before every Conv2d)",
                ),
                SAMPLES,
                Option(
                    "prefix_once",
                    "bool",
                    True,
                    "at prediction, run the layers before the first dropout once per input "
                    "(false: every pass runs the whole network, as MC dropout is usually run; "
                    "same function, more time)",
                ),
            ],
        ),
        "dropout before every Linear layer, kept on at test time (Gal & Ghahramani, 2016)",
    )
)
register(
    Method(
        "deep_ensemble",
        _build_deep_ensemble,
        OptionTable(
            _M + "'deep_ensemble'",
            [
                MEMBERS,
                Option(
                    "data_order",
                    "choice",
                    "independent",
                    "independent: each member sees the data in "
                    "its own order (and its own augmentation), as separately trained networks do; "
                    "shared: every member sees the same batches",
                    choices=("independent", "shared"),
                ),
            ],
        ),
        "independently initialised networks trained jointly, each in its own data order "
        "(Lakshminarayanan et al., 2017)",
    )
)
register(
    Method(
        "batch_ensemble",
        _build_batch_ensemble,
        _rank1_family_table("batch_ensemble", BATCH_ENSEMBLE_OPTIONS, samples=False),
        "rank-1 per-member factors on shared weights, folded batch (Wen et al., 2020)",
    )
)
register(
    Method(
        "rank1",
        _build_rank1,
        _rank1_family_table("rank1", RANK1_OPTIONS, samples=True, init="normal"),
        "rank-1 BNN: shared weights, Gaussian/Cauchy mixture posterior over rank-1 factors "
        "(Dusenberry et al., 2020)",
        train_options=("kl_weight",),
    )
)
register(
    Method(
        "lpbnn",
        _build_lpbnn,
        _rank1_family_table("lpbnn", LPBNN_OPTIONS, samples=True, vae_weight=0.1),
        "LP-BNN: BatchEnsemble whose rank-1 factors are sampled from a per-layer VAE "
        "(Franchi et al., 2020)",
    )
)


def _build_placement(spec, opts):
    from ..plan import PlacementPlan

    plan = PlacementPlan.from_dict(opts["plan"])
    return UQModel(plan.apply(spec.build()), "placement", opts, spec, eval_samples=plan.samples)


def _plan_option(value):
    from ..plan import PlacementPlan

    return PlacementPlan.coerce(value).to_dict()


register(
    Method(
        "placement",
        _build_placement,
        OptionTable(
            _M + "'placement'",
            [
                Option(
                    "plan",
                    "json",
                    None,
                    "placement plan: a dict or the path of a plan.json "
                    "({layers: {name: kind}, members, samples, options})",
                    validator=_plan_option,
                    required=True,
                ),
                KL_WEIGHT,
            ],
        ),  # fmt: skip
        "any placement plan (bnnkit search's plan.json): chosen layers Bayesian, of chosen kinds",
        train_options=("kl_weight",),
    )
)
register(
    Method(
        "mfvi",
        _build_mfvi,
        OptionTable(
            _M + "'mfvi'",
            [
                VARIATIONAL_OPTIONS["prior_sigma"],
                _default(VARIATIONAL_OPTIONS["init_sigma"], 0.01),
                VARIATIONAL_OPTIONS["estimator"],
                SAMPLES,
                KL_WEIGHT,
            ],
        ),
        "mean-field Gaussian VI: local reparameterisation for Linear layers, Flipout for "
        "convolutions (Blundell et al., 2015; Wen et al., 2018)",
        train_options=("kl_weight",),
    )
)
