"""One configuration layer: the option tables are the single source of the typed configs and of
the command line's flags. Every table option of a command has its flag (or is in the small,
explained exclusion list below), a flag not given leaves the table's default, a given flag's
value reaches the config, and the typed configs' defaults are their tables'."""

import dataclasses
import subprocess
import sys

import pytest

from bnnkit.bench import BENCH_OPTIONS, BenchConfig
from bnnkit.cli import EXIT_STOPPED, build_parser, main, subparser
from bnnkit.cli import bench as bench_cmd
from bnnkit.cli import evaluate as evaluate_cmd
from bnnkit.cli import posterior as posterior_cmd
from bnnkit.cli import search as search_cmd
from bnnkit.cli import train as train_cmd
from bnnkit.errors import ConfigError
from bnnkit.evaluate import EVAL_OPTIONS, EvalConfig
from bnnkit.options import NULL, Option, OptionTable, add_arguments, flag_name, given
from bnnkit.report.posterior import REPORT_OPTIONS, PosteriorReportConfig
from bnnkit.search.study import SEARCH_OPTIONS, SearchConfig
from bnnkit.train.config import (
    DATA_OPTIONS,
    RUN_OPTIONS,
    TRAIN_OPTIONS,
    DataConfig,
    RunConfig,
    TrainConfig,
)

# table options with no flag of their own, and why (keep this list small)
NO_FLAG = {
    ("train", "accelerator"): "set by --device (cuda means Lightning's gpu)",
    ("train", "progress"): "set by --quiet",
    ("evaluate", "progress"): "set by --quiet",
    ("bench", "progress"): "set by --quiet",
    ("search", "progress"): "set by --quiet",
}
# flags named otherwise than their option, kept from earlier releases
RENAMED = {("bench", "test_size"): "--test-subset", ("report", "modes_threshold"): "--threshold"}

# (command path, the arguments it needs, its tables, how a parsed command line becomes the
# config (and where each table's options land in it))
REQUIRED = {"train": ["--out", "o"], "evaluate": ["run"], "report": ["--reference", "ref"]}


def _train_sections(a):
    cfg = train_cmd.config(a)
    return {RUN_OPTIONS: cfg, DATA_OPTIONS: cfg.data, TRAIN_OPTIONS: cfg.train}


COMMANDS = {
    "train": (("train",), _train_sections),
    "evaluate": (("evaluate",), lambda a: {EVAL_OPTIONS: evaluate_cmd.config(a)}),
    "bench": (("bench",), lambda a: {BENCH_OPTIONS: bench_cmd.config(a)}),
    "search": (("search",), lambda a: {SEARCH_OPTIONS: search_cmd.config(a)}),
    "report": (("posterior", "report"), lambda a: {REPORT_OPTIONS: posterior_cmd.report_config(a)}),
}
TABLES = {
    "train": (RUN_OPTIONS, DATA_OPTIONS, TRAIN_OPTIONS),
    "evaluate": (EVAL_OPTIONS,),
    "bench": (BENCH_OPTIONS,),
    "search": (SEARCH_OPTIONS,),
    "report": (REPORT_OPTIONS,),
}
FLAGGED = [
    (cmd, table, o)
    for cmd, tables in TABLES.items()
    for table in tables
    for o in table
    if (cmd, o.name) not in NO_FLAG
]


def _parse(cmd, *argv):
    path, _ = COMMANDS[cmd]
    return build_parser().parse_args([*path, *REQUIRED.get(cmd, []), *argv])


def _configs(cmd, *argv):
    return COMMANDS[cmd][1](_parse(cmd, *argv))


def _flags(cmd) -> dict:
    """flag -> argparse action of a command's populated parser."""
    p = subparser(build_parser(), *COMMANDS[cmd][0])
    return {s: a for a in p._actions for s in a.option_strings}


def _other_value(o: Option):
    """A valid value of ``o`` other than its default (the declaration is the oracle)."""
    d = o.default
    if o.kind == "bool":
        cands = [True] if d is None else [not d]
    elif o.kind == "choice":
        cands = [c for c in o.choices if c != d]
    elif o.kind == "str":
        cands = [f"{d or 'x'}-other"]
    elif o.kind == "size":
        cands = ["123MB", "7GB"]
    elif o.kind == "int_list":
        lo = int(o.low) if o.low is not None else 0
        cands = [[lo + 1, lo], [lo], []]
    elif o.kind == "int":
        base = d if d is not None else int(o.low or 0)
        cands = [base + 1, base + 2, base - 1, 3]
    else:
        base = d if d is not None else 1.0
        cands = [base * 0.5, base + 0.25, 0.5, 0.25]
    for v in cands:
        try:
            if v != d and o.check(v) == v:
                return v
        except ConfigError:
            pass
    raise AssertionError(f"no valid other value for {o.name}")


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return repr(v) if isinstance(v, float) else str(v)


@pytest.mark.parametrize("cmd", list(TABLES))
def test_every_table_option_has_its_flag_with_no_default(cmd):
    flags = _flags(cmd)
    names = {o.name for t in TABLES[cmd] for o in t}
    for table in TABLES[cmd]:
        for o in table:
            if (cmd, o.name) in NO_FLAG:
                continue
            flag = RENAMED.get((cmd, o.name), flag_name(o))
            assert flag in flags, f"bnnkit {cmd}: option {o.name} has no flag {flag}"
            action = flags[flag]
            assert action.dest == o.name and action.default is None, (cmd, o.name)
            assert action.required == o.required, (cmd, o.name)
            assert o.help in action.help, (cmd, o.name)  # the help is the table's, not a copy
    # the exclusions are options of the command's tables, and the command agrees with them
    assert {n for c, n in NO_FLAG if c == cmd} <= names
    module = {"train": train_cmd, "evaluate": evaluate_cmd, "bench": bench_cmd,
              "search": search_cmd}.get(cmd)  # fmt: skip
    if module is not None:
        assert set(module.NO_FLAG) == {n for c, n in NO_FLAG if c == cmd}


@pytest.mark.parametrize("cmd", list(TABLES))
def test_a_flag_not_given_leaves_the_tables_default(cmd):
    for table, section in _configs(cmd).items():
        for o in table:
            if o.required:
                continue
            assert getattr(section, o.name) == o.default, (cmd, o.name)


@pytest.mark.parametrize(
    "cmd, table, option", FLAGGED, ids=[f"{c}-{o.name}" for c, _, o in FLAGGED]
)
def test_a_given_flag_reaches_the_config(cmd, table, option):
    flag = RENAMED.get((cmd, option.name), flag_name(option))
    value = _other_value(option)
    sections = _configs(cmd, flag, _text(value))
    assert getattr(sections[table], option.name) == value
    others = [o for o in table if o.name != option.name and not o.required]
    assert all(getattr(sections[table], o.name) == o.default for o in others)
    if option.nullable and option.default is not None:  # 'all' / 'none' is null, not "not given"
        for word in ("all", "none"):
            assert getattr(_configs(cmd, flag, word)[table], option.name) is None


def test_command_line_values_are_checked_by_the_declaration(capsys):
    for argv, flag, what in (
        (["bench", "--subset", "lots"], "--subset", "expected an int >= 1, or 'all'"),
        (["search", "--epochs", "0"], "--epochs", "expected an int >= 1"),
        (["train", "--lr", "-1", "--out", "o"], "--lr", "expected a number > 0"),
        (["train", "--channels-last", "yes", "--out", "o"], "--channels-last", "true or false"),
        (["bench", "--angles", "0,x"], "--angles", "comma-separated ints"),
        (["posterior", "report", "--reference", "r", "--alpha", "1"], "--alpha", "(0, 1)"),
        (["search", "--sampler", "random"], "--sampler", "one of nsga2, tpe"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("bnnkit: error: argument " + flag) and what in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert main(["methods", "--help"]) == 0
    assert EXIT_STOPPED == 75


def test_the_parsed_command_line_sets_the_config_fields_it_names():
    """A few real command lines from the README, through the real parser."""
    run = train_cmd.config(_parse("train", "--method", "mfvi", "--epochs", "10", "--subset",
                                  "all", "--device", "cuda", "--quiet", "--train-option",
                                  "optimizer=sgd", "--option", "prior_sigma=0.1"))  # fmt: skip
    assert (run.method, run.train.epochs, run.data.subset) == ("mfvi", 10, None)
    assert run.train.accelerator == "gpu" and run.train.progress is False
    assert run.train.optimizer == "sgd" and run.method_options == {"prior_sigma": 0.1}
    bench = bench_cmd.config(_parse("bench", "--methods", "deterministic,deep_ensemble",
                                    "--test-subset", "all", "--quiet"))  # fmt: skip
    assert bench.methods == ["deterministic", "deep_ensemble"] and bench.test_size is None
    assert bench.progress is False and bench.subset == 16000
    s = search_cmd.config(_parse("search", "--trials", "40", "--no-baselines", "--members",
                                 "2,8", "--max-latency-ms", "12.5"))  # fmt: skip
    assert (s.trials, s.baselines, s.members, s.max_latency_ms) == (40, [], [2, 8], 12.5)
    r = posterior_cmd.report_config(_parse("report", "--collection", "a=runs/a", "--threshold",
                                           "0.1"))  # fmt: skip
    assert r.collections == {"a": "runs/a"} and r.modes_threshold == 0.1
    assert r.out == REPORT_OPTIONS["out"].default  # --out is no longer required


def test_typed_configs_defaults_are_their_tables():
    own = {SearchConfig: {"kinds", "baselines", "train_options", "model_options"},
           BenchConfig: {"methods", "model_options", "method_options", "variants",
                         "train_options", "corruptions", "reuse"},
           EvalConfig: {"corruptions"}, PosteriorReportConfig: {"collections"},
           TrainConfig: set(), DataConfig: set()}  # fmt: skip
    tables = {SearchConfig: SEARCH_OPTIONS, BenchConfig: BENCH_OPTIONS, EvalConfig: EVAL_OPTIONS,
              PosteriorReportConfig: REPORT_OPTIONS, TrainConfig: TRAIN_OPTIONS,
              DataConfig: DATA_OPTIONS}  # fmt: skip
    for cls, table in tables.items():
        made = cls(reference="ref") if cls is PosteriorReportConfig else cls()
        for o in table:
            if not o.required:
                assert getattr(made, o.name) == o.default, (cls.__name__, o.name)
        assert {f.name for f in dataclasses.fields(cls)} - set(table.options) == own[cls]
    # the run config's own fields are RUN_OPTIONS'
    run = RunConfig()
    assert all(getattr(run, o.name) == o.default for o in RUN_OPTIONS)


def test_search_config_keeps_its_fields_and_defaults():
    """The defaults SearchConfig had before it was generated from its table."""
    before = dict(out="runs/search", dataset="fashion_mnist", model="lenet5", epochs=3,
                  subset=8000, val_size=2000, batch_size=128, lr=1e-3, seed=0, trials=20,
                  storage=None, study="bnnkit-search", sampler="nsga2", population=16,
                  kinds=None,
                  members=[2, 4], samples=[1, 2, 4, 8], n_ood=1000, ood_family="mixed",
                  latency_batch=128, heartbeat=30, max_latency_ms=None, max_parameters=None,
                  baselines=["deterministic", "mc_dropout", "deep_ensemble"], train_options={},
                  model_options={}, progress=True, anomaly_classes="Bicyclist",
                  units="blocks", memory_budget="512MB")  # fmt: skip
    from bnnkit.search.space import DEFAULT_KINDS

    before["kinds"] = list(DEFAULT_KINDS)
    assert dataclasses.asdict(SearchConfig()) == before
    a, b = SearchConfig(), SearchConfig()
    a.members.append(16)
    assert b.members == [2, 4]  # list defaults are not shared
    assert SearchConfig().validate() is not None


@pytest.mark.parametrize(
    "field, value",
    [("trials", 0), ("heartbeat", 0.5), ("population", 1), ("sampler", "random"),
     ("members", []), ("samples", [0]), ("subset", 0), ("max_latency_ms", -1.0),
     ("lr", 0.0), ("seed", -1), ("storage", 3), ("kinds", "mc_dropout")],
)  # fmt: skip
def test_search_config_is_validated_by_its_table(field, value):
    cfg = SearchConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):
        cfg.validate()


def test_search_run_config_is_the_tables_defaults_the_recipe_then_the_search():
    cfg = SearchConfig(epochs=2, batch_size=32, lr=0.05, seed=7, subset=None, val_size=300,
                       train_options={"optimizer": "sgd", "weight_decay": 5e-4},
                       model="mlp", model_options={"hidden": [8]})  # fmt: skip
    rc = cfg.run_config("placement", {"plan": {"layers": {"fc": "mc_dropout"}}})
    want = {**TRAIN_OPTIONS.defaults, "optimizer": "sgd", "weight_decay": 5e-4, "epochs": 2,
            "batch_size": 32, "lr": 0.05, "progress": False}  # fmt: skip
    assert dataclasses.asdict(rc.train) == want
    assert dataclasses.asdict(rc.data) == {"dataset": "fashion_mnist", "val_size": 300,
                                           "subset": None, "split_seed": 7,
                                           "anomaly_classes": "Bicyclist"}  # fmt: skip
    assert (rc.method, rc.model, rc.seed, rc.model_options) == ("placement", "mlp", 7,
                                                                {"hidden": [8]})  # fmt: skip
    assert rc.method_options == {"plan": {"layers": {"fc": "mc_dropout"}}}
    base = cfg.run_config("deterministic")
    assert base.method_options == {} and base.train == rc.train
    with pytest.raises(ConfigError, match="cutout"):
        SearchConfig(train_options={"cutout": -1}).run_config("deterministic")


def test_final_comparison_config_leaves_the_given_bench_config_alone(tmp_path, monkeypatch):
    """The final comparison builds its bench config from the given one plus the search's
    settings, without changing the caller's."""
    import csv
    import json

    from bnnkit.plan import PlacementPlan
    from bnnkit.search import final

    out = tmp_path / "s"
    out.mkdir()
    plan = PlacementPlan({"fc": "mc_dropout"})
    plan.save(out / "plan.json")
    with open(out / "pareto.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "val_nll", "ood_auroc", "flops_per_image", "plan"])
        w.writerow([0, 0.5, 0.8, 10, json.dumps(plan.to_dict())])
    scfg = {
        "dataset": "mnist",
        "model": "mlp",
        "model_options": {"hidden": [8]},
        "train_options": {"optimizer": "sgd", "cutout": 0},
        "baselines": ["mc_dropout"],
    }
    (out / "search_config.json").write_text(json.dumps(scfg))
    seen = {}

    def fake_bench(cfg, log=print):
        seen["cfg"] = cfg
        return ""

    monkeypatch.setattr(final, "run_bench", fake_bench)
    given_cfg = BenchConfig(epochs=1, train_options={"cutout": 4}, progress=False)
    snapshot = dataclasses.asdict(given_cfg)
    final.final_comparison(out, given_cfg, log=lambda *_: None)
    assert dataclasses.asdict(given_cfg) == snapshot
    cfg = seen["cfg"]
    assert (cfg.dataset, cfg.model, cfg.model_options) == ("mnist", "mlp", {"hidden": [8]})
    assert cfg.train_options == {"optimizer": "sgd", "cutout": 4}  # the bench's own wins
    assert cfg.methods == ["mc_dropout", "mc_dropout_full", "searched"]
    assert cfg.epochs == 1 and cfg.out == str(out / "final")
    # a bench stopped by its time budget: no comparison from a part of the runs
    (out / "final" / "comparison.md").unlink()
    monkeypatch.setattr(final, "run_bench", lambda cfg, log=print: None)
    assert final.final_comparison(out, given_cfg, log=lambda *_: None) is None
    assert not (out / "final" / "comparison.md").exists()


def test_add_arguments_and_given_on_a_generated_table():
    """The argparse helper over every kind, on a table made here."""
    import argparse

    table = OptionTable("t", [
        Option("n", "int", 3, "n", low=1), Option("x", "float", 0.5, "x", high=1.0),
        Option("flag", "bool", False, "flag"), Option("c", "choice", "a", "c", choices=("a", "b")),
        Option("s", "str", "hi", "s"), Option("ks", "int_list", [1], "ks", low=0, empty=True),
        Option("m", "int", None, "m", low=1, nullable=True),
        Option("need", "str", None, "need", required=True),
    ])  # fmt: skip
    p = argparse.ArgumentParser()
    assert add_arguments(p, table, exclude=["s"], rename={"n": "count"}) == [
        "n", "x", "flag", "c", "ks", "m", "need"]  # fmt: skip
    a = p.parse_args(["--need", "z"])
    assert given(a, table) == {"need": "z"}
    a = p.parse_args(["--need", "z", "--count", "4", "--x", "1", "--flag", "TRUE", "--c", "b",
                      "--ks", "", "--m", "all"])  # fmt: skip
    assert a.m is NULL
    assert given(a, table) == {"need": "z", "n": 4, "x": 1.0, "flag": True, "c": "b", "ks": [],
                               "m": None}  # fmt: skip
    assert isinstance(given(a, table)["x"], float)
    with pytest.raises(ValueError, match="no option"):
        add_arguments(argparse.ArgumentParser(), table, names=["nope"])


def test_commands_that_need_no_table_import_no_heavy_layer():
    """The parser adds a command's flags when that command is parsed: `bnnkit methods` does
    not import Optuna or Lightning to build the search's flags."""
    code = ("import sys; from bnnkit.cli import build_parser; "
            "build_parser().parse_args(['methods']); "
            "print(sorted(m for m in ('optuna', 'lightning', 'bnnkit.search.study') "
            "if m in sys.modules))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
