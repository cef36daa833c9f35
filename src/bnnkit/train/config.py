"""Typed configuration of a run; the CLI and YAML files map onto these dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..options import Option, OptionTable, declared_by

PRECISIONS = (
    "64-true", "64", "32-true", "32", "16-true", "16-mixed", "16", "bf16-true", "bf16-mixed",
    "bf16", "transformer-engine", "transformer-engine-float16",
)  # fmt: skip
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

DATA_OPTIONS = OptionTable(
    "data config",
    [
        Option("dataset", "str", "fashion_mnist", "data set name (see `bnnkit data`)"),
        Option("val_size", "int", 5000, "validation examples held out of the training set (a "
               "data set with its own validation split, e.g. camvid, uses that instead)", low=1),
        Option("subset", "int", None, "training examples to use (null: all)", low=1,
               nullable=True),
        Option("split_seed", "int", 0, "seed of the train/validation split", low=0),
        Option("anomaly_classes", "str", "Bicyclist", "segmentation data sets: classes held "
               "out, comma-separated (void in training, the anomalies at test; '' holds none "
               "out)"),
    ],
)  # fmt: skip

TRAIN_OPTIONS = OptionTable(
    "train config",
    [
        Option("epochs", "int", 10, "training epochs", low=1),
        Option("batch_size", "int", 128, "examples per step", low=1),
        Option("lr", "float", 1e-3, "Adam learning rate", low=0.0, low_open=True, log=True),
        Option("weight_decay", "float", 0.0, "weight decay of the shared weights", low=0.0),
        Option("kl_anneal_epochs", "int", 0, "linear warm-up of the KL weight (epochs)", low=0),
        Option("ensemble_protocol", "choice", "repeat", "folded ensembles: every member sees "
               "every example (repeat) or the batch is divided (split)",
               choices=("repeat", "split")),
        Option("augment", "bool", None, "random crop + flip (null: for 32x32 colour images)",
               nullable=True),
        Option("cutout", "int", 0, "cutout square side in pixels when augmenting (0: none)",
               low=0),
        Option("crop", "int_list", [], "segmentation: random crop [height, width] of the "
               "scaled training images ([]: the image size); evaluation is at full size",
               low=1, empty=True),
        Option("scale_min", "float", 0.75, "segmentation: smallest random scale of a training "
               "image", low=0.0, low_open=True),
        Option("scale_max", "float", 1.25, "segmentation: largest random scale of a training "
               "image", low=0.0, low_open=True),
        Option("optimizer", "choice", "adam", "adam, or sgd (Nesterov momentum)",
               choices=("adam", "sgd")),
        Option("momentum", "float", 0.9, "SGD momentum", low=0.0, high=1.0, high_open=True),
        Option("warmup_epochs", "int", 0, "linear learning-rate warm-up before the cosine decay",
               low=0),
        Option("loader", "choice", "dataloader", "dataloader: torch DataLoader (per image); "
               "tensor: data held on the training device as uint8, whole-batch gathers and "
               "augmentation there, order and augmentation seeded per epoch",
               choices=("dataloader", "tensor")),
        Option("channels_last", "bool", False, "channels-last memory format (fast convolutions "
               "on GPUs)"),
        Option("compile", "choice", "none", "torch.compile the training forward pass",
               choices=COMPILE_MODES),
        Option("accelerator", "choice", "auto", "Lightning accelerator", choices=ACCELERATORS),
        Option("devices", "int", 1, "devices per node (-1: all)", low=-1),
        Option("strategy", "str", "auto", "Lightning strategy: auto, ddp, ..."),
        Option("precision", "choice", "32-true", "Lightning precision", choices=PRECISIONS),
        Option("num_nodes", "int", 1, "nodes", low=1),
        Option("progress", "bool", True, "progress bars"),
    ],
    checks=[
        lambda o: "devices must be >= 1 or -1 (all)" if o["devices"] == 0 else None,
        lambda o: "cutout > 0 needs augmentation; drop augment: false or set cutout: 0"
        if o["cutout"] and o["augment"] is False else None,
        lambda o: f"warmup_epochs ({o['warmup_epochs']}) must be below epochs ({o['epochs']})"
        if o["warmup_epochs"] and o["warmup_epochs"] >= o["epochs"] else None,
        lambda o: f"crop must be [] or [height, width], got {o['crop']}"
        if len(o["crop"]) not in (0, 2) else None,
        lambda o: f"scale_min ({o['scale_min']}) must not exceed scale_max ({o['scale_max']})"
        if o["scale_min"] > o["scale_max"] else None,
    ],
)  # fmt: skip

RUN_OPTIONS = OptionTable(
    "run config",
    [
        Option("method", "str", "deterministic", "UQ method (see `bnnkit methods`)"),
        Option(
            "model",
            "str",
            "lenet5",
            "architecture: mlp, lenet5, resnet18, wrn28, "
            "deeplabv3plus (segmentation), or one registered with register_model",
        ),
        Option("seed", "int", 0, "seed of initialisation, data order and sampling", low=0),
    ],
)


def check_extras(
    owner: str,
    train_options: dict,
    model: str,
    model_options: dict,
    reserved,
    fixed: dict[str, Any],
) -> None:
    """The ``train_options`` / ``model_options`` a bench or a search passes to every run,
    checked before any work: mappings, no key that the owner sets itself (``reserved``), the
    whole train config valid with the owner's own values (``fixed``: epochs, batch size, ...,
    so that cross-option rules fail now), the model's options valid."""
    from ..models import MODEL_OPTIONS, MODELS

    for name, value in (("train_options", train_options), ("model_options", model_options)):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
    clash = sorted(set(train_options) & set(reserved))
    if clash:
        raise ConfigError(
            f"train_options {clash} are {owner} settings of their own; set them at the top "
            f"level of the {owner} config instead"
        )
    TRAIN_OPTIONS.resolve({**train_options, **fixed})
    if model not in MODELS:
        from ..errors import unknown_name

        raise unknown_name("model", model, MODELS)
    MODEL_OPTIONS[model].resolve(model_options, fill=False)


@dataclass
@declared_by(DATA_OPTIONS)
class DataConfig:
    """Which data and how it is split: one field per option of :data:`DATA_OPTIONS`."""


@dataclass
@declared_by(TRAIN_OPTIONS)
class TrainConfig:
    """How a run trains: one field per option of :data:`TRAIN_OPTIONS` (its type, default,
    range and help are declared there, once)."""


@dataclass
class RunConfig:
    method: str = "deterministic"
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str = "lenet5"
    model_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> RunConfig:
        """Check every value against the declared tables (method, model, train, data): a bad
        value is a ConfigError here, before any data is loaded or any training starts."""
        from ..methods import method_options
        from ..models import MODEL_OPTIONS, MODELS

        RUN_OPTIONS.resolve({k: getattr(self, k) for k in RUN_OPTIONS.options})
        DATA_OPTIONS.resolve(asdict(self.data))
        TRAIN_OPTIONS.resolve(asdict(self.train))
        method_options(self.method, self.method_options)
        if self.model not in MODELS:
            from ..errors import unknown_name

            raise unknown_name("model", self.model, MODELS)
        MODEL_OPTIONS[self.model].resolve(self.model_options, fill=False)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, d, "run config")


def run_config(
    *,
    method: str,
    model: str,
    seed: int,
    data: dict[str, Any],
    train: dict[str, Any],
    train_options: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> RunConfig:
    """The config of one run that a bench, a search or the search's final comparison makes:
    the tables' defaults, then ``train_options`` (a recipe shared by all the owner's runs, e.g.
    the GPU one), then ``train`` (the owner's own fields, which win); ``data`` over the data
    defaults. Fields are passed by name and every value is checked against the tables here."""
    t = TRAIN_OPTIONS.resolve({**(train_options or {}), **train})
    d = DATA_OPTIONS.resolve(dict(data))
    return RunConfig(
        method=method,
        method_options=dict(method_options or {}),
        model=model,
        model_options=dict(model_options or {}),
        seed=seed,
        data=DataConfig(**d),
        train=TrainConfig(**t),
    )


def _from_dict(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in {where}; valid keys: {', '.join(names)}"
        )
    kwargs = {}
    for k, v in d.items():
        sub = {"data": DataConfig, "train": TrainConfig}.get(k) if cls is RunConfig else None
        kwargs[k] = _from_dict(sub, v, f"{where}.{k}") if sub else v
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a file; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not a UTF-8 text file: {e.reason}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).replace("\n", " ")
        raise ConfigError(f"config file {path} is not valid YAML{where}: {what}") from e
    if d is not None and not isinstance(d, dict):
        raise ConfigError(
            f"config file {path} holds a YAML {type(d).__name__}, not a mapping of settings "
            "(write one `key: value` per line)"
        )
    return d or {}


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
