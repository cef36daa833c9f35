"""Training in chunks and the fast training path: a run stopped at any epoch boundary and
resumed equals the uninterrupted run bitwise, the run directory records every chunk,
channels-last and compiled training compute what eager contiguous training computes, and the
learning-rate schedule is the closed form."""

from __future__ import annotations

import json
import math
import time

import lightning as L
import pytest
import torch

from bnnkit import io
from bnnkit.bench import BenchConfig, run_bench
from bnnkit.cli import EXIT_STOPPED, main
from bnnkit.data import DataBundle, Split
from bnnkit.errors import ConfigError
from bnnkit.train import Budget, RunConfig, is_complete, read_progress, train_run
from bnnkit.train.config import DataConfig, TrainConfig
from bnnkit.train.lit import LitUQ, channels_last_applies, warmup_cosine


def colour_bundle(n=192, seed=0, size=32) -> DataBundle:
    """A small CIFAR-shaped data set whose class is the dominant colour channel plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    base = torch.randint(0, 120, (n, 3, size, size), generator=g)
    base[torch.arange(n), y] += 120
    x = base.clamp(0, 255).to(torch.uint8)
    split = Split(x, y)
    return DataBundle("colours", (3, size, size), 3, (0.3, 0.3, 0.3), (0.25, 0.25, 0.25),
                      split, split.head(64), split.head(64))  # fmt: skip


def _cfg(method="mc_dropout", model="lenet5", epochs=3, **train) -> RunConfig:
    t = dict(epochs=epochs, batch_size=32, progress=False, accelerator="cpu")
    t.update(train)
    return RunConfig(method=method, model=model, seed=7, train=TrainConfig(**t),
                     data=DataConfig("colours", 64))  # fmt: skip


def _weights(run):
    return io.load(run / "model.safetensors", kind="uqmodel")["state_dict"]


FAST = dict(loader="tensor", cutout=8, optimizer="sgd", lr=0.05, warmup_epochs=1)


@pytest.mark.parametrize("train", [FAST, {}], ids=["tensor-loader", "dataloader"])
def test_stopping_at_epoch_boundaries_then_resuming_is_bitwise_the_full_run(tmp_path, train):
    bundle = colour_bundle()
    cfg = _cfg(**train)
    train_run(cfg, tmp_path / "full", bundle=bundle)
    run = tmp_path / "chunked"
    train_run(cfg, run, bundle=bundle, budget=Budget(stop_epoch=1))
    assert not is_complete(run) and not (run / "model.safetensors").exists()
    assert read_progress(run)["status"] == "stopped"
    train_run(cfg, run, resume=True, bundle=bundle, budget=Budget(stop_epoch=2))
    assert read_progress(run)["epochs_done"] == 2
    before = (run / "checkpoints" / "last.safetensors").read_bytes()
    train_run(cfg, run, resume=True, bundle=bundle, budget=Budget(stop_epoch=2))  # no-op
    assert read_progress(run)["epochs_done"] == 2 and len(read_progress(run)["chunks"]) == 2
    assert (run / "checkpoints" / "last.safetensors").read_bytes() == before
    train_run(cfg, run, resume=True, bundle=bundle)
    assert is_complete(run)
    full, chunked = _weights(tmp_path / "full"), _weights(run)
    assert full.keys() == chunked.keys()
    assert all(torch.equal(full[k], chunked[k]) for k in full)
    rec = read_progress(run)
    assert rec["status"] == "complete" and rec["epochs_done"] == 3
    spans = [(c["start_epoch"], c["end_epoch"]) for c in rec["chunks"]]
    assert spans == [(0, 1), (1, 2), (2, 3)]
    steps = (192 // 32) * 32  # drop_last batches of 32
    for c in rec["chunks"]:
        assert c["train_images"] == steps and c["images_per_s"] > 0
        assert c["loader"] == cfg.train.loader and c["device"].startswith("cpu")
    assert [c["stop"] for c in rec["chunks"]] == ["stop at epoch 1", "stop at epoch 2", ""]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["chunks"] == 3 and meta["train_images_per_s"] > 0


def test_a_time_budget_stops_at_the_first_epoch_boundary_that_does_not_fit(tmp_path):
    bundle = colour_bundle()
    run = tmp_path / "run"
    train_run(_cfg(), run, bundle=bundle, budget=Budget(deadline=time.time()))
    rec = read_progress(run)
    assert rec["epochs_done"] == 1 and rec["chunks"][0]["stop"] == "time budget"
    assert (run / "checkpoints" / "last.safetensors").is_file()
    # a budget that fits everything lets the run finish
    train_run(_cfg(), run, resume=True, bundle=bundle, budget=Budget.minutes(60))
    assert is_complete(run) and read_progress(run)["epochs_done"] == 3


class _Epochs(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.seen.append(trainer.train_dataloader.sampler.epoch)


def test_lightning_sets_the_tensor_loaders_epoch(tmp_path):
    rec = _Epochs()
    train_run(_cfg(**FAST), tmp_path / "r", bundle=colour_bundle(), callbacks=[rec])
    assert rec.seen == [0, 1, 2]


def _resnet_lit(channels_last: bool, bundle: DataBundle) -> LitUQ:
    from bnnkit.methods import build_method
    from bnnkit.train.run import model_spec

    cfg = _cfg("batch_ensemble", "resnet18")
    cfg.model_options = {"width": 8}
    torch.manual_seed(0)
    model = build_method("batch_ensemble", model_spec(cfg, bundle), {})
    lit = LitUQ(model, cfg.train, len(bundle.train), None)
    lit.on_fit_start()
    # the layout an accelerator run uses, forced here (the option is ignored on a CPU)
    lit.channels_last = channels_last
    if channels_last:
        lit.model.to(memory_format=torch.channels_last)
    return lit


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # a step outside a Trainer
def test_a_channels_last_step_has_the_loss_and_gradients_of_a_contiguous_one():
    """In float64 (float32 rounding differs between the layouts' kernels and a small-batch
    BatchNorm network amplifies it to ~0.3 % of a gradient); float64 convolutions do not go
    through oneDNN, whose float32 channels-last kernels are unsafe on some CPUs."""
    bundle = colour_bundle(n=32)
    batch = (bundle.train.x.double() / 255, bundle.train.y)
    grads, losses = [], []
    for channels_last in (False, True):
        lit = _resnet_lit(channels_last, bundle)
        lit.model.double()
        conv = lit.model.net.body.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        loss = lit.training_step(batch, 0)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in lit.model.named_parameters()})
    assert torch.allclose(losses[0], losses[1], atol=1e-12)
    for k, g in grads[0].items():
        assert torch.allclose(g, grads[1][k], atol=1e-12), k


def test_channels_last_is_ignored_on_a_cpu_with_a_warning(tmp_path):
    """oneDNN's float32 channels-last convolution backward crashes or hangs on some AVX2 CPUs
    (a 1x1 stride-2 convolution from 4 channels at batch 50, as in a width-4 ResNet-18): on a
    CPU the option is a warned no-op, the run trains in the standard layout and records so."""
    assert channels_last_applies(True, "cuda") and not channels_last_applies(False, "cuda")
    with pytest.warns(UserWarning, match="channels_last is ignored on a CPU"):
        assert not channels_last_applies(True, torch.device("cpu"))
    bundle = colour_bundle(n=64)
    cfg = _cfg("batch_ensemble", "resnet18", epochs=1, optimizer="sgd", lr=0.02,
               loader="tensor", channels_last=True, batch_size=50)  # fmt: skip
    cfg.model_options = {"width": 4}

    class _Layout(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            w = pl_module.model.net.body.conv1.weight  # [8, 3, 3, 3]: the layouts differ
            self.seen.append(w.is_contiguous(memory_format=torch.channels_last))

    rec = _Layout()
    with pytest.warns(UserWarning, match="channels_last is ignored on a CPU"):
        model = train_run(cfg, tmp_path / "r", bundle=bundle, callbacks=[rec])
    assert rec.seen and not any(rec.seen)
    assert read_progress(tmp_path / "r")["chunks"][-1]["channels_last"] is False
    assert all(p.is_contiguous() for p in model.state_dict().values())
    train_run(cfg, tmp_path / "r", resume=True, bundle=bundle)  # a finished run reloads
    saved = _weights(tmp_path / "r")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_compiled_training_step_matches_eager_and_keeps_checkpoint_keys(tmp_path):
    bundle = colour_bundle(n=32, size=8)
    opts = dict(epochs=1, optimizer="sgd", lr=0.05, loader="tensor", augment=False)
    # deterministic: compiled dropout draws its masks from another generator than eager's
    kw = dict(method="deterministic", model="mlp", **opts)
    eager = train_run(_cfg(**kw), tmp_path / "e", bundle=bundle)
    comp = train_run(_cfg(**kw, compile="default"), tmp_path / "c", bundle=bundle)
    se, sc = eager.state_dict(), comp.state_dict()
    assert se.keys() == sc.keys()
    assert all(torch.allclose(se[k], sc[k], atol=1e-5) for k in se)
    ckpt = io.load(tmp_path / "c" / "checkpoints" / "last.safetensors", kind="lightning")
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


def test_warmup_cosine_schedule_and_sgd_choice():
    assert [warmup_cosine(e, 2, 10) for e in (0, 1)] == [0.5, 1.0]
    assert warmup_cosine(2, 2, 10) == 1.0
    assert math.isclose(warmup_cosine(6, 2, 10), 0.5)
    assert math.isclose(warmup_cosine(10, 2, 10), 0.0, abs_tol=1e-12)
    from bnnkit.methods import build_method
    from bnnkit.train.run import model_spec

    cfg = _cfg(optimizer="sgd", momentum=0.8, warmup_epochs=1)
    lit = LitUQ(build_method("deterministic", model_spec(cfg, colour_bundle(8)), {}), cfg.train,
                8, None)  # fmt: skip
    opt = lit.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"]


@pytest.mark.parametrize(
    "train,match",
    [
        (dict(cutout=8, augment=False), "cutout > 0 needs augmentation"),
        (dict(warmup_epochs=3), "warmup_epochs"),
        (dict(loader="gpu"), "loader"),
        (dict(compile="fast"), "compile"),
        (dict(optimizer="lamb"), "optimizer"),
        (dict(momentum=1.0), "momentum"),
    ],
)
def test_bad_training_options_are_refused_before_any_work(tmp_path, train, match):
    with pytest.raises(ConfigError, match=match):
        train_run(_cfg(**train), tmp_path / "r", bundle=colour_bundle(8))
    assert not (tmp_path / "r" / "config.json").exists()


def test_cli_stop_at_epoch_exits_75_and_resume_finishes(tmp_path, capsys):
    args = ["train", "--method", "deterministic", "--subset", "256", "--batch-size", "64",
            "--epochs", "2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "r"),
            "--train-option", "loader=tensor", "--train-option", "optimizer=sgd"]  # fmt: skip
    assert main([*args, "--stop-at-epoch", "1"]) == EXIT_STOPPED
    assert "stopped at epoch 1 of 2" in capsys.readouterr().out
    assert main([*args, "--resume", "--max-minutes", "30"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["train"]["loader"] == "tensor" and cfg["train"]["optimizer"] == "sgd"
    assert main([*args[:-2], "--train-option", "cutout=abc"]) == 2
    assert "cutout" in capsys.readouterr().err


def test_bench_with_an_exhausted_budget_stops_and_the_same_call_continues(tmp_path):
    cfg = BenchConfig(
        methods=["deterministic"], epochs=1, seeds=1, subset=128, test_size=64, angles=[],
        corruptions=[], out=str(tmp_path / "b"), progress=False, max_minutes=1e-6,
        train_options={"loader": "tensor", "optimizer": "sgd"}, model="mlp",
        model_options={"hidden": [16]},
    )  # fmt: skip
    assert run_bench(cfg, log=lambda *_: None) is None
    assert not (tmp_path / "b" / "results.md").exists()
    cfg.max_minutes = None
    assert "deterministic" in run_bench(cfg, log=lambda *_: None)
    run = json.loads((tmp_path / "b" / "runs" / "deterministic-seed0" / "config.json").read_text())
    assert run["model_options"] == {"hidden": [16]}
    assert run["train"]["loader"] == "tensor" and run["train"]["optimizer"] == "sgd"
    # rows kept from an earlier call must be scored on the OOD sets available now
    stored = json.loads((tmp_path / "b" / "bench_config.json").read_text())
    assert stored["ood_sets"] == sorted(stored["ood_sets"])
    stored["ood_sets"] = ["svhn"]
    (tmp_path / "b" / "bench_config.json").write_text(json.dumps(stored))
    with pytest.raises(ConfigError, match="OOD sets"):
        run_bench(cfg, log=lambda *_: None)
    with pytest.raises(ConfigError, match="hidden"):
        BenchConfig(model="mlp", model_options={"hidden": [0]}).validate()
    with pytest.raises(ConfigError, match="warmup_epochs"):
        BenchConfig(epochs=2, train_options={"warmup_epochs": 2}).validate()
    with pytest.raises(ConfigError, match="top level"):
        BenchConfig(train_options={"epochs": 3}).validate()
    with pytest.raises(ConfigError, match="cutout"):
        BenchConfig(train_options={"cutout": -1}).validate()


@pytest.mark.parametrize("order", ["independent", "shared"])
def test_deep_ensemble_members_each_see_every_example_in_their_own_order(tmp_path, order):
    bundle = colour_bundle(n=96)
    bundle.train.x[:, 0, 0, 0] = torch.arange(96, dtype=torch.uint8)  # the example's index
    cfg = _cfg("deep_ensemble", "lenet5", epochs=1, augment=False)
    cfg.method_options = {"members": 3, "data_order": order}
    seen: dict[int, list] = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            for m, net in enumerate(pl_module.model.net.ensemble):

                def hook(mod, args, m=m):
                    if mod.training:
                        seen.setdefault(m, []).append(
                            (args[0][:, 0, 0, 0] * 255).round().long().cpu()
                        )

                net.register_forward_pre_hook(hook)

    train_run(cfg, tmp_path / "de", bundle=bundle, callbacks=[Spy()])
    orders = [torch.cat(seen[m]) for m in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == list(range(96))  # 96 = 3 batches of 32: nothing dropped
    same = [torch.equal(orders[0], orders[m]) for m in (1, 2)]
    assert same == ([False, False] if order == "independent" else [True, True])
    rec = read_progress(tmp_path / "de")["chunks"][0]
    assert rec["train_images"] == 96 and rec["data_streams"] == (3 if order == "independent" else 1)
