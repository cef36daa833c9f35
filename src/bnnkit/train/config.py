"""Typed configuration of a run; the CLI and YAML files map onto these dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    val_size: int = 5000
    subset: int | None = None
    split_seed: int = 0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    kl_anneal_epochs: int = 0  # linear warm-up of the KL weight over this many epochs
    #: folded ensembles: "repeat" (every member sees every example, the rank-1 protocol) or
    #: "split" (the batch is divided among members, the original BatchEnsemble protocol)
    ensemble_protocol: str = "repeat"
    augment: bool | None = None  # None: crop+flip for 32x32 colour images only
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    progress: bool = True


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _from_dict(cls, d, "run config")


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
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    return d or {}


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)
