"""SWAG against brute force: the moments are those of the SGD snapshots, the draws have the
SWAG covariance diag(var)/2 + D^T D / (2 (K - 1)), the network is never modified, BatchNorm
statistics of draws are re-estimated, and collections from runs refuse what SWAG cannot use."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import CheckpointError, ConfigError, InputError
from bnnkit.posterior import Collection, collect_swag, fit_swag, swag_states


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _sgd_snapshots(net, x, y, epochs, every, seed, lr=0.1, batch=8):
    """SGD (momentum 0.9, weight decay 5e-4) by hand on a copy, reshuffled every epoch from
    ``seed``; the flat weights after every ``every``-th step of an epoch, stacked."""
    work = copy.deepcopy(net)
    opt = torch.optim.SGD(work.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g, snaps = torch.Generator().manual_seed(seed), []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for step in range(-(-len(x) // batch)):
            idx = perm[step * batch : (step + 1) * batch]
            opt.zero_grad()
            F.cross_entropy(work(x[idx]), y[idx]).backward()
            opt.step()
            if (step + 1) % every == 0:
                snaps.append(torch.cat([p.detach().reshape(-1) for p in work.parameters()]))
    return torch.stack(snaps)


def test_moments_are_those_of_the_sgd_snapshots():
    net, (x, y) = _net(), _data()
    before = copy.deepcopy(net.state_dict())
    sw = fit_swag(net, x, y, epochs=3, lr=0.1, batch_size=8, snapshots_per_epoch=3, rank=4,
                  seed=1)  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # untouched
    # brute force: the same SGD by hand, snapshots kept explicitly
    S = _sgd_snapshots(net, x, y, epochs=3, every=2, seed=1)
    assert sw.n_snapshots == len(S) == 9
    torch.testing.assert_close(sw.mean, S.mean(0))
    torch.testing.assert_close(sw.variance, S.var(0, unbiased=False), atol=1e-12, rtol=1e-8)
    # deviations: the last 4 snapshots minus the running mean at their time
    running = torch.cumsum(S, 0) / torch.arange(1, 10, dtype=S.dtype)[:, None]
    torch.testing.assert_close(sw.deviations, (S - running)[-4:])


def test_draws_have_the_swag_covariance():
    net, (x, y) = _net(), _data()
    sw = fit_swag(net, x, y, epochs=4, lr=0.2, batch_size=8, snapshots_per_epoch=6, rank=5)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sw.sample(g) for _ in range(40000)])
    K = len(sw.deviations)
    cov = torch.diag(sw.variance) / 2 + sw.deviations.T @ sw.deviations / (2 * (K - 1))
    emp = torch.cov(draws.T)
    scale = cov.diagonal().max()
    assert float((emp - cov).abs().max() / scale) < 0.05
    assert float(((draws.mean(0) - sw.mean).abs() / cov.diagonal().sqrt()).max()) < 0.05
    diag = fit_swag(net, x, y, epochs=4, lr=0.2, batch_size=8, snapshots_per_epoch=6, rank=0)
    assert diag.deviations.shape == (0, len(diag.mean))
    d = torch.stack([diag.sample(g) for _ in range(20000)])
    ratio = d.var(0) / (diag.variance / 2)
    assert float((ratio - 1).abs().max()) < 0.1


def test_states_load_and_batchnorm_is_reestimated():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = _data()
    sw = fit_swag(net, x, y, epochs=2, lr=0.05, batch_size=8, rank=2)
    with pytest.raises(InputError, match="bn_data"):
        swag_states(net, sw, 2)
    states = swag_states(net, sw, 3, seed=0, bn_data=x)
    again = swag_states(net, sw, 3, seed=0, bn_data=x)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(states, again) for k in a)  # seeded
    probe = copy.deepcopy(net)
    probe.load_state_dict(states[0])
    probe.train()
    with torch.no_grad():
        h = probe[0](x)
    torch.testing.assert_close(states[0]["1.running_mean"], h.mean(0))
    assert not torch.equal(states[0]["0.weight"], states[1]["0.weight"])
    for bad in ({"epochs": 0}, {"rank": -1}, {"lr": 0.0}):
        with pytest.raises(InputError):
            fit_swag(net, x, y, **bad)


def test_collect_swag_from_a_run(tmp_path):
    run = tmp_path / "det"
    r = subprocess.run([sys.executable, "-m", "bnnkit.cli", "train", "--method", "deterministic",
                        "--model", "mlp", "--epochs", "1", "--subset", "300", "--out", str(run),
                        "--quiet"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    col = collect_swag(tmp_path / "sw", run, samples=3, epochs=1, snapshots_per_epoch=2)
    assert len(col) == 3 and {m.method for m in col.members} == {"swag"}
    assert collect_swag(tmp_path / "sw", run, samples=3).members == col.members  # nothing to do
    r = subprocess.run([sys.executable, "-m", "bnnkit.cli", "posterior", "collect", "--swag",
                        "--out", str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 2 and "--from-run" in r.stderr
    with pytest.raises(CheckpointError, match="does not exist"):
        collect_swag(tmp_path / "y", tmp_path / "nothing-here", samples=1)
    (run / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="data split"):
        collect_swag(tmp_path / "z", run, samples=1)
    assert Collection.open(tmp_path / "sw").arch["model"] == "mlp"


def test_the_swag_selection_rule_has_the_variance_of_every_sgd_step():
    """``laplace.selection.swag_variance`` (the SWAG subnetwork rule) is the diagonal of SWAG
    with a snapshot after every step; tensors and a DataLoader of them give the same."""
    from torch.utils.data import DataLoader, TensorDataset

    from bnnkit.laplace import swag_variance

    net, (x, y) = _net(), _data()
    var = swag_variance(net, (x, y), epochs=2, lr=0.1, batch_size=8, seed=2)
    S = _sgd_snapshots(net, x, y, epochs=2, every=1, seed=2)
    torch.testing.assert_close(var, S.var(0, unbiased=False), atol=1e-12, rtol=1e-8)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    assert torch.equal(swag_variance(net, loader, epochs=2, lr=0.1, batch_size=8, seed=2), var)
    with pytest.raises(InputError, match="SWAG"):
        swag_variance(net, (x[:8], y[:8]), epochs=1, batch_size=8)  # one step: no variance
