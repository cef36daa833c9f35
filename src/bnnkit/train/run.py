"""Train one method on one data set into a run directory.

Run directory::

    config.json              the full RunConfig
    checkpoints/last.safetensors   Lightning state after the last finished epoch (resume)
    logs/version_N/metrics.csv   per-epoch metrics (a resumed run adds a version)
    progress.json            epochs done and one record per training chunk (device, images/s)
    model.safetensors        final weights + the recipe to rebuild them (no pickle)
    meta.json                written last: marks the run complete (times, sizes)

A run stopped by a :class:`Budget` (``--max-minutes``, ``--stop-at-epoch``) has no
``meta.json`` yet; ``--resume`` continues it from its last epoch boundary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from .. import io
from ..data import DataBundle, load_bundle
from ..data.loader import Augment, TensorLoader
from ..data.seg_loader import SegAugment, SegTensorLoader
from ..errors import ConfigError, unknown_name
from ..methods import ModelSpec, UQModel, build_method, get_method
from ..models import MODELS, model_task
from .checkpoint import SafeCheckpointIO
from .chunks import Budget, ChunkControl, read_progress
from .config import RunConfig
from .lit import LitUQ


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's info logs and its data-loader hints silenced for one call, restored after
    (nothing global is changed at import)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class RNGState(L.Callback):
    """Random number generator states in every checkpoint, restored on resume: with the
    optimiser, scheduler, loop counters and weights that Lightning restores, a resumed run
    draws exactly the numbers (data order, dropout masks, weight samples, augmentation) the
    uninterrupted run draws, and ends with bitwise the same weights on CPU."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        }  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def check_writable(path: Path, create: bool = True) -> None:
    """Refuse an output directory that cannot be made or written. ``create=False`` checks
    without changing the file system (the nearest existing directory takes a probe file that
    is gone at once): a command that may still refuse must not leave a directory behind."""
    import tempfile

    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing, prefix=".bnnkit-write-test"):
            pass
    except OSError as e:
        raise ConfigError(
            f"output directory {path} is not writable ({e.strerror}); choose another with --out"
        ) from e


def model_spec(cfg: RunConfig, bundle: DataBundle) -> ModelSpec:
    if cfg.model not in MODELS:
        raise unknown_name("model", cfg.model, MODELS)
    task = model_task(cfg.model)
    if task != bundle.task:
        fit = [m for m in MODELS if model_task(m) == bundle.task]
        raise ConfigError(
            f"model {cfg.model!r} is a {task} model but {bundle.name!r} is a {bundle.task} data "
            f"set; use one of: {', '.join(fit)} (or register your own with "
            f"bnnkit.models.register_model(..., task={bundle.task!r}))"
        )
    return ModelSpec(
        cfg.model,
        bundle.input_shape,
        bundle.num_classes,
        bundle.mean,
        bundle.std,
        dict(cfg.model_options),
        task,
    )


def _is_worker() -> bool:
    """A process launched for a distributed run (rank > 0): it joins the run that rank 0
    started in the same directory."""
    return any(int(os.environ.get(k, "0") or 0) != 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def is_complete(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "meta.json").is_file() and (run_dir / "model.safetensors").is_file()


#: settings that may differ between the chunks of one run: where and how fast it trains, not
#: what it computes (compile modes compute the same function up to float rounding)
_IGNORED = {("train", "progress"), ("train", "devices"), ("train", "accelerator"),
            ("train", "compile")}  # fmt: skip


def _config_diff(old: dict, new: dict, prefix=()) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        path = (*prefix, key)
        if path in _IGNORED:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("method_options",):
            diffs += _config_diff(a, b, path)
        elif a != b:
            diffs.append(f"{'.'.join(path)}: {a!r} -> {b!r}")
    return diffs


def _saved_config(path: Path) -> dict:
    # parsed through the dataclass, so that keys added since the run was made take their
    # defaults instead of reading as differences
    return RunConfig.from_dict(json.loads(path.read_text())).to_dict()


def config_diffs(path: Path, cfg: RunConfig) -> list[str] | None:
    """How the run config saved at ``path`` differs from ``cfg`` (empty: the same run);
    None when the file is missing or unreadable."""
    try:
        return _config_diff(_saved_config(path), cfg.to_dict())
    except (OSError, ValueError, TypeError):
        return None


def check_same_config(path: Path, cfg: RunConfig, may_change: tuple = ()) -> None:
    """A run directory belongs to one config: reusing it with another would mix results.
    ``may_change``: dotted keys that may differ (``train.epochs`` when extending a run)."""
    if not path.is_file():
        return
    try:
        old = _saved_config(path)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); remove the run directory") from e
    diffs = [d for d in _config_diff(old, cfg.to_dict()) if d.split(":")[0] not in may_change]
    if diffs:
        raise ConfigError(
            f"{path.parent} was made with a different config ({'; '.join(diffs)}); "
            "use another output directory, or delete this one to start over"
        )


def _augment(cfg: RunConfig, bundle: DataBundle) -> Augment | SegAugment | None:
    t = cfg.train
    if bundle.dense:  # image and mask together: scale, crop, flip (on unless augment: false)
        if t.augment is False:
            return None
        crop = tuple(t.crop) if t.crop else None
        if crop is not None and (
            crop[0] > bundle.input_shape[1] or crop[1] > bundle.input_shape[2]
        ):
            raise ConfigError(
                f"crop {list(crop)} is larger than the {bundle.name} images "
                f"{list(bundle.input_shape[1:])}; choose a crop within [height, width]"
            )
        return SegAugment(crop=crop, scale=(t.scale_min, t.scale_max), flip=True,
                          ignore_index=bundle.ignore_index)  # fmt: skip
    on = t.augment if t.augment is not None else bundle.input_shape[0] == 3
    if not on:
        return None
    # a cutout square is 0 after normalisation, as in the cutout paper
    return Augment(crop_pad=4, flip=True, cutout=t.cutout, fill=tuple(bundle.mean))


def _loaders(
    cfg: RunConfig, bundle: DataBundle, device: torch.device | None = None, streams: int = 1
):
    """Training and validation loaders. ``streams > 1`` (a deep ensemble's independent data
    orders, one per member) needs the tensor loader, whatever ``loader`` says."""
    t = cfg.train
    drop_last = len(bundle.train) > t.batch_size
    if bundle.dense:  # label maps: always the tensor loader (joint augmentation on the batch)
        train = SegTensorLoader(
            bundle.train.x, bundle.train.y, t.batch_size, shuffle=True, drop_last=drop_last,
            seed=cfg.seed, augment=_augment(cfg, bundle), device=device, streams=streams,
        )  # fmt: skip
        val = SegTensorLoader(bundle.val.x, bundle.val.y, 16, shuffle=False, device=device)
        return train, val
    if t.loader == "tensor" or streams > 1:
        train = TensorLoader(
            bundle.train.x, bundle.train.y, t.batch_size, shuffle=True, drop_last=drop_last,
            seed=cfg.seed, augment=_augment(cfg, bundle), device=device, streams=streams,
        )  # fmt: skip
        val = TensorLoader(bundle.val.x, bundle.val.y, 1000, shuffle=False, device=device)
        return train, val
    train = TensorDataset(bundle.train.x, bundle.train.y)
    val = TensorDataset(bundle.val.x, bundle.val.y)
    return (
        DataLoader(train, batch_size=t.batch_size, shuffle=True, drop_last=drop_last),
        DataLoader(val, batch_size=1000),
    )


def _check_subset(cfg: RunConfig, bundle: DataBundle) -> None:
    if len(bundle.train) == 0:
        raise ConfigError("the training set is empty; check --subset and the data set")
    if cfg.data.subset is not None and len(bundle.train) < cfg.data.subset:
        n = len(bundle.train)
        raise ConfigError(
            f"--subset {cfg.data.subset} is more than the {n:,} training examples of "
            f"{bundle.name} (beside its validation images); use --subset {n} or less, or "
            "--subset all"
        )


@torch.no_grad()
def check_output(model: UQModel, bundle: DataBundle) -> None:
    """Before anything is trained or written: a segmentation network must return logits
    ``[B, C, H, W]`` at its input's size (one validation image through it, eval mode), so that a
    network that forgets to upsample is refused by name instead of failing inside the loss; then
    the method's own preconditions on the model (``Method.check``, e.g. a Laplace's head)."""
    if bundle.dense and len(bundle.val):
        x = bundle.val.x[:1].float().div_(255.0)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model._check_output(x, model.net(x, 1))
        finally:
            model.train(was)
    method = get_method(model.method)
    if method.check is not None:
        method.check(model, bundle)


def check_run(cfg: RunConfig, run_dir: str | Path, bundle: DataBundle) -> None:
    """The refusals of :func:`train_run` that need no earlier state, made without writing
    anything: the config, ``subset`` against the data, the method's model (a bad plan or
    option) and Lightning's set-up. A caller that writes its own files first (the bench)
    calls it for every run before that write."""
    cfg.validate()
    _check_subset(cfg, bundle)
    model = build_method(cfg.method, model_spec(cfg, bundle), cfg.method_options)
    check_output(model, bundle)
    _trainer(cfg, Path(run_dir), model, bundle, [])


def train_run(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    bundle: DataBundle | None = None,
    base_model: UQModel | None = None,
    callbacks: list | None = None,
    budget: Budget | None = None,
) -> UQModel:
    """Train (or resume, or fit post hoc) ``cfg.method``; return the trained :class:`UQModel`.

    ``budget``: stop at an epoch boundary when it runs out; the run is then incomplete
    (``is_complete(run_dir)`` is False, no ``model.safetensors``), the returned model holds
    the weights so far, and ``resume=True`` continues it later.

    ``base_model``: for post-hoc methods, an already trained model of ``posthoc_of`` to start
    from (the bench trains the deterministic network once and reuses it).
    ``callbacks``: extra Lightning callbacks (early stopping, custom logging, ...).
    """
    run_dir = Path(run_dir)
    # every check first, then the first write (config.json): a refused command leaves the run
    # directory as it found it, and the corrected command is not refused in turn
    cfg.validate()
    method = get_method(cfg.method)
    check_writable(run_dir, create=False)
    last = run_dir / "checkpoints" / "last.safetensors"
    if (run_dir / "config.json").is_file() and not resume and not _is_worker():
        state = "a finished run" if is_complete(run_dir) else "an interrupted run"
        raise ConfigError(
            f"{run_dir} already holds {state}; continue it with --resume (a finished run: "
            "--resume --epochs N trains on to N epochs), or choose another output directory"
        )
    trains = method.posthoc_of is None
    check_same_config(run_dir / "config.json", cfg, may_change=("train.epochs",) if trains else ())
    if is_complete(run_dir):
        done = int(json.loads((run_dir / "meta.json").read_text()).get("epochs", 0))
        if not trains or cfg.train.epochs == done:
            return UQModel.load(run_dir / "model.safetensors")
        if cfg.train.epochs < done:
            raise ConfigError(
                f"{run_dir} was trained for {done} epochs; --epochs {cfg.train.epochs} cannot "
                "undo that (give more epochs to extend it)"
            )
        if not last.is_file():
            raise ConfigError(f"{run_dir} has no training checkpoint to extend from")
    if bundle is None:
        d = cfg.data
        bundle = load_bundle(
            d.dataset, val_size=d.val_size, subset=d.subset, split_seed=d.split_seed,
            anomaly_classes=d.anomaly_classes,
        )  # fmt: skip
    _check_subset(cfg, bundle)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    spec = model_spec(cfg, bundle)
    model = build_method(cfg.method, spec, cfg.method_options)  # a bad plan is refused here
    check_output(model, bundle)
    fitting = not (method.posthoc_of is not None and base_model is not None)
    # Lightning's refusals (strategy, devices, precision) too, before anything is written
    fit = _trainer(cfg, run_dir, model, bundle, callbacks or [], budget) if fitting else None
    # one process writes a run directory at a time (a distributed run's workers join rank 0's)
    with contextlib.ExitStack() as hold:
        if not _is_worker():
            hold.enter_context(
                io.exclusive(run_dir, "wait for it to finish, or give this run another --out")
            )
        config_path = run_dir / "config.json"
        io.atomic_write_text(config_path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        t0 = time.time()
        trained_epochs = 0
        is_zero = True
        if fit is None:
            model.load_state_dict(base_model.state_dict())
        else:
            is_zero, trained_epochs = _fit(cfg, run_dir, model, bundle, resume, fit)
            if trained_epochs < cfg.train.epochs:
                return model  # stopped by the budget: resumable, not complete
        train_seconds = time.time() - t0
        if method.fit is not None:
            method.fit(model, bundle)
        if is_zero:
            model.save(run_dir / "model.safetensors", extra={"config": cfg.to_dict()})
            meta = {
                "method": cfg.method,
                "parameters": model.num_parameters(),
                "train_seconds": round(train_seconds, 2),
                "epochs": trained_epochs,
                "n_train": len(bundle.train),
                "temperature": float(model.temperature),
                "torch": torch.__version__,
            }
            chunks = read_progress(run_dir).get("chunks", [])
            images = sum(c.get("train_images", 0) for c in chunks)
            seconds = sum(c.get("train_seconds", 0.0) for c in chunks)
            if trains and chunks:
                meta["chunks"] = len(chunks)
                meta["train_seconds"] = round(sum(c.get("seconds", 0.0) for c in chunks), 2)
                if seconds > 0:
                    meta["train_images_per_s"] = round(images / seconds, 1)
            io.atomic_write_text(run_dir / "meta.json", json.dumps(meta, indent=2))
        return model


def _trainer(
    cfg: RunConfig,
    run_dir: Path,
    model: UQModel,
    bundle: DataBundle,
    callbacks,
    budget: Budget | None = None,
):
    """The Lightning module and trainer of a run (nothing written yet; Lightning's refusal of
    the set-up is a ConfigError here)."""
    t = cfg.train
    augment = _augment(cfg, bundle)
    # the tensor loader augments whole batches itself, on the training device, from its own
    # seeded generators; with a DataLoader the step augments from torch's global generator.
    # A deep ensemble's independent orders (one stream per member) come from the tensor loader
    streams = model.data_streams
    in_loader = t.loader == "tensor" or streams > 1 or bundle.dense
    lit = LitUQ(model, t, n_train=len(bundle.train), augment=None if in_loader else augment)
    info = {k: getattr(t, k) for k in ("precision", "compile", "channels_last")}
    info.update(loader="tensor" if in_loader else "dataloader", data_streams=streams)
    chunk = ChunkControl(run_dir, budget, t.epochs, info)
    ckpt_dir = run_dir / "checkpoints"
    # one file, overwritten (atomically) after every epoch: the state to resume from
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        monitor=None,
        save_top_k=1,
        every_n_epochs=1,
        enable_version_counter=False,
    )
    checkpoint.FILE_EXTENSION = ".safetensors"
    with quiet_lightning():
        try:
            trainer = L.Trainer(
                max_epochs=t.epochs,
                accelerator=t.accelerator,
                devices=t.devices,
                strategy=t.strategy,
                num_nodes=t.num_nodes,
                precision=t.precision,
                callbacks=[checkpoint, RNGState(), chunk, *callbacks],
                logger=CSVLogger(str(run_dir), name="logs"),  # logs/version_N: resumes append
                plugins=[SafeCheckpointIO()],
                enable_progress_bar=t.progress,
                enable_model_summary=False,
                log_every_n_steps=max(1, min(50, len(bundle.train) // t.batch_size)),
                num_sanity_val_steps=0,
                deterministic=False,
            )
        except (ValueError, TypeError, RuntimeError) as e:  # Lightning's misconfigurations
            raise ConfigError(
                f"Lightning refused the training set-up (accelerator={t.accelerator!r}, "
                f"devices={t.devices!r}, strategy={t.strategy!r}, precision={t.precision!r}): {e}"
            ) from e
    return lit, trainer, streams, info


def _fit(cfg: RunConfig, run_dir: Path, model: UQModel, bundle: DataBundle, resume, fit):
    lit, trainer, streams, info = fit
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.safetensors"
    ckpt_path = str(last) if resume and last.is_file() else None
    train_loader, val_loader = _loaders(cfg, bundle, trainer.strategy.root_device, streams)
    # what the run does, not only what was asked: channels-last is ignored on a CPU
    info["channels_last"] = bool(t.channels_last) and trainer.strategy.root_device.type != "cpu"
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    with quiet_lightning():
        trainer.fit(lit, train_loader, val_loader, ckpt_path=ckpt_path)
    model.cpu().to(memory_format=torch.contiguous_format)
    return trainer.is_global_zero, trainer.current_epoch
