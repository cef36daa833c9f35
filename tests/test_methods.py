import pytest
import torch

from bnnkit import ConfigError, InputError, Predictive
from bnnkit.methods import METHODS, ModelSpec, build_method, fit_temperature

SPEC = ModelSpec("lenet5", (1, 28, 28), 10, (0.5,), (0.5,))


#: options a method cannot do without (everything else at its defaults)
REQUIRED = {"placement": {"plan": {"layers": {"fc3": "rank1"}, "members": 2, "samples": 3}}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_predicts_a_predictive(name):
    model = build_method(name, SPEC, REQUIRED.get(name))
    pred = model.predict(torch.rand(6, 1, 28, 28))
    assert isinstance(pred, Predictive)
    S = model.members * model.eval_samples
    assert pred.probs.shape == (S, 6, 10)
    torch.testing.assert_close(pred.probs.sum(-1), torch.ones(S, 6))


def test_chunked_prediction_equals_one_pass():
    model = build_method("deep_ensemble", SPEC, {"members": 3})
    x = torch.rand(50, 1, 28, 28)
    torch.testing.assert_close(model.predict(x, batch_size=7).probs, model.predict(x).probs)


def test_deep_ensemble_members_are_distinct():
    model = build_method("deep_ensemble", SPEC, {"members": 3})
    p = model.predict(torch.rand(4, 1, 28, 28)).probs
    assert not torch.allclose(p[0], p[1]) and not torch.allclose(p[1], p[2])


def test_registry_errors():
    with pytest.raises(ConfigError, match="unknown method 'swag'.*deep_ensemble"):
        build_method("swag", SPEC)
    with pytest.raises(ConfigError, match="no option .members.*p, prefix_once, samples"):
        build_method("mc_dropout", SPEC, {"members": 3})


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.full((2, 1, 28, 28), float("nan")), "NaN"),
        (torch.rand(2, 3, 28, 28), "1 channel"),
        (torch.rand(1, 28, 28), "single image"),
        (torch.rand(2, 1, 32, 32), "shape"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "float"),
        (torch.rand(0, 1, 28, 28), "empty"),
        (torch.rand(2, 1, 28, 28) * 255, r"\[0, 1\].*divide by 255"),
        (torch.randn(2, 1, 28, 28) * 3, r"in \[0, 1\]"),
    ],
)
def test_bad_inputs(x, match):
    model = build_method("deterministic", SPEC)
    with pytest.raises(InputError, match=match):
        model.predict(x)


def test_temperature_recovers_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(20000, 5, generator=g)
    true_t = 2.5
    labels = torch.multinomial(torch.softmax(logits / true_t, -1), 1, generator=g).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_temperature_scaling_reduces_validation_nll_of_overconfident_model():
    from bnnkit.metrics import nll

    g = torch.Generator().manual_seed(1)
    logits = 6 * torch.randn(5000, 4, generator=g)
    labels = torch.multinomial(torch.softmax(logits / 3, -1), 1, generator=g).squeeze(1)
    t = fit_temperature(logits, labels)
    before = nll(torch.softmax(logits, -1), labels)
    after = nll(torch.softmax(logits / t, -1), labels)
    assert after < before


def test_cost_measurement_is_plausible():
    from bnnkit.evaluate import measure_cost

    model = build_method("deterministic", SPEC)
    cost = measure_cost(model, torch.rand(128, 1, 28, 28), repeats=3)
    assert cost["parameters"] == sum(p.numel() for p in model.parameters())
    conv1_out_mb = 128 * 6 * 28 * 28 * 4 / 2**20  # one activation that must be live
    assert cost["peak_mem_mb"] >= conv1_out_mb
    assert cost["latency_ms"] > 0 and cost["throughput"] > 0


def test_peak_memory_counts_new_storage_only():
    """8 KiB allocated inside the region, beside views of and in-place writes to a 16 MiB
    tensor made before it: the peak is the 8 KiB, and a view of the new tensor that outlives
    it keeps its storage counted."""
    from bnnkit.evaluate import _PeakMemory

    big = torch.zeros(4 * 2**20)
    with _PeakMemory() as mem:
        view = big.view(-1, 4)[:10]
        big.add_(1.0)
        a = torch.empty(2048)
        b = a.view(2, 1024)
        del a
        assert mem.live == 8192
        c = torch.ones(1024)  # 4 KiB more while b keeps a's storage alive
        del b
        assert mem.live == 4096
    assert mem.peak == 8192 + 4096
    assert view.shape == (10, 4) and c.numel() == 1024


def test_latency_times_the_same_call_for_every_method():
    """ms/batch is the time of predict(x) for every method, a posterior's predictive included."""
    from bnnkit.evaluate import measure_cost
    from bnnkit.predictive import Predictive

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.calls = 0

        def predict(self, x, batch_size=None):
            self.calls += 1
            return Predictive(torch.softmax(self.fc(x.flatten(1)), -1)[None])

    for model in (Counting(), build_method("deterministic", SPEC)):
        calls: list = []
        original = model.predict
        model.predict = lambda x, *a, _o=original, _c=calls, **k: _c.append(1) or _o(x, *a, **k)
        x = torch.rand(8, 4) if isinstance(model, Counting) else torch.rand(8, 1, 28, 28)
        measure_cost(model, x, repeats=4)
        assert len(calls) == 3 + 4 + 1  # warm-up, timed repeats, the memory pass: all predict
