"""``bnnkit train``: train one method into a run directory."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from .common import EXIT_STOPPED, add_quiet, count, key_values, positive_float, train_options

NAME, HELP = "train", "train one method into a run directory"

#: options of the run's tables without a flag of their own here, and why
NO_FLAG = {
    "accelerator": "set by --device (cuda means Lightning's gpu)",
    "progress": "set by --quiet",
}


def arguments(t) -> None:
    from ..options import add_arguments
    from ..train.config import DATA_OPTIONS, RUN_OPTIONS, TRAIN_OPTIONS

    add_arguments(t, RUN_OPTIONS)
    add_arguments(t, DATA_OPTIONS)
    add_arguments(t, TRAIN_OPTIONS, exclude=NO_FLAG)
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--option", action="append", help="method option key=value (repeatable)")
    t.add_argument("--model-option", action="append",
                   help="architecture option key=value (repeatable), e.g. width=8")  # fmt: skip
    t.add_argument("--plan", help="plan.json of a placement plan (from bnnkit search)")
    t.add_argument("--config", help="YAML file with a RunConfig (flags given win over it)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument(
        "--train-option",
        action="append",
        help="train config key=value (repeatable), e.g. optimizer=sgd, loader=tensor, cutout=16, "
        "channels_last=true, compile=max-autotune, weight_decay=5e-4, warmup_epochs=5",
    )
    t.add_argument(
        "--max-minutes",
        type=positive_float,
        help="stop at the last epoch boundary that fits in this many minutes (exit status 75; "
        "--resume continues exactly)",
    )
    t.add_argument(
        "--stop-at-epoch", type=count, help="stop once this many epochs are done (exit 75)"
    )
    add_quiet(t)


def config(a):
    """The RunConfig of a parsed ``bnnkit train`` command line: the YAML file's (or the tables'
    defaults), then every flag given, then ``--train-option`` and ``--option`` pairs."""
    from ..options import given
    from ..train import RunConfig, load_yaml
    from ..train.config import DATA_OPTIONS, RUN_OPTIONS, TRAIN_OPTIONS

    cfg = RunConfig.from_dict(load_yaml(a.config)) if a.config else RunConfig()
    for k, v in given(a, RUN_OPTIONS).items():
        setattr(cfg, k, v)
    for k, v in given(a, DATA_OPTIONS).items():
        setattr(cfg.data, k, v)
    for k, v in given(a, TRAIN_OPTIONS).items():
        setattr(cfg.train, k, v)
    if a.device:
        cfg.train.accelerator = "gpu" if a.device == "cuda" else a.device
    if a.quiet:
        cfg.train.progress = False
    for k, v in train_options(a.train_option).items():
        setattr(cfg.train, k, v)
    cfg.method_options.update(key_values(a.option))
    if a.model_option:
        cfg.model_options.update(key_values(a.model_option, "--model-option"))
    if a.plan:
        if a.method not in (None, "placement"):
            raise ConfigError(f"--plan trains the plan itself; drop --method {a.method}")
        from ..plan import PlacementPlan

        cfg.method = "placement"
        cfg.method_options["plan"] = PlacementPlan.load(a.plan).to_dict()
    return cfg


def run(a) -> int:
    from ..train import Budget, is_complete, read_progress, train_run

    cfg = config(a)
    budget = Budget.minutes(a.max_minutes, a.stop_at_epoch)
    model = train_run(cfg, a.out, resume=a.resume, budget=budget)
    zero = (
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    )
    if not is_complete(a.out):
        if zero:
            done = read_progress(Path(a.out)).get("epochs_done", 0)
            print(
                f"stopped at epoch {done} of {cfg.train.epochs} (budget); the run is kept: "
                "run the same command with --resume to continue"
            )
        return EXIT_STOPPED
    if zero:
        print(f"trained {cfg.method} ({model.num_parameters():,} parameters) -> {a.out}")
    return 0
