import pytest
import torch
from torch import nn

from bnnkit import ConfigError, bayesify
from bnnkit.models import Folded, build_model
from bnnkit.nn import BatchEnsembleConv2d, BatchEnsembleLinear, VariationalConv2d


def small_resnet():
    return build_model("resnet18", (3, 16, 16), 10, width=4)


def test_nested_layers_are_converted():
    model = small_resnet()
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_lin = sum(isinstance(m, nn.Linear) for m in model.modules())
    net = bayesify(model, {"*": "batch_ensemble"}, members=2)
    body = net.body
    assert sum(isinstance(m, BatchEnsembleConv2d) for m in body.modules()) == n_conv
    assert sum(isinstance(m, BatchEnsembleLinear) for m in body.modules()) == n_lin
    # deep names (inside Sequential inside a block) converted, shortcut convs too
    assert isinstance(body.layer2[0].conv1, BatchEnsembleConv2d)
    assert isinstance(body.layer2[0].shortcut[0], BatchEnsembleConv2d)
    # the original model is untouched
    assert isinstance(model.layer2[0].conv1, nn.Conv2d)


def test_exact_name_beats_pattern_and_order_matters():
    model = build_model("lenet5", (1, 28, 28), 10)
    net = bayesify(model, {"fc3": "deterministic", "fc*": "variational", "conv1": "mc_dropout"})
    plan = net.body.bnnkit_plan
    assert plan == {
        "conv1": "mc_dropout",
        "conv2": "deterministic",
        "fc1": "variational",
        "fc2": "variational",
        "fc3": "deterministic",
    }


def test_deterministic_plan_computes_the_same_function():
    model = build_model("lenet5", (1, 28, 28), 10).eval()
    net = bayesify(model, {"*": "deterministic"}).eval()
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(net(x)[0], model(x))


def test_unit_factor_batch_ensemble_equals_original_per_member():
    model = small_resnet().eval()
    net = bayesify(
        model,
        {"*": "batch_ensemble"},
        members=3,
        options={"batch_ensemble": {"factor_init": "ones"}},
    ).eval()
    x = torch.rand(2, 3, 16, 16)
    out = net(x)
    assert out.shape == (3, 2, 10)
    for m in range(3):
        torch.testing.assert_close(out[m], model(x), atol=1e-5, rtol=1e-4)


def test_ensemble_batchnorm_conversion():
    net = bayesify(small_resnet(), {"*": "batch_ensemble"}, members=2, ensemble_batchnorm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) and m.num_features == 4 for m in net.modules())
    assert net(torch.rand(3, 3, 16, 16)).shape == (2, 3, 10)


def test_samples_fold_into_one_pass():
    net = bayesify(build_model("mlp", (1, 8, 8), 3), {"*": "variational"})
    out = net(torch.rand(5, 1, 8, 8), samples=7)
    assert out.shape == (7, 5, 3)
    assert not torch.allclose(out[0], out[1])


def test_plan_errors():
    model = build_model("lenet5", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="unknown layer kind 'bayes'.*valid"):
        bayesify(model, {"*": "bayes"})
    with pytest.raises(ConfigError, match="match no Linear/Conv2d.*conv1"):
        bayesify(model, {"encoder.*": "variational"})
    with pytest.raises(ConfigError, match="members >= 2"):
        bayesify(model, {"*": "batch_ensemble"}, members=1)
    with pytest.raises(ConfigError, match="no ensemble kind"):
        bayesify(model, {"*": "variational"}, members=4)
    with pytest.raises(ConfigError, match="non-empty"):
        bayesify(model, {})


@pytest.mark.parametrize(
    "name,shape,kw",
    [
        ("mlp", (1, 28, 28), {}),
        ("lenet5", (1, 28, 28), {}),
        ("lenet5", (3, 32, 32), {}),
        ("resnet18", (3, 32, 32), {"width": 8}),
        ("wrn28", (3, 32, 32), {"widen": 1}),
    ],
)
def test_models_build_and_convert(name, shape, kw):
    model = build_model(name, shape, 10, **kw)
    assert model(torch.rand(2, *shape)).shape == (2, 10)
    net = bayesify(model, {"*": "variational"})
    assert isinstance(net, Folded)
    assert net(torch.rand(2, *shape), samples=2).shape == (2, 2, 10)
    assert any(isinstance(m, VariationalConv2d) for m in net.modules()) or name == "mlp"


def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown model 'vgg'.*lenet5"):
        build_model("vgg", (1, 28, 28), 10)
