"""Filling a collection: the reference posterior of independently trained networks.

``collect_reference`` trains ``members`` networks of a bnnkit model on a data set, each with its
own seed and data order, in vectorised chunks (:func:`~bnnkit.posterior.independent.
train_independent`), and adds each to a :class:`~bnnkit.posterior.collection.Collection` with
its validation accuracy and NLL. Members are named ``ref-0000``, ``ref-0001``, ...; a killed run
continues with the members the manifest lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import load_bundle
from ..errors import ConfigError, unknown_name
from ..methods import ModelSpec
from ..models import MODELS
from .collection import Collection
from .independent import train_independent


def architecture(spec: ModelSpec) -> dict:
    """A collection's architecture: the fields of a :class:`~bnnkit.methods.ModelSpec` (model,
    data geometry and normalisation), so members of every method share one plain network."""
    return {"model": spec.arch, "input_shape": list(spec.input_shape),
            "num_classes": int(spec.num_classes), "mean": list(spec.mean),
            "std": list(spec.std), "model_options": dict(spec.arch_options)}  # fmt: skip


def spec_of(arch: dict) -> ModelSpec:
    return ModelSpec(arch["model"], tuple(arch["input_shape"]), arch["num_classes"],
                     tuple(arch["mean"]), tuple(arch["std"]),
                     dict(arch.get("model_options", {})))  # fmt: skip


def build_from(arch: dict) -> torch.nn.Module:
    """A fresh plain network of a collection's architecture."""
    return spec_of(arch).build()


def classification_only(task: str, what: str) -> None:
    """Posterior exploration (collections, symmetry removal, MMD, modes) is built for classifiers;
    refuse a segmentation model or data set by name instead of mis-reading label maps."""
    if task != "classification":
        raise ConfigError(
            f"posterior exploration supports classification models and data sets; {what} is "
            f"a {task} one (its methods, bench and search support segmentation)"
        )


def collect_samples(out: str | Path, run_dir: str | Path, samples: int = 1, seed: int = 0):
    """Add a trained bnnkit model's posterior samples (every member x ``samples`` draws, as
    plain networks: :func:`~bnnkit.posterior.samples.network_samples`) to the collection at
    ``out``, named ``<run name>-m00-s000``...; samples already there are skipped."""
    from ..methods import UQModel
    from .samples import network_samples

    run_dir = Path(run_dir)
    model = UQModel.load(run_dir / "model.safetensors")
    classification_only(model.spec.task, f"the model in {run_dir}")
    col = Collection.create(out, architecture(model.spec))
    for tag, state in network_samples(model, samples, seed):
        mid = f"{run_dir.name}-{tag}"
        if not col.has(mid):
            col.add(mid, state, model.method, info={"run": run_dir.name, "sample": tag,
                                                     "sample_seed": seed})  # fmt: skip
    return col


def collect_swag(
    out: str | Path,
    run_dir: str | Path,
    samples: int = 16,
    seed: int = 0,
    **swag_kw,
) -> Collection:
    """Add SWAG samples (:mod:`~bnnkit.posterior.swag`) around a trained single network (a
    ``deterministic`` run) to the collection at ``out``: SGD from its weights on the run's own
    training split (data set, split seed, validation size, subset), ``samples`` draws named
    ``<run name>-swag-s000``...; samples already there are skipped, the fit is skipped when all
    are."""
    from ..methods import UQModel
    from .swag import fit_swag, swag_states

    run_dir = Path(run_dir)
    model = UQModel.load(run_dir / "model.safetensors")
    classification_only(model.spec.task, f"the model in {run_dir}")
    bodies = getattr(model.net, "ensemble", None)
    if (
        bodies is not None
        or getattr(model, "posterior", None) is not None
        or int(getattr(model.net, "members", 1)) != 1
    ):
        raise ConfigError(f"SWAG starts from one plain network; {run_dir} holds a "
                          f"{model.method} model")  # fmt: skip
    col = Collection.create(out, architecture(model.spec))
    ids = [f"{run_dir.name}-swag-s{i:03d}" for i in range(samples)]
    if not col.missing(ids):
        return col
    net = build_from(col.arch)
    net.load_state_dict(model.net.body.state_dict())
    data = _data_of(run_dir)
    bundle = load_bundle(data["dataset"], val_size=data["val_size"], subset=data["subset"],
                         split_seed=data["split_seed"], ood=[])  # fmt: skip
    x, y = bundle.train.float(), bundle.train.y
    swag = fit_swag(net, x, y, seed=seed, **swag_kw)
    states = swag_states(net, swag, samples, seed=seed, bn_data=x[:2000])
    info = {
        "run": run_dir.name,
        "swag": {"snapshots": swag.n_snapshots, "rank": len(swag.deviations), **swag_kw},
    }
    for mid, state in zip(ids, states):
        if not col.has(mid):
            col.add(mid, state, "swag", seed, info)
    return col


def _data_of(run_dir: Path) -> dict:
    import json

    f = run_dir / "config.json"
    try:
        data = json.loads(f.read_text())["data"]
        return {k: data[k] for k in ("dataset", "split_seed", "subset", "val_size")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{f} is not a bnnkit run configuration with its data split ({type(e).__name__}: {e})"
        ) from None


def collect_reference(
    out: str | Path,
    model: str = "mlp",
    dataset: str = "fashion_mnist",
    members: int = 128,
    epochs: int = 5,
    subset: int | None = 16000,
    val_size: int = 5000,
    batch_size: int = 128,
    lr: float = 1e-3,
    chunk: int = 32,
    first_seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Collection:
    """Train ``members`` independent networks into the collection at ``out`` (resumable)."""
    if members < 1 or chunk < 1 or epochs < 1:
        raise ConfigError("members, chunk and epochs must be >= 1")
    from ..data.sources import get_spec

    classification_only(get_spec(dataset).task, repr(dataset))
    bundle = load_bundle(dataset, val_size=val_size, subset=subset, ood=[])
    if model not in MODELS:
        raise unknown_name("model", model, MODELS)
    arch = architecture(ModelSpec(model, bundle.input_shape, bundle.num_classes, bundle.mean,
                                  bundle.std))  # fmt: skip
    col = Collection.create(out, arch)
    ids = [f"ref-{i:04d}" for i in range(members)]
    todo = col.missing(ids)
    x, y = bundle.train.float(), bundle.train.y
    xv, yv = bundle.val.float(), bundle.val.y
    for start in range(0, len(todo), chunk):
        part = todo[start : start + chunk]
        seeds = [first_seed + ids.index(i) for i in part]
        states = train_independent(lambda: build_from(arch), seeds, x, y, epochs=epochs,
                                   batch_size=batch_size, lr=lr)  # fmt: skip
        for mid, seed, state in zip(part, seeds, states):
            net = build_from(arch)
            net.load_state_dict(state)
            with torch.no_grad():
                logits = net.eval()(xv)
            info = {
                "dataset": dataset, "subset": subset, "epochs": epochs, "batch_size": batch_size,
                "lr": lr, "data_order_seed": seed,
                "val_accuracy": float((logits.argmax(1) == yv).float().mean()),
                "val_nll": float(F.cross_entropy(logits, yv)),
            }  # fmt: skip
            col.add(mid, state, "independent", seed=seed, info=info)
        if progress is not None:
            progress(len(col), members)
    return col
