"""Vectorised independent training equals training each network alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnnkit import ConfigError
from bnnkit.posterior.independent import member_order, train_independent


def _build():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def _alone(seed, x, y, epochs, batch_size, lr):
    torch.manual_seed(seed)
    m = _build()
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(epochs):
        order = member_order(seed, epoch, len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return m.state_dict()


def test_each_member_follows_its_own_trajectory_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (50,), generator=g)
    seeds = [3, 7, 11]
    states = train_independent(_build, seeds, x, y, epochs=3, batch_size=16, lr=0.01)
    for s, state in zip(seeds, states):
        ref = _alone(s, x, y, 3, 16, 0.01)
        for k in ref:
            torch.testing.assert_close(state[k], ref[k], rtol=1e-9, atol=1e-11)
    assert not torch.allclose(states[0]["1.weight"], states[1]["1.weight"])
    # data orders differ between members and epochs
    assert not torch.equal(member_order(3, 0, 50), member_order(7, 0, 50))
    assert not torch.equal(member_order(3, 0, 50), member_order(3, 1, 50))


def test_refusals():
    x, y = torch.randn(4, 3, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match="distinct"):
        train_independent(_build, [1, 1], x, y)
    with pytest.raises(ConfigError, match="BatchNorm"):
        train_independent(lambda: nn.Sequential(nn.Flatten(), nn.BatchNorm1d(12)), [1], x, y)
