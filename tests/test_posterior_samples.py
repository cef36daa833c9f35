"""Posterior samples of bnnkit models as plain networks: exact for members with fixed weights,
the right distribution for sampled kinds, refused where no weight-space sample exists."""

import pytest
import torch

from bnnkit import ConfigError
from bnnkit.laplace import DiagLaplace, LastLayerLaplace, SubnetLaplace
from bnnkit.methods import ModelSpec, build_method
from bnnkit.posterior.samples import network_samples

SPEC = ModelSpec("lenet5", (1, 28, 28), 10)


def _plain_probs(model, samples, x, seed=0):
    plain = SPEC.build().eval()
    out = []
    for _, state in network_samples(model, samples, seed):
        plain.load_state_dict(state)
        with torch.no_grad():
            out.append(plain(x).softmax(-1))
    return torch.stack(out)


@pytest.mark.parametrize("method", ["deterministic", "deep_ensemble", "batch_ensemble"])
def test_fixed_members_are_exact(method):
    torch.manual_seed(0)
    model = build_method(method, SPEC, {}).eval()
    with torch.no_grad():  # make members differ visibly (BatchEnsemble factors start near 1)
        for name, p in model.net.named_parameters():
            if name.endswith((".r", ".s")):
                p.mul_(1 + 0.3 * torch.randn_like(p))
    x = torch.rand(6, 1, 28, 28)
    got = _plain_probs(model, 1, x)
    torch.testing.assert_close(got, model.predict(x).probs, rtol=1e-5, atol=1e-6)


def test_mc_dropout_samples_mask_whole_input_columns():
    torch.manual_seed(0)
    model = build_method("mc_dropout", SPEC, {"p": 0.5})
    w = dict(model.net.body.named_modules())["fc1"][1].weight.detach()
    zero_frac = []
    for _, state in network_samples(model, 40):
        e = state["fc1.weight"]
        dead = (e == 0).all(0)
        torch.testing.assert_close(e[:, ~dead], w[:, ~dead] * 2)  # kept columns: W / (1 - p)
        zero_frac.append(float(dead.float().mean()))
    assert abs(sum(zero_frac) / len(zero_frac) - 0.5) < 0.03


def test_variational_samples_have_the_posterior_moments():
    torch.manual_seed(0)
    model = build_method("mfvi", SPEC, {"init_sigma": 0.05})
    fc = dict(model.net.body.named_modules())["fc2"]
    draws = torch.stack([s["fc2.weight"] for _, s in network_samples(model, 400)])
    mu, sigma = fc.weight_mu.detach(), fc.sigma(fc.weight_rho.detach())
    z = (draws.mean(0) - mu) / (sigma / 400**0.5)  # standard normal per weight
    assert abs(float(z.mean())) < 0.1 and 0.9 < float(z.std()) < 1.1
    ratio = draws.std(0) / sigma
    assert abs(float(ratio.mean()) - 1) < 0.01 and float((ratio - 1).abs().max()) < 0.3


@pytest.mark.parametrize("method", ["rank1", "lpbnn"])
def test_rank1_family_samples_are_w_times_a_rank1_factor(method):
    torch.manual_seed(0)
    model = build_method(method, SPEC, {})
    w = dict(model.net.body.named_modules())["fc2"].weight.detach()
    (_, a), (_, b) = list(network_samples(model, 2))[:2]  # member 0, two draws
    for state in (a, b):
        ratio = (state["fc2.weight"] / w).double()
        sv = torch.linalg.svdvals(ratio)
        assert sv[1] < 1e-5 * sv[0]  # s r^T
    if method == "rank1":
        assert not torch.equal(a["fc2.weight"], b["fc2.weight"])  # factors are sampled


def test_predictive_of_the_samples_is_the_models():
    """The plain samples' mean prediction equals the model's, up to Monte Carlo error."""
    torch.manual_seed(0)
    model = build_method("mc_dropout", SPEC, {"p": 0.5, "samples": 100}).eval()
    with torch.no_grad():
        for p in model.net.parameters():
            p.mul_(4)  # a confident network, so that dropout moves its predictions
    x = torch.rand(4, 1, 28, 28)
    torch.manual_seed(1)
    ref = model.predict(x).probs.mean(0)
    got = _plain_probs(model, 100, x).mean(0)
    spread = model.predict(x).probs.std(0)  # per-sample spread of the model's predictions
    assert float((got - ref).abs().max()) < float(5 * spread.max() * (2 / 100) ** 0.5)
    assert float(spread.max()) > 0.05  # the check is not vacuous


def _fitted_laplace(kind):
    torch.manual_seed(0)
    model = build_method("deterministic", SPEC, {}).eval()
    data = (torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,)))
    if kind == "diag":
        la = DiagLaplace(model, prior_precision=50.0)
    elif kind == "last_layer":
        la = LastLayerLaplace(model, prior_precision=50.0)
    else:
        la = SubnetLaplace(model, torch.randperm(61706)[:300], prior_precision=50.0)
    model.posterior = la.fit(data)
    return model, la


@pytest.mark.parametrize("kind", ["diag", "last_layer", "subnetwork"])
def test_laplace_samples_are_the_sampled_weights_predictive(kind):
    """Plain networks loaded with the exported draws compute exactly the Laplace
    ``sample_weights`` predictive with the same seed (the same draws in the same order), only
    the posterior's weights move, and the model is left exactly as it was."""
    model, la = _fitted_laplace(kind)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    x = torch.rand(5, 1, 28, 28)
    got = _plain_probs(model, 6, x, seed=3)
    ref = la.predictive(x, link="sample_weights", n_samples=6, seed=3).probs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert float((got[0] - got[1]).abs().max()) > 1e-4  # draws differ
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, before[k]), k
    moved, changed = set(), 0
    for _, state in network_samples(model, 1, seed=1):
        for k, v in state.items():
            diff = int((v != before["body." + k]).sum())
            changed += diff
            if diff:
                moved.add(k.rsplit(".", 1)[0])
    layers = {"conv1", "conv2", "fc1", "fc2", "fc3"}
    expect = {"diag": layers, "last_layer": {"fc3"}, "subnetwork": moved & layers}[kind]
    assert moved == expect and moved
    if kind == "subnetwork":
        assert 0 < changed <= 300  # only the subnetwork's weights are drawn


def test_diag_laplace_samples_have_the_posterior_moments():
    model, la = _fitted_laplace("diag")
    draws = torch.stack([torch.cat([s["fc3.weight"].flatten(), s["fc3.bias"]])
                         for _, s in network_samples(model, 300)]).double()  # fmt: skip
    sl = [s for s in la.slots if s.param is model.net.body.fc3.weight][0]
    sb = [s for s in la.slots if s.param is model.net.body.fc3.bias][0]
    idx = torch.cat([torch.arange(sl.offset, sl.offset + sl.numel),
                     torch.arange(sb.offset, sb.offset + sb.numel)])  # fmt: skip
    mean, std = la.mean[idx], la.posterior_variance.sqrt()[idx]
    z = (draws.mean(0) - mean) / (std / 300**0.5)
    assert abs(float(z.mean())) < 0.1 and 0.9 < float(z.std()) < 1.1
    assert abs(float((draws.std(0) / std).mean()) - 1) < 0.01


def test_refusals():
    model = build_method("deterministic", SPEC, {})
    with pytest.raises(ConfigError, match="samples must be >= 1"):
        list(network_samples(model, 0))
    model.posterior = DiagLaplace(model)  # attached but never fitted
    with pytest.raises(Exception, match="fit"):
        list(network_samples(model, 1))
