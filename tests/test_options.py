"""Every registered option of every method, layer kind, model and run setting refuses every
kind of bad value through the real entry point, before any work, naming the option."""

import math

import pytest
import torch
from torch import nn

from bnnkit import ConfigError, bayesify
from bnnkit.bench import BENCH_OPTIONS, BenchConfig
from bnnkit.convert import KINDS
from bnnkit.methods import METHODS, ModelSpec, build_method
from bnnkit.models import MODEL_OPTIONS, build_model
from bnnkit.options import Option, OptionTable
from bnnkit.train import RunConfig
from bnnkit.train.config import DATA_OPTIONS, RUN_OPTIONS, TRAIN_OPTIONS

SPEC = ModelSpec("mlp", (1, 4, 4), 3, arch_options={"hidden": [5]})


def bad_values(o: Option) -> list:
    """Values the declaration rules out: wrong types, out of range, unknown choices, null."""
    vals: list = [] if o.nullable else [None]
    if o.kind in ("int", "float"):
        vals += ["four", True, [1]]
        if o.kind == "int":
            vals.append(1.5)
        else:
            vals += [math.nan, math.inf]
        if o.low is not None:
            vals.append(o.low if o.low_open else o.low - 1)
        if o.high is not None:
            vals.append(o.high if o.high_open else o.high + 1)
    elif o.kind == "bool":
        vals += ["yes", 1]
    elif o.kind == "choice":
        vals += ["no-such-choice", 3]
    elif o.kind == "size":
        vals += ["lots", 0, -5, True]
    elif o.kind == "int_list":
        vals += ([] if o.empty else [[]]) + [["a"], 3]
        vals += [[int(o.low) - 1]] if o.low is not None else []
    elif o.kind == "str":
        vals += [5, ["x"]]
    elif o.kind == "json":  # a placement plan
        vals += [5, {"layers": {"fc9": "mc_dropout"}}, {"layers": {"fc": "bayes"}}, "none.json"]
    return vals


def _cases(tables):
    return [
        pytest.param(owner, o.name, v, id=f"{owner}-{o.name}-{v!r}")
        for owner, table in tables
        for o in table
        for v in bad_values(o)
    ]


METHOD_CASES = _cases([(m.name, m.options) for m in METHODS.values()])
KIND_CASES = _cases([(k, kind.options) for k, kind in KINDS.items()])
MODEL_CASES = _cases(list(MODEL_OPTIONS.items()))
RUN_CASES = _cases([("data", DATA_OPTIONS), ("train", TRAIN_OPTIONS), ("run", RUN_OPTIONS)])
BENCH_CASES = _cases([("bench", BENCH_OPTIONS)])


def _refused(call, name, value):
    with pytest.raises(ConfigError) as err:
        call()
    msg = str(err.value)
    if isinstance(value, dict):  # a plan checked against the model: the message names the layer
        return
    assert repr(name) in msg, msg
    if not (isinstance(value, str) and value.endswith(".json")):
        assert repr(value) in msg, msg


def test_there_is_something_to_check():
    assert len(METHOD_CASES) > 150 and len(KIND_CASES) > 30 and len(RUN_CASES) > 50


@pytest.mark.parametrize("method, name, value", METHOD_CASES)
def test_method_options(method, name, value):
    _refused(lambda: build_method(method, SPEC, {name: value}), name, value)


@pytest.mark.parametrize("kind, name, value", KIND_CASES)
def test_layer_kind_options(kind, name, value):
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    members = 2 if KINDS[kind].ensemble else 1
    _refused(
        lambda: bayesify(net, {"*": kind}, members=members, options={kind: {name: value}}),
        name,
        value,
    )


@pytest.mark.parametrize("model, name, value", MODEL_CASES)
def test_model_options(model, name, value):
    _refused(lambda: build_model(model, (3, 32, 32), 10, **{name: value}), name, value)


@pytest.mark.parametrize("section, name, value", RUN_CASES)
def test_run_config_options(section, name, value):
    cfg = RunConfig()
    target = cfg if section == "run" else getattr(cfg, section)
    setattr(target, name, value)
    _refused(cfg.validate, name, value)


@pytest.mark.parametrize("section, name, value", BENCH_CASES)
def test_bench_options(section, name, value):
    cfg = BenchConfig(methods=["deterministic"])
    setattr(cfg, name, value)
    _refused(cfg.validate, name, value)


@pytest.mark.parametrize(
    "call",
    [
        lambda la, x: la.predictive(x, link="probitt"),
        lambda la, x: la.predictive(x, link="mc", n_samples=0),
        lambda la, x: la.predictive(x, link="mc", n_samples="x"),
        lambda la, x: la.optimize_prior_precision("margilk"),
        lambda la, x: la.optimize_prior_precision("marglik", per_layer=True, steps=0),
        lambda la, x: la.optimize_prior_precision("marglik", per_layer=True, lr=-1.0),
    ],
)
def test_laplace_call_options(call):
    from bnnkit.laplace import SubnetLaplace

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    la = SubnetLaplace(net, torch.arange(10)).fit((x, y))
    with pytest.raises(ConfigError, match="option '"):
        call(la, x)


def test_defaults_are_valid_and_typos_are_named():
    for m in METHODS.values():
        required = [o.name for o in m.options if o.required]
        if required:  # no default to fall back on: the user must give it, and is told so
            with pytest.raises(ConfigError, match=f"needs option {required[0]!r}"):
                m.options.resolve()
        else:
            assert m.options.resolve() == m.defaults
    RunConfig().validate()
    BenchConfig().validate()
    with pytest.raises(ConfigError, match="no option 'sampels' \\(did you mean 'samples'\\?\\)"):
        build_method("mc_dropout", SPEC, {"sampels": 4})
    with pytest.raises(ConfigError, match="layer kind 'variational' has no option 'prior_sgima'"):
        bayesify(nn.Linear(3, 2), {"*": "variational"}, options={"variational": {"prior_sgima": 1}})
    with pytest.raises(ConfigError, match="members must be an int >= 1, got 'four'"):
        bayesify(nn.Linear(3, 2), {"*": "batch_ensemble"}, members="four")


def test_a_default_outside_its_own_declaration_fails_where_it_is_declared():
    with pytest.raises(ValueError, match="default of option 'n' is invalid"):
        OptionTable("t", [Option("n", "int", 0, "count", low=1)])
    with pytest.raises(ValueError, match="defaults break a rule: a < b"):
        OptionTable("t", [Option("a", "int", 2, "a"), Option("b", "int", 1, "b")],
                    checks=[lambda o: "a < b" if o["a"] >= o["b"] else None])  # fmt: skip
    with pytest.raises(ValueError, match="required option has no default"):
        Option("plan", "json", {}, "a plan", required=True)


def test_valid_values_pass_through_every_entry_point():
    """The same tables accept values inside their ranges (ints for floats too)."""
    model = build_method("rank1", SPEC, {"members": 2, "samples": 1, "prior_scale": 2})
    assert model.options["prior_scale"] == 2.0 and model.members == 2
    net = bayesify(
        nn.Sequential(nn.Linear(3, 4)), {"*": "mc_dropout"}, options={"mc_dropout": {"p": 0}}
    )
    assert net(torch.rand(2, 3)).shape == (1, 2, 4)


def test_typed_configs_are_their_tables():
    """Each typed config has one field per option of its table, with the table's default:
    nothing declared twice, nothing to drift (the bench's defaults are its own table's)."""
    import dataclasses

    from bnnkit.options import declared_by
    from bnnkit.train.config import DataConfig, TrainConfig

    for cls, table in ((TrainConfig, TRAIN_OPTIONS), (DataConfig, DATA_OPTIONS),
                       (BenchConfig, BENCH_OPTIONS)):  # fmt: skip
        made = cls()
        for o in table:
            assert getattr(made, o.name) == o.default, (cls.__name__, o.name)
        extra = {f.name for f in dataclasses.fields(cls)} - set(table.options)
        assert cls is BenchConfig or not extra, extra
    assert BenchConfig().epochs == 5 and TrainConfig().epochs == 10
    a, b = BenchConfig(), BenchConfig()
    a.angles.append(999)
    assert 999 not in b.angles  # mutable defaults are not shared
    with pytest.raises(TypeError, match="declared in train config already"):

        @declared_by(TRAIN_OPTIONS)
        class Twice:
            epochs: int = 3
