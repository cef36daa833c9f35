"""Training end to end on real Fashion-MNIST (tiny subsets), resume, and 2-process DDP."""

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from bnnkit import CheckpointError, ConfigError, Predictive, io
from bnnkit.data import load_bundle
from bnnkit.methods import UQModel
from bnnkit.train import DataConfig, RunConfig, TrainConfig, train_run


@pytest.fixture(scope="module")
def bundle():
    return load_bundle("fashion_mnist", val_size=500, subset=600, test_size=500)


def cfg(method="deterministic", epochs=1, **opts):
    return RunConfig(
        method=method,
        method_options=opts,
        data=DataConfig(subset=600, val_size=500),
        train=TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, progress=False),
    )


def test_training_learns_and_writes_a_run_directory(bundle, tmp_path):
    model = train_run(cfg(epochs=2), tmp_path / "run", bundle=bundle)
    run = tmp_path / "run"
    assert {"config.json", "meta.json", "model.safetensors", "checkpoints", "logs"} <= {
        p.name for p in run.iterdir()
    }
    assert json.loads((run / "config.json").read_text())["method"] == "deterministic"
    acc = (model.predict(bundle.test.float()).prediction() == bundle.test.y).float().mean()
    assert acc > 0.5  # 10 classes: chance is 0.1
    again = UQModel.load(run / "model.safetensors")
    x = bundle.test.float()[:20]
    torch.testing.assert_close(again.predict(x).probs, model.predict(x).probs)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train_run(cfg(epochs=2), run, bundle=bundle)
    # resuming with another config would silently mix results: refused (only epochs may grow)
    changed = cfg(epochs=2)
    changed.train.lr = 1e-2
    with pytest.raises(ConfigError, match=r"different config \(train.lr: 0.003 -> 0.01\)"):
        train_run(changed, run, bundle=bundle, resume=True)
    with pytest.raises(ConfigError, match="trained for 2 epochs; --epochs 1 cannot undo"):
        train_run(cfg(epochs=1), run, bundle=bundle, resume=True)


class _Crash(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def test_resume_continues_after_the_last_finished_epoch(bundle, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(cfg(epochs=3), run, bundle=bundle, callbacks=[_Crash()])
    ckpt = io.load(run / "checkpoints" / "last.safetensors", kind="lightning")
    assert ckpt["epoch"] == 0 and ckpt["global_step"] > 0
    steps_per_epoch = ckpt["global_step"]
    assert not (run / "meta.json").exists()

    seen = []

    class _Record(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(trainer.current_epoch)

    train_run(cfg(epochs=3), run, bundle=bundle, resume=True, callbacks=[_Record()])
    assert seen == [1, 2]  # epoch 0 was not trained again
    final = io.load(run / "checkpoints" / "last.safetensors", kind="lightning")
    assert final["global_step"] == 3 * steps_per_epoch
    assert json.loads((run / "meta.json").read_text())["epochs"] == 3
    # the interrupted attempt's log is kept beside the resumed one
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0", "version_1"]


def _independent_gaussian_kl(net, prior_sigma):
    """KL(q || N(0, prior_sigma^2)) summed over every variational weight and bias, from
    torch.distributions (not bnnkit's formula)."""
    total = torch.zeros((), dtype=torch.float64)
    prior_sigma = torch.tensor(prior_sigma, dtype=torch.float64)
    for name, p in net.named_parameters():
        if name.endswith("_mu"):
            rho = dict(net.named_parameters())[name[:-3] + "_rho"]
            q = torch.distributions.Normal(p.double(), torch.nn.functional.softplus(rho.double()))
            prior = torch.distributions.Normal(
                torch.zeros_like(p, dtype=torch.float64), prior_sigma
            )
            total = total + torch.distributions.kl_divergence(q, prior).sum()
    return total


@pytest.mark.parametrize("kl_weight, anneal, epoch, factor", [(1.0, 0, 0, 1.0), (0.3, 4, 1, 0.5)])
def test_variational_loss_is_nll_plus_scaled_kl(kl_weight, anneal, epoch, factor):
    """The training loss is mean CE + kl_weight * anneal(epoch) * KL / N, KL recomputed with
    torch.distributions: removing or mis-scaling the KL term fails this."""
    from bnnkit.methods import ModelSpec, build_method
    from bnnkit.train.lit import LitUQ

    spec = ModelSpec("lenet5", (1, 28, 28), 10)
    model = build_method("mfvi", spec, {"samples": 2, "kl_weight": kl_weight, "prior_sigma": 0.5})
    t = TrainConfig(epochs=5, kl_anneal_epochs=anneal, progress=False)
    lit = LitUQ(model, t, n_train=1234, augment=None)
    lit.log = lambda *a, **k: None  # no trainer attached
    type(lit).current_epoch = property(lambda self: epoch)
    try:
        x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
        torch.manual_seed(5)
        loss = lit.training_step((x, y), 0)
        torch.manual_seed(5)
        logits = model(x, 1)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), y.repeat(len(logits)))
        kl = _independent_gaussian_kl(model.net, 0.5)
        expected = ce.double() + kl_weight * factor * kl / 1234
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        assert float((kl_weight * factor * kl / 1234).detach()) > 0.01 * float(ce.detach())
    finally:
        del type(lit).current_epoch


def test_temperature_scaling_recovers_a_known_temperature_on_validation(bundle, tmp_path):
    """Validation labels drawn from softmax(logits / 2.5) of the trained network's own logits:
    the fitted temperature is 2.5 (within sampling error) and predictions use it."""
    from bnnkit.methods import get_method

    model = train_run(cfg("temperature_scaling"), tmp_path / "ts", bundle=bundle)
    assert json.loads((tmp_path / "ts" / "meta.json").read_text())["temperature"] == float(
        model.temperature
    )
    g = torch.Generator().manual_seed(0)
    x = bundle.train.float()[:600].repeat(10, 1, 1, 1)
    logits = 3.0 * model.logits(x)[0]  # sharpen: a clearly non-trivial temperature to find
    y = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=g).squeeze(1)

    class Val:
        def float(self):
            return x

    Val.y = y
    model.logits = lambda _x, *a, **k: logits[None]
    get_method("temperature_scaling").fit(model, type("B", (), {"val": Val()})())
    assert float(model.temperature) == pytest.approx(2.5, rel=0.05)
    del model.logits
    xt = bundle.test.float()[:20]
    expected = torch.softmax(model.logits(xt)[0] / model.temperature, -1)
    torch.testing.assert_close(model.predict(xt).mean(), expected)


def test_corrupt_checkpoint_gives_clear_error(bundle, tmp_path):
    run = tmp_path / "run"
    train_run(cfg(), run, bundle=bundle)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        UQModel.load(run / "model.safetensors")


def test_ddp_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "bnnkit.cli", "train", "--method", "deterministic",
        "--subset", "256", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
        "--devices", "2", "--strategy", "ddp", "--out", str(out), "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["epochs"] == 1
    # two ranks: each saw half of the 256 examples (4 steps of 32 per rank)
    ckpt = io.load(out / "checkpoints" / "last.safetensors", kind="lightning")
    assert ckpt["global_step"] == 4


def test_weight_decay_only_on_shared_weights():
    from bnnkit.methods import ModelSpec, build_method
    from bnnkit.train.lit import LitUQ

    model = build_method("rank1", ModelSpec("lenet5", (1, 28, 28), 10))
    lit = LitUQ(model, TrainConfig(weight_decay=1e-4), n_train=100, augment=None)
    groups = lit.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert "net.body.conv1.conv.weight" in decayed and "net.body.fc1.weight" in decayed
    assert not any(n.endswith(("loc", "rho", "bias")) for n in decayed)


def test_split_protocol_gives_each_member_a_chunk(bundle, tmp_path):
    c = cfg("batch_ensemble", members=4)
    c.train.ensemble_protocol = "split"
    seen = []

    class _Rows(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                handle = pl_module.model.net.body.conv1.register_forward_hook(
                    lambda m, i, o: seen.append(i[0].shape[0])
                )
                pl_module._hook = handle

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                pl_module._hook.remove()

    train_run(c, tmp_path / "split", bundle=bundle, callbacks=[_Rows()])
    # the batch of 64 is divided among 4 members, not repeated to 256: one pass of 64 rows
    # (fold schedule) or four passes of 16 (members schedule, the CPU default)
    assert sum(seen) == 64 and set(seen) in ({64}, {16})
    bad = cfg()
    bad.train.ensemble_protocol = "scatter"
    with pytest.raises(ConfigError, match="ensemble_protocol"):
        train_run(bad, tmp_path / "bad", bundle=bundle)


@pytest.mark.parametrize(
    "method,opts",
    [
        ("laplace_subnetwork", {"n_params": 300, "n_fit": 200}),
        ("laplace_last_layer", {"n_fit": 200, "prior": "gridsearch"}),
        ("laplace_diag", {"n_fit": 200, "link": "mc", "samples": 8}),
    ],
)
def test_laplace_methods_fit_post_hoc_and_round_trip(bundle, tmp_path, method, opts):
    base = train_run(cfg(), tmp_path / "det", bundle=bundle)
    c = cfg(method, **opts)
    model = train_run(c, tmp_path / method, bundle=bundle, base_model=base)
    x = bundle.test.float()[:40]
    pred = model.predict(x)
    map_probs = base.predict(x).mean()
    assert pred.probs.shape[1:] == (40, 10)
    assert (pred.mean() - map_probs).abs().max() > 1e-4  # the posterior changes the predictive
    # more uncertain than the MAP on average (the diagonal posterior over all 61k weights, tuned
    # by marginal likelihood on 200 examples, is far wider than the others)
    assert pred.entropy().mean() > Predictive(map_probs).entropy().mean()
    if method != "laplace_diag":
        assert (pred.mean().argmax(-1) == map_probs.argmax(-1)).float().mean() > 0.9
    loaded = UQModel.load(tmp_path / method / "model.safetensors")
    torch.testing.assert_close(loaded.predict(x).probs, pred.probs)


def test_diagonal_fit_is_shared_only_for_the_same_weights_and_data(bundle, tmp_path):
    from bnnkit.laplace import DiagLaplace
    from bnnkit.methods.laplace import _diagonal_fit

    base = train_run(cfg(), tmp_path / "det", bundle=bundle).eval()
    data = (bundle.train.float()[:64], bundle.train.y[:64])
    a = _diagonal_fit(base, data, "1GB", bundle)
    b = _diagonal_fit(base, data, "1GB", bundle)  # reused, rebound to the model it is asked for
    assert b is not a and torch.equal(a.h, b.h)
    torch.testing.assert_close(b.jacobian_energy, a.jacobian_energy)
    other = (data[0], (data[1] + 1) % 10)  # same images, other labels: a new fit (the GGN
    assert _diagonal_fit(base, other, "1GB", bundle).loss != a.loss  # is label-free, loss not)
    with torch.no_grad():
        next(base.net.parameters()).mul_(1.5)  # other weights: a new fit, equal to a fresh one
    c = _diagonal_fit(base, data, "1GB", bundle)
    fresh = DiagLaplace(base, memory_budget="1GB").fit(data, n_total=len(bundle.train))
    assert not torch.equal(c.h, a.h)
    torch.testing.assert_close(c.h, fresh.h)
    # 64 of the 600 training images: curvature and loss are those of the whole set
    plain = DiagLaplace(base, memory_budget="1GB").fit(data)
    torch.testing.assert_close(c.h, plain.h * len(bundle.train) / 64)
    assert c.loss == pytest.approx(plain.loss * len(bundle.train) / 64)
    assert c.n_data == len(bundle.train)
