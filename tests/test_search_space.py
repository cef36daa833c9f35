"""Placement plans as data and the space of plans: round trips, clear refusals, only valid
plans enumerated or sampled."""

import random

import pytest
import torch

from bnnkit import ConfigError, bayesify
from bnnkit.models import build_model
from bnnkit.search import PlacementPlan, SearchSpace, search_units


def _lenet():
    torch.manual_seed(0)
    return build_model("lenet5", (1, 28, 28), 10)


def test_plan_round_trips_and_applies_like_bayesify(tmp_path):
    plan = PlacementPlan(
        {"fc2": "mc_dropout", "fc3": "batch_ensemble"}, members=3, samples=2,
        options={"mc_dropout": {"p": 0.1}},
    )  # fmt: skip
    plan.save(tmp_path / "plan.json")
    back = PlacementPlan.load(tmp_path / "plan.json")
    assert back == plan and back.key() == plan.key()
    model = _lenet()
    net = plan.apply(model)
    ref = bayesify(model, dict(plan.layers), members=3, options={"mc_dropout": {"p": 0.1}})
    net.load_state_dict(ref.state_dict())
    x = torch.rand(2, 1, 28, 28)
    net.eval(), ref.eval()
    torch.manual_seed(1)
    a = net(x, 2)
    torch.manual_seed(1)
    torch.testing.assert_close(a, ref(x, 2))
    assert plan.resolve(model) == {
        "conv1": "deterministic", "conv2": "deterministic", "fc1": "deterministic",
        "fc2": "mc_dropout", "fc3": "batch_ensemble",
    }  # fmt: skip


@pytest.mark.parametrize(
    "d, match",
    [
        ({"layers": {"fc9": "mc_dropout"}}, "'fc9' matches no Linear/Conv2d layer.*conv1"),
        ({"layers": {"fc3": "bayes"}}, "unknown layer kind 'bayes'"),
        ({"layers": {"fc3": "batch_ensemble"}}, "need members >= 2, got 1"),
        ({"layers": {"fc3": "mc_dropout"}, "members": 4}, "no ensemble kind"),
        ({"layers": {"fc3": "batch_ensemble"}, "members": 2, "samples": 4}, "no layer.*stochastic"),
        ({"layers": {"fc3": "mc_dropout"}, "options": {"rank1": {}}}, "no layer of the plan uses"),
        ({"layers": {"fc3": "mc_dropout"}, "options": {"mc_dropout": {"p": 2}}}, "'p'"),
        ({"layers": {"fc3": "mc_dropout"}, "options": {"mc_dropout": {"q": 0.1}}}, "no option 'q'"),
        ({"layers": {"fc3": "mc_dropout"}, "members": "four"}, "'members'"),
        ({"layers": {}}, "needs 'layers'"),
        ({"layer": {"fc3": "mc_dropout"}}, "unknown key"),
        ([], "JSON object"),
    ],
)
def test_invalid_plans_are_refused_clearly(d, match):
    with pytest.raises(ConfigError, match=match):
        PlacementPlan.from_dict(d).resolve(_lenet())


def test_bad_plan_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        PlacementPlan.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{layers: ")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PlacementPlan.load(tmp_path / "bad.json")


def test_space_enumerates_exactly_the_valid_plans():
    model = _lenet()
    kinds = ("deterministic", "mc_dropout", "batch_ensemble")
    space = SearchSpace(model, kinds=kinds, members=(2, 3), samples=(1, 2), dropout=(0.1, 0.3))
    plans = list(space.plans())
    # independent count: 5 units x 3 kinds; ensemble present -> 2 member choices; mc_dropout
    # present -> 2 sample choices and 2 rates
    n = 0
    for combo in range(3**5):
        ks = {(combo // 3**i) % 3 for i in range(5)}
        n += (2 if 2 in ks else 1) * (4 if 1 in ks else 1)
    assert len(plans) == n == space.size()
    assert len({p.key() for p in plans}) == n  # no duplicates
    x = torch.rand(2, 1, 28, 28)
    for plan in plans[:: max(1, n // 40)]:  # a spread of them through the real conversion
        net = plan.apply(model).eval()
        with torch.no_grad():
            out = net(x, plan.samples)
        assert out.shape == (plan.members * plan.samples, 2, 10)


def test_resnet_units_are_blocks_and_sampled_plans_are_valid():
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 16, 16), 10, width=4)
    units = search_units(model)
    assert units[0] == "conv1" and units[-1] == "fc" and "layer2.0.*" in units and len(units) == 10
    space = SearchSpace(model)
    asked: list[str] = []
    rng = random.Random(0)

    def choose(name, choices):
        asked.append(name)
        return rng.choice(choices)

    x = torch.rand(2, 3, 16, 16)
    for _ in range(6):
        asked.clear()
        plan = space.sample(choose)
        kinds = set(plan.layers.values())
        assert ("members" in asked) == any(k in kinds for k in ("batch_ensemble", "rank1", "lpbnn"))
        resolved = plan.resolve(model)
        block = {n: k for n, k in resolved.items() if n.startswith("layer2.0.")}
        assert len(set(block.values())) == 1  # a block changes kind as a whole (shortcut too)
        net = plan.apply(model).eval()
        with torch.no_grad():
            assert net(x, plan.samples).shape == (plan.members * plan.samples, 2, 10)


def test_space_options_are_checked():
    model = _lenet()
    with pytest.raises(ConfigError, match="unknown layer kind"):
        SearchSpace(model, kinds=("deterministic", "bayes"))
    with pytest.raises(ConfigError, match="members choices"):
        SearchSpace(model, members=(1,))
    with pytest.raises(ConfigError, match="dropout rates"):
        SearchSpace(model, dropout=(1.5,))
    with pytest.raises(ConfigError, match="matches no"):
        SearchSpace(model, units=["layer9.*"])


def test_train_and_bench_accept_a_plan_file(tmp_path, capsys, ood_root):
    from bnnkit.bench import BenchConfig, run_bench
    from bnnkit.cli import main
    from bnnkit.methods import UQModel

    plan = PlacementPlan({"fc2": "mc_dropout", "fc3": "batch_ensemble"}, members=2, samples=2)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "run"
    args = ["train", "--plan", str(tmp_path / "plan.json"), "--subset", "256", "--epochs", "1",
            "--batch-size", "64", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    model = UQModel.load(out / "model.safetensors")
    assert model.method == "placement" and model.members == 2 and model.eval_samples == 2
    assert PlacementPlan.from_dict(model.options["plan"]) == plan
    assert model.predict(torch.rand(3, 1, 28, 28)).probs.shape == (4, 3, 10)
    assert main([*args[:1], "--method", "mfvi", *args[1:]]) == 2
    assert "--plan trains the plan itself" in capsys.readouterr().err
    cfg = BenchConfig(
        methods=["my-plan"], variants={"my-plan": {"method": "placement", "plan": str(
            tmp_path / "plan.json")}},
        epochs=1, seeds=1, subset=256, val_size=200, test_size=100, out=str(tmp_path / "b"),
        corruptions=["gaussian_noise"], n_corrupt=50, n_rotate=50, angles=[0], progress=False,
    )  # fmt: skip
    table = run_bench(cfg, log=lambda *_: None)
    assert "my-plan" in table


def test_sampling_reaches_late_bayesian_plans_as_often_as_early_ones():
    """The cheap plans (a long deterministic prefix) must not be exponentially rare: with the
    'first' decision, each unit of LeNet-5 is the first Bayesian one in a fair share of random
    plans. Choosing each unit's kind uniformly alone gives the last unit (1/6)^4 = 0.08%."""
    model = build_model("lenet5", (1, 28, 28), 10)
    space = SearchSpace(model)
    rng = random.Random(0)
    firsts = []
    for _ in range(3000):
        plan = space.sample(lambda n, c: rng.choice(c))
        stochastic = [
            u for u in space.units if plan.layers.get(u, "deterministic") != "deterministic"
        ]
        firsts.append(stochastic[0] if stochastic else None)
    share = {u: firsts.count(u) / len(firsts) for u in space.units}
    assert min(share.values()) > 0.08, share
    assert share[space.units[-1]] > 0.1
