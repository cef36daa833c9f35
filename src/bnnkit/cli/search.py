"""``bnnkit search``: where the Bayesian layers go (Optuna, NSGA-II), then optionally the final
comparison of the searched plans with the bench's training."""

from __future__ import annotations

import sys

from .common import EXIT_STOPPED, add_quiet, apply_extras

NAME, HELP = "search", "search where the Bayesian layers go (Optuna, NSGA-II)"

#: options of SEARCH_OPTIONS without a flag of their own, and why
NO_FLAG = {"progress": "set by --quiet"}


def arguments(s) -> None:
    from ..options import add_arguments
    from ..search.study import SEARCH_OPTIONS

    add_arguments(s, SEARCH_OPTIONS, exclude=NO_FLAG)
    s.add_argument(
        "--train-option",
        action="append",
        help="train config key=value for every candidate (repeatable)",
    )
    s.add_argument("--model-option", action="append", help="architecture option key=value")
    s.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip training the baselines scored beside the front (pareto.png)",
    )
    s.add_argument(
        "--final",
        action="store_true",
        help="then retrain the searched plans from scratch beside the baselines "
        "with the bench's training and compare them on the test OOD sets",
    )
    s.add_argument(
        "--final-config",
        metavar="FILE",
        help="YAML of BenchConfig fields for --final (implies --final)",
    )
    add_quiet(s)


def config(a):
    """The SearchConfig of a parsed ``bnnkit search`` command line."""
    from ..options import given
    from ..search.study import SEARCH_OPTIONS, SearchConfig

    cfg = SearchConfig(**given(a, SEARCH_OPTIONS))
    cfg.progress = not a.quiet
    if a.no_baselines:
        cfg.baselines = []
    apply_extras(cfg, a)
    return cfg


def run(a) -> int:
    import dataclasses
    import warnings

    import optuna

    from ..search.final import check_final_config
    from ..search.study import PlacementSearch
    from ..train import load_yaml
    from .bench import bench_config

    cfg = config(a)
    final_bench = bench_config(a.final_config) if a.final_config else None
    if a.final or a.final_config:  # its refusals before the search, not after it
        cfg.validate()
        unused = check_final_config(
            dataclasses.asdict(cfg), final_bench or bench_config(None),
            given=set(load_yaml(a.final_config)) if a.final_config else set(),
            source=a.final_config or "the final bench",
        )  # fmt: skip
        if unused:
            print(
                f"note: {a.final_config} sets {', '.join(unused)}, which the final comparison "
                "does not use: it writes OUT/final and trains the search's baselines and the "
                "searched plans",
                file=sys.stderr,
            )
    with warnings.catch_warnings():  # heartbeats and stale-trial retries are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        out = PlacementSearch(cfg).run()
    print(f"Pareto front -> {out / 'pareto.csv'}; chosen plan -> {out / 'plan.json'}")
    if a.final or a.final_config:
        from ..search.final import final_comparison

        bench = final_bench or bench_config(None)
        bench.progress = not a.quiet
        if final_comparison(out, bench) is None:
            return EXIT_STOPPED
    return 0
