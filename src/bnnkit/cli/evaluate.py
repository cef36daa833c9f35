"""``bnnkit evaluate``: every metric of a trained run directory."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .common import add_quiet

NAME, HELP = "evaluate", "evaluate a trained run directory"

NO_FLAG = {"progress": "set by --quiet"}


def arguments(e) -> None:
    from ..evaluate import EVAL_OPTIONS
    from ..options import add_arguments

    e.add_argument("run_dir")
    e.add_argument("--dataset", help="evaluate on another data set of the same shape")
    e.add_argument(
        "--corruptions",
        help="comma-separated corruption names (any case), 'all', or '' / 'none' for none "
        "[default: all; segmentation: gaussian_noise,gaussian_blur,contrast,jpeg]",
    )
    add_arguments(e, EVAL_OPTIONS, exclude=NO_FLAG)
    add_quiet(e)


def config(a):
    """The EvalConfig of a parsed ``bnnkit evaluate`` command line."""
    from ..evaluate import EVAL_OPTIONS, EvalConfig
    from ..options import given

    ecfg = EvalConfig(progress=not a.quiet, **given(a, EVAL_OPTIONS))
    if a.corruptions is not None:  # '' and 'none' mean none, as for --angles and --mnist-c
        from ..data.corruptions import corruption_names

        ecfg.corruptions = corruption_names(a.corruptions)
    return ecfg


def run(a) -> int:
    from .. import io
    from ..data import load_bundle
    from ..evaluate import evaluate
    from ..methods import UQModel
    from ..train import RunConfig

    run_dir = Path(a.run_dir)
    ecfg = config(a)
    ecfg.mnist_c_names()  # unknown MNIST-C names: refused before anything is loaded
    if not (run_dir / "model.safetensors").is_file():
        raise ConfigError(
            f"{run_dir} holds no trained model (model.safetensors); train one with "
            f"`bnnkit train --out {run_dir}` or finish it with --resume"
        )
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    model = UQModel.load(run_dir / "model.safetensors")
    bundle = load_bundle(
        a.dataset or cfg.data.dataset, val_size=cfg.data.val_size, subset=cfg.data.subset,
        anomaly_classes=cfg.data.anomaly_classes,
    )  # fmt: skip
    if bundle.dense:
        # segmentation defaults where none was given: corruptions that keep pixels in place
        # (the label maps must still match) on a few full-size images
        from ..evaluate import EVAL_OPTIONS, SEG_EVAL_DEFAULTS
        from ..options import given

        if a.corruptions is None:
            ecfg.corruptions = list(SEG_EVAL_DEFAULTS["corruptions"])
        if "n_corrupt" not in given(a, EVAL_OPTIONS):
            ecfg.n_corrupt = SEG_EVAL_DEFAULTS["n_corrupt"]
    rows, _ = evaluate(model, bundle, ecfg)
    io.atomic_write_text(run_dir / "metrics.json", json.dumps(rows, indent=1))
    keep = {"test", "anomaly", "corrupt:mean", "mnist_c:mean", "cost"} | {
        s for s in (r["split"] for r in rows) if s.startswith("ood:")
    }
    for r in rows:
        if r["split"] in keep:
            print(f"{r['split']:<22} {r['metric']:<20} {r['value']:.4f}")
    print(f"all {len(rows)} rows -> {run_dir / 'metrics.json'}")
    return 0
