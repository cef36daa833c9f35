"""Search objectives: FLOPs against the closed form of a placement-aware forward, the
search-time OOD set, and the objective bundle on a trained candidate."""

import pytest
import torch

from bnnkit.methods import ModelSpec, build_method
from bnnkit.search.objectives import evaluate_candidate, forward_flops, search_ood_images

SPEC = ModelSpec("mlp", (1, 4, 4), 3, arch_options={"hidden": [8, 6]})
LAYER_FLOPS = [2 * 16 * 8, 2 * 8 * 6, 2 * 6 * 3]  # 2 * in * out per image, in forward order
NAMES = ["features.1", "features.3", "fc"]


@pytest.mark.parametrize("first", [0, 1, 2])
@pytest.mark.parametrize("samples", [1, 4])
def test_flops_follow_the_number_and_position_of_stochastic_layers(first, samples):
    """Stochastic from layer `first` on: the prefix counts once, the tail once per sample."""
    layers = {n: "mc_dropout" for n in NAMES[first:]}
    model = build_method("placement", SPEC, {"plan": {"layers": layers, "samples": samples}})
    expected = sum(LAYER_FLOPS[:first]) + samples * sum(LAYER_FLOPS[first:])
    assert forward_flops(model, torch.rand(1, 1, 4, 4)) == expected


def test_search_ood_images_are_a_fixed_synthetic_family():
    a = search_ood_images((3, 8, 8), 10, seed=1)
    assert a.shape == (10, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, search_ood_images((3, 8, 8), 10, seed=1))
    assert not torch.equal(a, search_ood_images((3, 8, 8), 10, seed=2))
    # blobs are smooth: neighbouring pixels differ far less than in the noise half
    noise, blobs = a[:5], a[5:]
    rough = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert rough(blobs) < 0.3 * rough(noise)


def test_objectives_of_a_candidate():
    torch.manual_seed(0)
    model = build_method(
        "placement", SPEC, {"plan": {"layers": {"fc": "mc_dropout"}, "samples": 4}}
    )
    x, y = torch.rand(30, 1, 4, 4), torch.randint(0, 3, (30,))
    obj = evaluate_candidate(model, (x, y), search_ood_images((1, 4, 4), 30), latency_batch=16,
                             repeats=3)  # fmt: skip
    assert 0 < obj.val_nll < 10 and 0 <= obj.ood_auroc <= 1 and obj.latency_ms > 0
    assert obj.flops_per_image == 2 * 16 * 8 + 2 * 8 * 6 + 4 * 2 * 6 * 3
    assert obj.parameters == sum(p.numel() for p in model.parameters())
    # stochastic predictions are seeded: the same objectives again, the caller's RNG untouched
    state = torch.get_rng_state()
    again = evaluate_candidate(model, (x, y), search_ood_images((1, 4, 4), 30), latency_batch=16,
                               repeats=3)  # fmt: skip
    assert (again.val_nll, again.ood_auroc) == (obj.val_nll, obj.ood_auroc)
    assert torch.equal(torch.get_rng_state(), state)
    other = evaluate_candidate(model, (x, y), search_ood_images((1, 4, 4), 30), latency_batch=16,
                               repeats=3, seed=1)  # fmt: skip
    assert other.val_nll != obj.val_nll  # the seed reaches the dropout masks


def test_objectives_of_a_deterministic_candidate_against_plain_torch():
    """NLL from the network's logits by cross entropy, AUROC by counting pairs (ties half):
    neither goes through the code under test's predictive or metric helpers."""
    torch.manual_seed(0)
    model = build_method("placement", SPEC, {"plan": {"layers": {"fc": "deterministic"}}})
    model.temperature.fill_(1.7)
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    ood = torch.rand(25, 1, 4, 4) * 0.2
    obj = evaluate_candidate(model, (x, y), ood, latency_batch=16, repeats=2)
    model.eval()
    with torch.no_grad():
        logits = lambda t: model.net(t, 1).reshape(len(t), 3) / 1.7  # noqa: E731
        nll = torch.nn.functional.cross_entropy(logits(x).double(), y)
        ent = lambda t: -(t.softmax(-1) * t.log_softmax(-1)).sum(-1)  # noqa: E731
        e_in, e_out = ent(logits(x).double()), ent(logits(ood).double())
    pairs = [(o > i) + 0.5 * (o == i) for i in e_in.tolist() for o in e_out.tolist()]
    assert obj.val_nll == pytest.approx(float(nll), rel=1e-5)
    assert obj.ood_auroc == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert obj.flops_per_image == sum(LAYER_FLOPS)


@pytest.mark.parametrize("kind", ["lpbnn", "rank1", "variational", "batch_ensemble"])
def test_flops_of_every_kind_under_no_grad(kind):
    """The counter's module tracker failed on LP-BNN's VAE under no_grad."""
    ensemble = kind in ("lpbnn", "rank1", "batch_ensemble")
    plan = {"layers": {"features.3": kind, "fc": kind}, "members": 2 if ensemble else 1,
            "samples": 1 if kind == "batch_ensemble" else 2}  # fmt: skip
    model = build_method("placement", SPEC, {"plan": plan})
    with torch.no_grad():
        flops = forward_flops(model, torch.rand(1, 1, 4, 4))
    R = plan["members"] * plan["samples"]
    assert flops >= LAYER_FLOPS[0] + R * (LAYER_FLOPS[1] + LAYER_FLOPS[2])


@pytest.mark.parametrize("hw", [(28, 28), (30, 31)])
def test_scrambled_images_permute_whole_tiles_of_each_image(hw):
    from bnnkit.search.objectives import scrambled_images

    h, w = hw
    x = torch.rand(6, 2, h, w, generator=torch.Generator().manual_seed(0))
    y = scrambled_images(x, seed=3)
    assert torch.equal(y, scrambled_images(x, seed=3))
    th, tw = h // 4, w // 4
    assert torch.equal(y[:, :, 4 * th :], x[:, :, 4 * th :])  # the remainder stays in place
    assert torch.equal(y[:, :, :, 4 * tw :], x[:, :, :, 4 * tw :])
    for i in range(6):  # brute force: every output tile is exactly one input tile, each once
        tiles_in = [x[i, :, r * th : (r + 1) * th, c * tw : (c + 1) * tw]
                    for r in range(4) for c in range(4)]  # fmt: skip
        used = []
        for r in range(4):
            for c in range(4):
                t = y[i, :, r * th : (r + 1) * th, c * tw : (c + 1) * tw]
                used += [k for k, s in enumerate(tiles_in) if torch.equal(s, t)]
        assert sorted(used) == list(range(16))
    assert not torch.equal(y, x)


def _is_tile_permutation(img, src, grid=4):
    """Brute force: the ``grid`` x ``grid`` tiles of ``img`` are those of ``src``, each once."""
    h, w = img.shape[-2] // grid, img.shape[-1] // grid
    cut = lambda t: [t[:, r * h : (r + 1) * h, c * w : (c + 1) * w]  # noqa: E731
                     for r in range(grid) for c in range(grid)]  # fmt: skip
    left = cut(src)
    for tile in cut(img):
        k = next((k for k, t in enumerate(left) if torch.equal(t, tile)), None)
        if k is None:
            return False
        left.pop(k)
    return True


def _smooth_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 5, 5, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(28, 28), mode="bilinear")


def test_search_ood_families_are_made_from_validation_images_only():
    from bnnkit import ConfigError
    from bnnkit.search.objectives import OOD_FAMILIES, SEARCH_CORRUPTIONS, search_ood_set

    x, other = _smooth_images(40, 1), _smooth_images(40, 2)
    for fam in OOD_FAMILIES:
        o = search_ood_set(fam, x, 60, seed=2)
        assert o.shape == (60, 1, 28, 28) and 0 <= o.min() and o.max() <= 1
        assert torch.equal(o, search_ood_set(fam, x, 60, seed=2))
        assert not torch.equal(o, search_ood_set(fam, x, 60, seed=3))
    # synthetic: no validation image enters
    assert torch.equal(
        search_ood_set("synthetic", x, 60, 2), search_ood_set("synthetic", other, 60, 2)
    )
    # scrambled: every image is a jigsaw of one validation image
    for img in search_ood_set("scrambled", x, 60, 2):
        assert any(_is_tile_permutation(img, v) for v in x)
    # corrupted: its contrast share is the closed form of severity-5 contrast (the image pulled
    # to its mean by 0.15) of validation images, and no other image is
    contrast = lambda v: ((v - v.mean()) * 0.15 + v.mean()).clamp(0, 1)  # noqa: E731
    corrupted = search_ood_set("corrupted", x, 60, 2)
    hits = [any(torch.allclose(img, contrast(v), atol=1e-6) for v in x) for img in corrupted]
    assert sum(hits) == 60 // len(SEARCH_CORRUPTIONS)
    # mixed: a third of jigsaws; the synthetic share does not depend on the validation images
    mixed, mixed_other = search_ood_set("mixed", x, 60, 2), search_ood_set("mixed", other, 60, 2)
    same = (mixed == mixed_other).flatten(1).all(1)
    assert int(same.sum()) == 60 - 2 * (60 // 3)
    jigsaws = [any(_is_tile_permutation(img, v) for v in x) for img in mixed]
    assert sum(jigsaws) == 60 // 3 and not any(j and s for j, s in zip(jigsaws, same.tolist()))
    with pytest.raises(ConfigError, match="unknown search OOD family 'test'"):
        search_ood_set("test", x, 10)
