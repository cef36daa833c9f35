"""The 15 MNIST-C corruptions: each against its stated definition, computed independently
(brute-force coordinate maps, explicit loops, closed-form statistics), plus determinism, range,
refusals, and the evaluation / bench wiring."""

import colorsys
import math
import re

import numpy as np
import pytest
import torch

from bnnkit import ConfigError, InputError
from bnnkit.data import MNIST_C, DataBundle, Split, corrupt_mnist_c
from bnnkit.data import mnist_c as mc
from bnnkit.predictive import Predictive

pytestmark = pytest.mark.timeout(60)

PAPER_ORDER = ["shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale",
               "rotate", "brightness", "translate", "stripe", "fog", "spatter", "dotted_line",
               "zigzag", "canny_edges"]  # fmt: skip
DETERMINISTIC = {"scale", "brightness", "stripe", "canny_edges"}


def digits(n: int, seed: int = 0) -> torch.Tensor:
    """Digit-like 8-bit images: a few blurred strokes inside a blank 5-pixel border."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    for i in range(n):
        for _ in range(3):
            r0, c0 = torch.randint(6, 14, (2,), generator=g).tolist()
            r1, c1 = torch.randint(14, 22, (2,), generator=g).tolist()
            if torch.rand(1, generator=g) < 0.5:
                x[i, 0, r0:r1, c0 : c0 + 2] = 1.0
            else:
                x[i, 0, r0 : r0 + 2, c0:c1] = 1.0
    x = mc._gaussian(x, 0.6)
    x[..., :5, :] = 0
    x[..., -5:, :] = 0
    x[..., :, :5] = 0
    x[..., :, -5:] = 0
    return (x.clamp(0, 1) * 255).round() / 255


# ------------------------------------------------------------------ brute-force references


def bilinear(img: np.ndarray, col: float, row: float) -> float:
    H, W = img.shape
    c0, r0 = math.floor(col), math.floor(row)
    v = 0.0
    for rr, wr in ((r0, 1 - (row - r0)), (r0 + 1, row - r0)):
        for cc, wc in ((c0, 1 - (col - c0)), (c0 + 1, col - c0)):
            if 0 <= rr < H and 0 <= cc < W:
                v += wr * wc * img[rr, cc]
    return v


def brute_affine(img: np.ndarray, A) -> np.ndarray:
    """Output (col, row) = input at A ((col, row) - 13.5) + 13.5, bilinear, zeros outside."""
    out = np.zeros_like(img)
    for row in range(28):
        for col in range(28):
            u, v = col - 13.5, row - 13.5
            out[row, col] = bilinear(
                img, A[0][0] * u + A[0][1] * v + 13.5, A[1][0] * u + A[1][1] * v + 13.5
            )
    return out


def brute_gaussian(img: np.ndarray, sigma: float) -> np.ndarray:
    """scipy's gaussian_filter(mode='nearest', truncate=4) as a direct 2-D sum."""
    r = int(4 * sigma + 0.5)
    t = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    H, W = img.shape
    out = np.zeros_like(img)
    for i in range(H):
        for j in range(W):
            rows, cols = np.clip(i + t, 0, H - 1), np.clip(j + t, 0, W - 1)
            out[i, j] = k @ img[np.ix_(rows, cols)] @ k
    return out


def ref_line(c0, r0, c1, r1) -> np.ndarray:
    if c1 == c0:
        return np.zeros((28, 28))
    cc, rr = np.meshgrid(np.arange(28.0), np.arange(28.0), sparse=True)
    m = (r1 - r0) / (c1 - c0)
    dist = np.clip(np.abs(rr - (m * (cc - c0) + r0)), 0, 2.3 - 1e-10)
    v = np.clip(np.log(1 - dist / 2.3) + 1, 0, 1)
    v[:, : int(np.floor(c0))] = 0
    v[:, int(np.ceil(c1)) :] = 0
    return v


# ------------------------------------------------------------------ registry and contract


def test_the_registry_is_the_papers_fifteen_in_order():
    assert list(MNIST_C) == PAPER_ORDER


@pytest.mark.parametrize("name", PAPER_ORDER)
def test_every_corruption_is_deterministic_bounded_and_keeps_the_shape(name):
    x = digits(6)
    a = corrupt_mnist_c(x, name, seed=3)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, corrupt_mnist_c(x, name, seed=3))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, x)
    b = corrupt_mnist_c(x, name, seed=4)
    assert torch.equal(a, b) == (name in DETERMINISTIC)
    d = corrupt_mnist_c(x.double(), name, seed=3)
    assert d.dtype == torch.float64 and torch.allclose(d.float(), a, atol=1e-6)


def test_refusals_name_the_problem():
    x = digits(2)
    with pytest.raises(ConfigError, match="unknown MNIST-C corruption 'fogg'"):
        corrupt_mnist_c(x, "fogg")
    with pytest.raises(InputError, match=r"float images \[N, 1, 28, 28\]"):
        corrupt_mnist_c((x * 255).to(torch.uint8), "fog")
    with pytest.raises(InputError, match=r"float images \[N, 1, 28, 28\]"):
        corrupt_mnist_c(x[0], "fog")
    for bad in (torch.rand(2, 3, 28, 28), torch.rand(2, 1, 32, 32)):
        shape = re.escape(str(tuple(bad.shape[1:])))
        with pytest.raises(InputError, match="defined on 28x28 grey images.*" + shape):
            corrupt_mnist_c(bad, "stripe")
    assert mc.mnist_c_names("all") == PAPER_ORDER
    assert mc.mnist_c_names(["ALL"]) == PAPER_ORDER
    assert mc.mnist_c_names(" fog, zigzag,fog ") == ["fog", "zigzag"]
    assert mc.mnist_c_names("") == [] and mc.mnist_c_names([]) == []
    with pytest.raises(ConfigError, match=r"unknown MNIST-C corruption\(s\) \['blur'\]"):
        mc.mnist_c_names(["fog", "blur"])
    with pytest.raises(ConfigError, match="list of MNIST-C corruption names"):
        mc.mnist_c_names(3)


# ------------------------------------------------------------------ geometry


def _matches_one_of(out: np.ndarray, candidates: list[np.ndarray]) -> int:
    errs = [np.abs(out - c).max() for c in candidates]
    assert min(errs) < 2e-5, errs
    return int(np.argmin(errs))


def test_rotate_and_shear_are_the_stated_maps_in_both_directions():
    x = torch.rand(14, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for name, A in (
        ("rotate", lambda t: [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]),
        ("shear", lambda s: [[1.0, -math.sin(s)], [0.0, math.cos(s)]]),
    ):
        out = corrupt_mnist_c(x, name, seed=0).numpy()
        picked = set()
        for i in range(len(x)):
            img = x[i, 0].double().numpy()
            cands = [np.clip(brute_affine(img, A(s * 0.4)), 0, 1) for s in (1, -1)]
            picked.add(_matches_one_of(out[i, 0], cands))
        assert picked == {0, 1}, name  # both directions are drawn


def test_rotation_direction_on_a_single_pixel():
    # the output right of the centre shows the input at angle +0.4 rad (rows point down)
    x = torch.zeros(1, 1, 28, 28)
    col, row = 13.5 + 8 * math.cos(0.4), 13.5 + 8 * math.sin(0.4)
    c0, r0 = math.floor(col), math.floor(row)
    x[0, 0, r0 : r0 + 2, c0 : c0 + 2] = 1.0
    y = mc.rotate_by(x, 0.4 * 180 / math.pi)
    assert float(y[0, 0, 13:15, 21:23].max()) == pytest.approx(float(y.max()))
    assert float(y[0, 0, 13:15, 21:23].sum()) > 0.6 * float(y.sum())
    assert float(mc.rotate_by(x, -0.4 * 180 / math.pi)[0, 0, 13:15, 21:23].max()) < 0.1


def test_scale_zooms_out_by_0_7_about_the_centre():
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    out = corrupt_mnist_c(x, "scale").numpy()
    for i in range(3):
        want = brute_affine(x[i, 0].double().numpy(), [[1 / 0.7, 0], [0, 1 / 0.7]])
        assert np.abs(out[i, 0] - np.clip(want, 0, 1)).max() < 2e-5
    # a centred square of side 14 becomes one of side 9.8: rows 9..18 are lit
    sq = torch.zeros(1, 1, 28, 28)
    sq[..., 7:21, 7:21] = 1.0
    lit = corrupt_mnist_c(sq, "scale")[0, 0, :, 14] > 0.5
    assert torch.nonzero(lit).flatten().tolist() == list(range(9, 19))


def test_translate_shifts_by_three_pixels_with_independent_signs():
    x = torch.rand(24, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    out = corrupt_mnist_c(x, "translate").numpy()
    seen = set()
    for i in range(len(x)):
        img = x[i, 0].numpy()
        cands = []
        for dx, dy in ((3, 3), (3, -3), (-3, 3), (-3, -3)):
            c = np.zeros_like(img)
            for row in range(28):
                for col in range(28):
                    if 0 <= row + dy < 28 and 0 <= col + dx < 28:
                        c[row, col] = img[row + dy, col + dx]
            cands.append(c)
        k = _matches_one_of(out[i, 0], cands)
        assert np.array_equal(out[i, 0], cands[k])  # exact: an integer shift
        seen.add(k)
    assert seen == {0, 1, 2, 3}


# ------------------------------------------------------------------ intensity and noise


def test_brightness_adds_0_5_to_the_hsv_value():
    v = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.62, 0.9, 1.0])
    x = v.repeat(28 * 4)[: 28 * 28].view(1, 1, 28, 28)
    out = corrupt_mnist_c(x, "brightness")
    for got, val in zip(out.flatten()[:7].tolist(), v.tolist(), strict=True):
        h, s, value = colorsys.rgb_to_hsv(val, val, val)
        r, g, b = colorsys.hsv_to_rgb(h, s, min(value + 0.5, 1.0))
        assert got == pytest.approx(0.2125 * r + 0.7154 * g + 0.0721 * b, abs=1e-6)


def test_stripe_inverts_the_outer_seven_columns_on_each_side():
    x = digits(3)
    out = corrupt_mnist_c(x, "stripe")
    for col in range(28):
        want = 1 - x[..., col] if (col < 7 or col >= 21) else x[..., col]
        assert torch.equal(out[..., col], want), col


def test_shot_noise_is_poisson_of_three_photons_per_unit():
    x = torch.zeros(200, 1, 28, 28)
    x[..., :14] = 0.2
    x[..., 14:] = 0.6
    out = corrupt_mnist_c(x, "shot_noise", seed=1)
    k = out * 3
    assert torch.allclose(k, k.round(), atol=1e-5)  # multiples of 1/3
    for sl, v in ((slice(0, 14), 0.2), (slice(14, 28), 0.6)):
        lam = 3 * v
        pmf = [math.exp(-lam) * lam**j / math.factorial(j) for j in range(60)]
        vals = [min(j, 3) / 3 for j in range(60)]
        mean = sum(p * y for p, y in zip(pmf, vals, strict=True))
        var = sum(p * (y - mean) ** 2 for p, y in zip(pmf, vals, strict=True))
        got = out[..., sl].flatten()
        se = math.sqrt(var / got.numel())
        assert abs(float(got.mean()) - mean) < 5 * se
        assert float(got.var()) == pytest.approx(var, rel=0.03)


def test_impulse_noise_flips_17_percent_half_to_black_half_to_white():
    x = torch.full((200, 1, 28, 28), 0.5)
    out = corrupt_mnist_c(x, "impulse_noise", seed=2)
    n = out.numel()
    for value in (0.0, 1.0):
        frac = float((out == value).float().mean())
        assert abs(frac - 0.085) < 5 * math.sqrt(0.085 * 0.915 / n)
    assert bool(((out == 0) | (out == 1) | (out == 0.5)).all())


# ------------------------------------------------------------------ blur


def brute_glass_sweep(y: np.ndarray, moves: np.ndarray) -> np.ndarray:
    """The reference's loop: for h = H-1..2, w = W-1..2 swap with the coded partner."""
    y = y.copy()
    off = {0: (0, 0), 1: (0, -1), 2: (-1, 0), 3: (-1, -1)}  # code -> (dy, dx)
    H, W = y.shape
    for h in range(H - 1, 1, -1):
        for w in range(W - 1, 1, -1):
            dy, dx = off[int(moves[h, w])]
            y[h, w], y[h + dy, w + dx] = y[h + dy, w + dx], y[h, w]
    return y


def test_glass_shuffle_is_the_sequential_swap_sweep():
    g = torch.Generator().manual_seed(5)
    for size in (28, 9):
        y = torch.randperm(4 * size * size, generator=g).double().view(4, size, size)
        moves = mc.glass_moves(4, g, size)[:, 0]
        got = mc.glass_shuffle(y, moves)
        for i in range(4):
            want = brute_glass_sweep(y[i].numpy(), moves[i].numpy())
            assert np.array_equal(got[i].numpy(), want)
            assert sorted(got[i].flatten().tolist()) == sorted(y[i].flatten().tolist())
        assert torch.equal(got[:, 0], y[:, 0]) and torch.equal(got[:, :, 0], y[:, :, 0])


def test_glass_moves_swap_half_the_swept_pixels_to_the_three_neighbours():
    moves = mc.glass_moves(200, torch.Generator().manual_seed(6), passes=2)
    assert moves.shape == (200, 2, 28, 28)
    assert bool((moves[..., :2, :] == 0).all() and (moves[..., :2] == 0).all())
    for swept in (moves[:, 0, 2:, 2:].flatten(), moves[:, 1, 2:, 2:].flatten()):
        n = swept.numel()
        for code, p in ((0, 5 / 8), (1, 1 / 8), (2, 1 / 8), (3, 1 / 8)):
            frac = float((swept == code).float().mean())
            assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), code
    # the two passes are drawn independently: P(both swap left) = 1/64
    both = float(((moves[:, 0, 2:, 2:] == 1) & (moves[:, 1, 2:, 2:] == 1)).float().mean())
    assert abs(both - 1 / 64) < 5 * math.sqrt(1 / 64 * 63 / 64 / (200 * 26 * 26))


def test_glass_blur_keeps_the_mean_up_to_the_8_bit_truncation():
    x = digits(8)
    out = corrupt_mnist_c(x, "glass_blur", seed=1)
    m_in, m_out = x.mean((1, 2, 3)), out.mean((1, 2, 3))
    assert bool((m_out <= m_in + 1e-6).all() and (m_out >= m_in - 1 / 255 - 1e-6).all())

    # and it is a blur: the total variation drops
    def tv(z):
        return (z[..., 1:, :] - z[..., :-1, :]).abs().sum() + (z[..., 1:] - z[..., :-1]).abs().sum()

    assert float(tv(out)) < 0.8 * float(tv(x))


def test_gaussian_filter_is_scipys_nearest_truncate_4():
    img = torch.rand(1, 1, 12, 10, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for sigma in (0.7, 1.0, 1.5):
        got = mc._gaussian(img, sigma)[0, 0].numpy()
        assert np.abs(got - brute_gaussian(img[0, 0].numpy(), sigma)).max() < 1e-12


def brute_motion(img: np.ndarray, angle_deg: float) -> np.ndarray:
    i = np.arange(21)
    k = np.exp(-(i**2) / 18.0)
    k /= k.sum()
    a = math.radians(angle_deg)
    out = np.zeros_like(img)
    for row in range(28):
        for col in range(28):
            for t in range(21):
                dx = math.ceil(t * math.cos(a) - 0.5)  # rounding half down
                dy = math.ceil(t * math.sin(a) - 0.5)
                out[row, col] += k[t] * img[min(max(row + dy, 0), 27), min(max(col + dx, 0), 27)]
    return out


def test_motion_blur_of_a_pixel_is_a_21_tap_trail_along_the_angle():
    x = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    x[0, 0, 5, 24] = 1.0
    for angle in (0.0, 30.0, -45.0, 45.0, 12.7):
        got = mc.motion_blur_by(x, angle)[0, 0].numpy()
        assert np.abs(got - brute_motion(x[0, 0].numpy(), angle)).max() < 1e-12
    # at 0 degrees: the trail runs 20 pixels to the left, weights decaying
    trail = mc.motion_blur_by(x, 0.0)[0, 0, 5]
    assert torch.nonzero(trail).flatten().tolist() == list(range(4, 25))
    assert bool((trail[4:24] < trail[5:25]).all())
    # at -45 degrees (rows point down) it runs down-left
    diag = mc.motion_blur_by(x, -45.0)[0, 0]
    lit = {tuple(p) for p in torch.nonzero(diag).tolist()}
    assert (5, 24) in lit and (5 + 14, 24 - 14) in lit and (4, 25) not in lit


def test_motion_blur_draws_angles_within_45_degrees_and_rounds_to_8_bits():
    x = torch.zeros(40, 1, 28, 28)
    x[:, 0, 14, 22] = 1.0
    out = corrupt_mnist_c(x, "motion_blur", seed=1)
    assert torch.allclose(out * 255, (out * 255).round(), atol=1e-4)
    angles = []
    for i in range(len(x)):
        pts = torch.nonzero(out[i, 0]).float()
        far = pts[((pts - torch.tensor([14.0, 22.0])) ** 2).sum(1).argmax()]
        dy, dx = 14.0 - float(far[0]), 22.0 - float(far[1])  # the tap offset of the far end
        assert 8.0 <= math.hypot(dx, dy) <= 10.0  # taps 0..9 survive the 8-bit rounding
        angles.append(math.degrees(math.atan2(dy, dx)))
    assert max(abs(a) for a in angles) <= 45 + 7  # rounding of the offsets
    assert min(angles) < -10 and max(angles) > 10


# ------------------------------------------------------------------ fog and spatter


def brute_plasma(n, g, size, decay):
    """The diamond-square loops; each map's uniforms are one row of a single draw, consumed
    level by level, set by set, row-major."""
    m = np.zeros((n, size, size))
    step, wib = size, 100.0
    total = sum(3 * (size // s) ** 2 for s in (2**i for i in range(1, 20)) if s <= size)
    noise = (torch.rand((n, total), generator=g, dtype=torch.float64) * 2 - 1).numpy()
    used = [0]

    def draw(k):
        u = noise[:, used[0] : used[0] + k * k].reshape(n, k, k)
        used[0] += k * k
        return u

    while step >= 2:
        h, k = step // 2, size // step
        u = draw(k)
        for b in range(n):
            for i in range(k):
                for j in range(k):
                    y, x = i * step, j * step
                    s = (m[b, y, x] + m[b, (y + step) % size, x] + m[b, y, (x + step) % size]
                         + m[b, (y + step) % size, (x + step) % size])  # fmt: skip
                    m[b, y + h, x + h] = s / 4 + wib * wib * u[b, i, j]
        u = draw(k)
        for b in range(n):
            for i in range(k):
                for j in range(k):
                    y, x = i * step, j * step
                    s = (m[b, y + h, x + h] + m[b, (y - h) % size, x + h] + m[b, y, x]
                         + m[b, y, (x + step) % size])  # fmt: skip
                    m[b, y, x + h] = s / 4 + wib * wib * u[b, i, j]
        u = draw(k)
        for b in range(n):
            for i in range(k):
                for j in range(k):
                    y, x = i * step, j * step
                    s = (m[b, y + h, x + h] + m[b, y + h, (x - h) % size] + m[b, y, x]
                         + m[b, (y + step) % size, x])  # fmt: skip
                    m[b, y + h, x] = s / 4 + wib * wib * u[b, i, j]
        step //= 2
        wib /= decay
    assert used[0] == total
    m -= m.min((1, 2), keepdims=True)
    return m / m.max((1, 2), keepdims=True)


def test_plasma_fractal_is_the_diamond_square_map():
    got = mc.plasma_fractal(3, torch.Generator().manual_seed(8), 16, 1.4, torch.float64)
    want = brute_plasma(3, torch.Generator().manual_seed(8), 16, 1.4)
    assert np.abs(got.numpy() - want).max() < 1e-12
    assert got.amin((1, 2)).tolist() == [0.0] * 3
    assert got.amax((1, 2)).tolist() == pytest.approx([1.0] * 3, abs=1e-12)


def test_fog_adds_three_times_the_plasma_and_rescales_to_the_image_maximum():
    x = digits(5)
    x[0] = 0.0  # a blank image stays blank
    out = corrupt_mnist_c(x, "fog", seed=2)
    g = torch.Generator().manual_seed(2 * 1009 + PAPER_ORDER.index("fog") * 17 + 7919)
    p = mc.plasma_fractal(5, g, 256, 1.4)[:, None, :28, :28]
    top = x.amax((1, 2, 3), keepdim=True)
    assert torch.allclose(out, (x + 3 * p) * top / (top + 3), atol=1e-6)
    assert float(out[0].abs().max()) == 0.0
    assert bool((out[1:] <= top[1:] + 1e-6).all())
    implied = (out[1:] * (top[1:] + 3) / top[1:] - x[1:]) / 3  # the plasma seen through fog
    assert float(implied.min()) > -1e-5 and float(implied.max()) < 1 + 1e-5
    assert float((out[1:] != x[1:]).float().mean()) > 0.99  # every pixel changes


def test_spatter_mask_is_thresholded_blurred_noise_and_mud_replaces_pixels():
    g = torch.Generator().manual_seed(9)
    m = mc.spatter_mask(3, g)
    noise = torch.Generator().manual_seed(9)
    liquid = torch.randn((3, 1, 28, 28), generator=noise, dtype=torch.float64) * 0.3 + 0.65
    for i in range(3):
        blurred = brute_gaussian(liquid[i, 0].numpy(), 1.0)
        blurred[blurred < 0.65] = 0
        want = brute_gaussian((blurred > 0.65).astype(float), 1.5)
        want[want < 0.8] = 0
        assert np.abs(m[i, 0].numpy() - want).max() < 1e-12
    big = mc.spatter_mask(300, torch.Generator().manual_seed(10))
    assert bool(((big == 0) | (big >= 0.8)).all()) and float(big.max()) <= 1.0
    frac = float((big > 0).float().mean())
    assert 0.001 < frac < 0.5
    x = digits(4)
    out = corrupt_mnist_c(x, "spatter", seed=5)
    g = torch.Generator().manual_seed(5 * 1009 + PAPER_ORDER.index("spatter") * 17 + 7919)
    mask = mc.spatter_mask(4, g).float()
    assert torch.allclose(out, x * (1 - mask) + 63 / 255 * mask, atol=1e-6)
    changed = (out - x).abs() > 1e-7
    assert torch.equal(changed, (mask > 0) & ((x - 63 / 255).abs() > 1e-7))


# ------------------------------------------------------------------ lines and edges


def test_dotted_line_adds_the_reference_line_in_every_other_column_pair():
    x = torch.zeros(4, 1, 28, 28)
    out = corrupt_mnist_c(x, "dotted_line", seed=1)
    keep = np.array([(c // 2) % 2 == 1 for c in range(28)], dtype=float)
    for i in range(4):
        fits = [
            (r0, r1)
            for r0 in range(27)
            for r1 in range(27)
            if np.abs(out[i, 0].numpy() - ref_line(0, r0, 27, r1) * keep).max() < 1e-6
        ]
        assert len(fits) == 1
    assert float(out[..., [c for c in range(28) if not keep[c]] + [27]].abs().max()) == 0.0
    d = digits(4)
    lit = corrupt_mnist_c(d, "dotted_line", seed=1)
    assert torch.allclose(lit, (d + out).clamp(0, 1), atol=1e-6)  # only added, clipped
    assert bool((lit >= d).all())


def ref_zigzag(r0: int, k: int) -> np.ndarray:
    a = b = 2.0
    c0, c1, r1 = 2, 25, r0 + k
    theta = np.arctan((r1 - r0) / (c1 - c0))
    d = (c1 - c0) / np.cos(theta)
    ends = [(0.0, 0.0)]
    for i in range(int((d - a) // (2 * a)) + 1):
        r_i = (-1) ** i * b
        ends.append(((2 * i + 1) * a, r_i))
    max_c = (2 * a) * (d // (2 * a))
    if d != max_c:
        ends.append((d, r_i / (2 * (d - max_c))))
    e = np.array(ends).T
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cs, rs = rot @ e
    cs, rs = cs + c0, rs + r0
    out = np.zeros((28, 28))
    for i in range(1, len(cs)):
        out = np.clip(out + ref_line(cs[i - 1], rs[i - 1], cs[i], rs[i]), 0, 1)
    return out


def test_zigzag_corners_are_the_references_rotated_by_the_rise():
    for k in range(-5, 5):
        theta = math.atan(k / 23)
        got = mc.zigzag_points(k).numpy()
        # unrotated: (0, 0), then (2, 2), (6, -2), (10, 2), ... and the end at distance d
        back = got @ np.array([[math.cos(theta), -math.sin(theta)],
                               [math.sin(theta), math.cos(theta)]])  # fmt: skip
        d = 23 / math.cos(theta)
        want = [(0, 0)] + [(4 * i + 2, 2 * (-1) ** i) for i in range(6)] + [(d, -1 / (d - 20))]
        assert np.abs(back - np.array(want)).max() < 1e-12
        assert got[-1, 0] == pytest.approx(23 + math.sin(theta) / (d - 20))  # column 25
        assert abs(got[-1, 1] - k) < 0.5  # the rise: r1 = r0 + k


def test_zigzag_is_the_reference_polyline_and_only_brightens():
    x = torch.zeros(3, 1, 28, 28)
    out = corrupt_mnist_c(x, "zigzag", seed=2)
    for i in range(3):
        fits = [
            (r0, k)
            for r0 in range(27)
            for k in range(-5, 5)
            if np.abs(out[i, 0].numpy() - ref_zigzag(r0, k)).max() < 1e-6
        ]
        assert len(fits) == 1
    cols = torch.nonzero(out.amax((0, 1, 2))).flatten()
    assert int(cols.min()) >= 2 and int(cols.max()) <= 25
    d = digits(3)
    lit = corrupt_mnist_c(d, "zigzag", seed=2)
    assert torch.allclose(lit, (d + out).clamp(0, 1), atol=1e-6) and bool((lit >= d).all())


def test_canny_edges_trace_the_boundary_of_a_filled_square():
    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 8:20, 6:22] = 1.0  # rows 8..19, columns 6..21
    x[1] = 0.5  # flat: no edges
    out = corrupt_mnist_c(x, "canny_edges")
    assert bool(((out == 0) | (out == 1)).all())
    assert float(out[1].sum()) == 0.0
    e = out[0, 0]
    rows, cols = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    inside = (rows >= 8) & (rows <= 19) & (cols >= 6) & (cols <= 21)
    # distance (in pixels, Chebyshev) to the square's boundary between inside and outside
    near = torch.zeros_like(inside)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            near |= inside != torch.roll(inside, (dr, dc), (0, 1))
    assert bool((e[~near] == 0).all()), "an edge pixel off the square's boundary"
    # every side is traced along (at least) all of its interior length
    assert bool(e[7:9, 8:20].amax(0).all() and e[19:21, 8:20].amax(0).all())
    assert bool(e[10:18, 5:7].amax(1).all() and e[10:18, 21:23].amax(1).all())


def test_canny_hysteresis_grows_strong_edges_through_weak_ones_down_to_the_low_threshold():
    sq = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    sq[0, 0, 8:20, 6:22] = 1.0
    # local maxima: 2.56 along the sides, 2.42 and 2.39 at the four corners
    every = mc.canny(sq, low=0.0, high=0.0)
    assert torch.equal(mc.canny(sq, low=2.3, high=2.5), every)  # corners reached via sides
    cut = mc.canny(sq, low=2.45, high=2.5)  # corners now below the low threshold
    assert bool((cut <= every).all()) and int(every.sum() - cut.sum()) == 12
    assert int(mc.canny(sq, low=2.3, high=2.6).sum()) == 0  # no strong seed, no edge
    # at the default thresholds (0.1, 0.2): a faint square of 0.06 has weak edges only
    assert int(mc.canny(0.06 * sq).sum()) == 0 and int(mc.canny(0.1 * sq).sum()) > 40


# ------------------------------------------------------------------ evaluation and bench


class _Linear(torch.nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(784, 3, generator=g) * 0.3)

    def predict(self, x, batch_size=256):
        return Predictive(torch.softmax(x.flatten(1) @ self.w, -1))


def _bundle(shape=(1, 28, 28), task="classification"):
    g = torch.Generator().manual_seed(1)

    def split(n):
        x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
        return Split(x, torch.randint(0, 3, (n,), generator=g))

    return DataBundle("tiny", shape, 3, (0.5,) * shape[0], (0.25,) * shape[0], split(4),
                      split(4), split(12), task=task)  # fmt: skip


def test_evaluation_scores_mnist_c_rows_on_the_first_n_corrupt_images():
    from bnnkit.evaluate import EvalConfig, evaluate

    model, bundle = _Linear(), _bundle()
    cfg = EvalConfig(corruptions=[], angles=[], mnist_c="stripe,shot_noise", n_corrupt=8,
                     progress=False, latency_repeats=1, latency_batch=4)  # fmt: skip
    rows, _ = evaluate(model, bundle, cfg)
    got = {(r["split"], r["metric"]): r["value"] for r in rows}
    x, y = bundle.test.float()[:8], bundle.test.y[:8]
    striped = x.clone()
    striped[..., :7] = 1 - x[..., :7]
    striped[..., 21:] = 1 - x[..., 21:]
    per = {}
    for name, xc in (("stripe", striped), ("shot_noise", corrupt_mnist_c(x, "shot_noise"))):
        p = torch.softmax(xc.flatten(1) @ model.w.detach(), -1)
        acc = float((p.argmax(1) == y).float().mean())
        nll = float(-torch.log(p[torch.arange(8), y]).mean())
        assert got[(f"mnist_c:{name}", "accuracy")] == pytest.approx(acc)
        assert got[(f"mnist_c:{name}", "nll")] == pytest.approx(nll, rel=1e-5)
        assert (f"mnist_c:{name}", "ece") in got
        per[name] = (acc, nll)
    assert got[("mnist_c:mean", "accuracy")] == pytest.approx(
        (per["stripe"][0] + per["shot_noise"][0]) / 2
    )
    assert ("mnist_c", "stripe", 0, 8) in bundle.derived  # made once per bundle
    plain = EvalConfig(corruptions=[], angles=[], progress=False, latency_repeats=1)
    assert not any(r["split"].startswith("mnist_c") for r in evaluate(model, bundle, plain)[0])


def test_evaluation_refuses_mnist_c_where_it_is_not_defined():
    from bnnkit.evaluate import EvalConfig, evaluate

    with pytest.raises(ConfigError, match=r"unknown MNIST-C corruption\(s\) \['rot'\]"):
        EvalConfig(mnist_c=["rot"]).validate()
    cfg = EvalConfig(corruptions=[], angles=[], mnist_c="all", progress=False)
    with pytest.raises(ConfigError, match=r"28x28 grey.*\(3, 28, 28\)"):
        evaluate(_Linear(), _bundle((3, 28, 28)), cfg)
    with pytest.raises(ConfigError, match="segmentation data set: leave mnist_c empty"):
        evaluate(_Linear(), _bundle(task="segmentation"), cfg)


def test_bench_refuses_mnist_c_on_other_images_before_writing(tmp_path):
    from bnnkit.bench import BenchConfig, run_bench

    for dataset in ("cifar10", "camvid"):
        out = tmp_path / dataset
        cfg = BenchConfig(dataset=dataset, mnist_c="all", methods=["deterministic"], angles=[],
                          corruptions=[], out=str(out), model="resnet18")  # fmt: skip
        with pytest.raises(ConfigError, match="MNIST-C is defined on 28x28 grey"):
            run_bench(cfg)
        assert not out.exists()
    with pytest.raises(ConfigError, match="unknown MNIST-C"):
        BenchConfig(mnist_c=["fog", "smoke"]).validate()
    BenchConfig(mnist_c=["fog", "zigzag"]).validate()


def test_the_bench_report_has_an_mnist_c_table_per_metric():
    from bnnkit.bench import BenchConfig, _shift_tables
    from bnnkit.report.tables import mnist_c_summary

    rows = [
        {"method": m, "seed": s, "split": f"mnist_c:{c}", "metric": k, "value": v + s * 0.1}
        for m, v in (("a", 0.5), ("b", 0.7))
        for s in (0, 1)
        for c in ("zigzag", "fog", "mean")
        for k in ("accuracy", "nll")
    ]
    headers, lines = mnist_c_summary(rows, "accuracy", ["b", "a"])
    assert headers == ["Method", "fog", "zigzag", "mean"]  # the paper's order, then the mean
    assert lines == [["b", "75.0", "75.0", "75.0"], ["a", "55.0", "55.0", "55.0"]]
    assert mnist_c_summary(rows, "nll", ["a"])[1] == [["a", "0.550", "0.550", "0.550"]]
    md = _shift_tables(rows, BenchConfig(methods=["a", "b"], n_corrupt=250))
    assert "### MNIST-C: NLL per corruption (first 250 test images)" in md
    assert "### MNIST-C: Accuracy % per corruption" in md
    assert "| Method | fog | zigzag | mean |" in md


def test_cli_flag_takes_names_or_all_and_refuses_unknown_names(capsys, tmp_path):
    from bnnkit.cli import build_parser, main
    from bnnkit.cli import evaluate as evaluate_cmd

    a = build_parser().parse_args(["evaluate", "run", "--mnist-c", "all"])
    assert evaluate_cmd.config(a).mnist_c_names() == PAPER_ORDER
    a = build_parser().parse_args(["evaluate", "run", "--mnist-c", "fog,zigzag"])
    assert evaluate_cmd.config(a).mnist_c_names() == ["fog", "zigzag"]
    assert main(["evaluate", str(tmp_path), "--mnist-c", "fog,smog"]) == 2
    err = capsys.readouterr().err
    assert "unknown MNIST-C corruption(s) ['smog']" in err and "holds no trained" not in err


# ------------------------------------------------------------------ input checks and names


def test_images_outside_0_1_or_not_finite_are_refused_with_the_fix():
    x = digits(3)
    x[0, 0, 14, 14], x[2, 0, 0, 0] = 1.0, 0.0
    for bad, found in (
        (x * 255, r"got values in \[0, 255\]; images scaled 0\.\.255: divide by 255"),
        (x - 0.5, r"got values in \[-0\.5, 0\.5\]"),
        (x + 1e-4, r"got values in \[0\.0001, 1\.0001\]"),
    ):
        for name in ("stripe", "rotate", "fog"):  # stripe once returned 1 - 255 = -254
            with pytest.raises(InputError, match=found):
                corrupt_mnist_c(bad, name)
    with pytest.raises(InputError, match="to_float"):
        corrupt_mnist_c(x * 255, "stripe")
    for value in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 0, 3, 4] = value
        with pytest.raises(InputError, match="non-finite values"):
            corrupt_mnist_c(y, "stripe")
    # float rounding just outside [0, 1] is accepted, and stripe stays within it
    edge = x.clone()
    edge[0, 0, 0, 0], edge[0, 0, 0, 1] = 1 + 5e-7, -5e-7
    out = corrupt_mnist_c(edge, "stripe")
    assert float(out.min()) >= -1e-6 and float(out.max()) <= 1 + 1e-6


def test_shape_and_dtype_errors_give_the_hint_that_fits():
    x = digits(2)
    with pytest.raises(InputError) as e:
        corrupt_mnist_c(x[:, 0], "stripe")  # [N, 28, 28]: the channel axis is missing
    msg = str(e.value)
    assert "x[:, None]" in msg and "(2, 28, 28)" in msg and "to_float" not in msg
    with pytest.raises(InputError) as e:
        corrupt_mnist_c(x[0, 0], "stripe")
    assert "x[None, None]" in str(e.value) and "to_float" not in str(e.value)
    with pytest.raises(InputError, match="permute"):
        corrupt_mnist_c(x.permute(0, 2, 3, 1), "stripe")
    with pytest.raises(InputError, match=r"torch.uint8.*bnnkit.data.to_float"):
        corrupt_mnist_c((x * 255).to(torch.uint8), "stripe")
    with pytest.raises(InputError) as e:
        corrupt_mnist_c(x.long(), "stripe")
    assert "to_float" not in str(e.value) and "torch.int64" in str(e.value)
    with pytest.raises(InputError, match="as_tensor"):
        corrupt_mnist_c(x.numpy(), "stripe")


def test_an_empty_batch_gives_an_empty_result_for_every_name(recwarn):
    x = digits(3)
    for dtype in (torch.float32, torch.float64):
        empty = x[:0].to(dtype)
        for name in PAPER_ORDER:
            out = corrupt_mnist_c(empty, name, seed=1)
            assert out.shape == (0, 1, 28, 28) and out.dtype == dtype, name
            direct = MNIST_C[name](empty, torch.Generator().manual_seed(0))
            assert direct.shape == (0, 1, 28, 28), name
    assert mc.rotate_by(x[:0], 30).shape == (0, 1, 28, 28)
    assert mc.affine_about_centre(x[:0], torch.eye(2)).shape == (0, 1, 28, 28)
    assert not [str(w.message) for w in recwarn.list]


def test_seeds_must_be_non_negative_ints_below_2_to_the_63():
    x = digits(2)
    for bad in (None, 1.5, 1.0, "1", True, -1, 2**63, 2**64, torch.tensor(1)):
        want = r"seed must be an int in 0\.\.2\*\*63-1, got " + re.escape(repr(bad))
        with pytest.raises(InputError, match=want):
            corrupt_mnist_c(x, "rotate", seed=bad)
    top = corrupt_mnist_c(x, "shot_noise", seed=2**63 - 1)  # the derived seed stays in range
    assert not torch.equal(top, corrupt_mnist_c(x, "shot_noise", seed=2**63 - 2))
    assert torch.equal(corrupt_mnist_c(x, "fog", seed=np.int64(3)), corrupt_mnist_c(x, "fog", 3))


def test_names_match_in_any_case_and_all_or_none_stand_alone():
    x = digits(3)
    want = corrupt_mnist_c(x, "rotate", seed=2)
    for spelling in ("Rotate", " rotate ", "ROTATE"):
        assert torch.equal(corrupt_mnist_c(x, spelling, seed=2), want)
    assert mc.mnist_c_names("ALL") == mc.mnist_c_names(" all ") == PAPER_ORDER
    assert mc.mnist_c_names(["All"]) == PAPER_ORDER
    for nothing in ("", "none", "None", " NONE ", [], ["none"], ",", " "):
        assert mc.mnist_c_names(nothing) == [], nothing
    assert mc.mnist_c_names("Fog, ZIGZAG ,fog") == ["fog", "zigzag"]
    assert mc.mnist_c_names(["Shear", "scale"]) == ["shear", "scale"]
    for mixed in ("all,fog", ["fog", "ALL"], "none,fog", "all,none"):
        with pytest.raises(ConfigError, match="cannot be combined with other names"):
            mc.mnist_c_names(mixed)
    assert mc.mnist_c_names("all,ALL") == PAPER_ORDER  # the same word twice is not a mix


def test_unknown_names_list_the_valid_ones_in_order_and_point_to_the_other_family():
    order = ", ".join(PAPER_ORDER)
    with pytest.raises(ConfigError) as e:
        mc.mnist_c_names("fog,gaussian_noise")
    msg = str(e.value)
    assert "['gaussian_noise']" in msg and "--corruptions" in msg and order in msg
    with pytest.raises(ConfigError) as e:
        corrupt_mnist_c(digits(1), "contrast")
    msg = str(e.value)
    assert "unknown MNIST-C corruption 'contrast'" in msg and "--corruptions" in msg
    assert order in msg
    with pytest.raises(ConfigError, match=r"did you mean 'zigzag'"):
        corrupt_mnist_c(digits(1), "zigzg")
    with pytest.raises(ConfigError, match="did you mean 'canny_edges'"):
        mc.mnist_c_names(["canny_edge"])
    # a name of both families (rotate, shot_noise, ...) is simply an MNIST-C name here
    assert mc.mnist_c_names("rotate,impulse_noise") == ["rotate", "impulse_noise"]


# ------------------------------------------------------------------ batch independence


@pytest.mark.parametrize("name", PAPER_ORDER)
def test_image_i_gets_the_same_corruption_whatever_the_batch_size(name):
    """The result for image i depends only on (seed, name, i): a prefix of a batch is
    corrupted as in the whole batch (before, impulse_noise, glass_blur, fog and zigzag drew
    several arrays for the whole batch, so the first images' draws depended on its size).
    fog's plasma maps are made 64 at a time: 70 images cross a chunk boundary."""
    n = 70 if name == "fog" else 24
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(11))
    whole = corrupt_mnist_c(x, name, seed=4)
    for k in (1, 5, 13) + ((64, 65) if name == "fog" else ()):
        assert torch.equal(corrupt_mnist_c(x[:k], name, seed=4), whole[:k]), (name, k)
    # and on another seed the draws move (random corruptions only)
    if name not in DETERMINISTIC:
        assert not torch.equal(corrupt_mnist_c(x[:5], name, seed=5), whole[:5])


# ------------------------------------------------------------------ bench and CLI settings


def test_bench_settings_compare_by_the_names_they_select(tmp_path):
    import json
    from dataclasses import asdict

    from bnnkit.bench import DEFAULT_CORRUPTIONS, BenchConfig, check_reusable

    def recorded(**kw):
        cfg = BenchConfig(**kw)
        cfg.validate()
        path = tmp_path / "bench_config.json"
        path.write_text(json.dumps(asdict(cfg)))
        return path

    def check(path, **kw):
        cfg = BenchConfig(**kw)
        cfg.validate()
        check_reusable(path, cfg)

    for first, second in (
        (["rotate"], "rotate"),
        ("rotate", [" Rotate "]),
        ("all", "ALL"),
        ("all", ",".join(PAPER_ORDER)),
        ("", []),
        ("none", ""),
    ):
        check(recorded(mnist_c=first), mnist_c=second)
    cfg = BenchConfig(mnist_c="ALL", corruptions="Contrast, pixelate")
    cfg.validate()
    assert cfg.mnist_c == PAPER_ORDER and cfg.corruptions == ["contrast", "pixelate"]
    # a bench directory recorded before the names were resolved holds the text given
    path = tmp_path / "old.json"
    old = asdict(BenchConfig())
    for text, same in (("", []), ("all", "ALL"), ("fog,zigzag", ["fog", "zigzag"])):
        path.write_text(json.dumps({**old, "mnist_c": text}))
        check(path, mnist_c=same)
    # settings that differ are still refused
    with pytest.raises(ConfigError, match="other settings.*mnist_c"):
        check(recorded(mnist_c="rotate"), mnist_c="fog")
    with pytest.raises(ConfigError, match="other settings.*mnist_c"):
        check(recorded(mnist_c=""), mnist_c="fog")
    path.write_text(json.dumps({**old, "mnist_c": "fog,smog"}))  # unreadable old names
    with pytest.raises(ConfigError, match="other settings"):
        check(path, mnist_c="fog")
    with pytest.raises(ConfigError, match="other settings.*corruptions"):
        check(recorded(corruptions=list(DEFAULT_CORRUPTIONS)), corruptions="contrast")
    check(
        recorded(corruptions=list(DEFAULT_CORRUPTIONS)), corruptions=",".join(DEFAULT_CORRUPTIONS)
    )


def test_empty_and_none_mean_no_corruptions_on_every_flag(capsys, tmp_path):
    from bnnkit.bench import BenchConfig
    from bnnkit.cli import build_parser, main
    from bnnkit.cli import evaluate as evaluate_cmd
    from bnnkit.data import CORRUPTIONS
    from bnnkit.evaluate import EvalConfig

    def corruptions(*flags):
        return evaluate_cmd.config(build_parser().parse_args(["evaluate", "run", *flags]))

    for nothing in ("", "none", "NONE", " None "):
        cfg = corruptions("--corruptions", nothing, "--mnist-c", nothing, "--angles", "")
        assert cfg.corruptions == [] and cfg.mnist_c_names() == [] and cfg.angles == []
        bench = BenchConfig(corruptions=nothing, mnist_c=nothing)
        bench.validate()
        assert bench.corruptions == [] and bench.mnist_c == []
        assert EvalConfig(corruptions=nothing).validate().corruptions == []
    assert corruptions().corruptions == list(CORRUPTIONS)  # not given: all 12
    assert corruptions("--corruptions", "all").corruptions == list(CORRUPTIONS)
    got = corruptions("--corruptions", "Gaussian_Noise, contrast").corruptions
    assert got == ["gaussian_noise", "contrast"]
    assert main(["evaluate", str(tmp_path), "--corruptions", "contrast,fog"]) == 2
    err = capsys.readouterr().err
    assert "unknown corruption(s) ['fog']" in err and "--mnist-c" in err
    assert ", ".join(CORRUPTIONS) in err and "holds no trained" not in err
    assert main(["evaluate", str(tmp_path), "--mnist-c", "all,fog"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--mnist-c", "gaussian_noise"]) == 2
    err = capsys.readouterr().err
    assert "--corruptions" in err and ", ".join(PAPER_ORDER) in err
