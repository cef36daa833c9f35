"""The dense-prediction data path: joint scale / crop / flip of images and label maps on the
whole batch against per-image brute force (slicing, F.interpolate), geometry read off label
maps that encode their own coordinates, image/mask alignment, and the loader's seeded epochs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnnkit.data import seg_loader
from bnnkit.data.seg_loader import SegAugment, SegTensorLoader, apply_crop
from bnnkit.data.segmentation import IGNORE_INDEX
from bnnkit.errors import ConfigError, InputError


def _data(n=6, h=12, w=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g).to(torch.uint8)
    y = torch.randint(0, classes, (n, h, w), generator=g).to(torch.uint8)
    y[:, 0, 0] = IGNORE_INDEX  # some void pixels
    return x, y


def _reference(x, y, d, crop, mask_mode="nearest-exact"):
    """Image by image: resize with F.interpolate, pad bottom/right, slice the crop, mirror."""
    ch, cw = crop
    xs, ys = [], []
    for i in range(x.shape[0]):
        hs, ws = int(d.scaled_h[i]), int(d.scaled_w[i])
        img = x[i : i + 1].float()
        lab = y[i : i + 1, None].float()
        if (hs, ws) != tuple(x.shape[-2:]):
            img = F.interpolate(img, size=(hs, ws), mode="bilinear", align_corners=False)
            lab = F.interpolate(lab, size=(hs, ws), mode=mask_mode)
        ph, pw = max(ch - hs, 0), max(cw - ws, 0)
        img = F.pad(img, (0, pw, 0, ph), value=0.0)
        lab = F.pad(lab, (0, pw, 0, ph), value=float(IGNORE_INDEX))
        t, lft = int(d.top[i]), int(d.left[i])
        img, lab = img[..., t : t + ch, lft : lft + cw], lab[..., t : t + ch, lft : lft + cw]
        if d.flip[i]:
            img, lab = img.flip(-1), lab.flip(-1)
        xs.append(img.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else img)
        ys.append(lab[:, 0].to(y.dtype))
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("crop", [(8, 10), (12, 16), (15, 20), (5, 21)])
@pytest.mark.parametrize("flip", [True, False])
def test_scale_one_is_a_crop_and_flip_exactly(crop, flip):
    """Scale 1: slicing (with padding where the crop is larger), bit for bit."""
    x, y = _data()
    aug = SegAugment(crop=crop, scale=(1.0, 1.0), flip=flip)
    xo, yo = aug(x, y, torch.Generator().manual_seed(3))
    d = aug.draw(x.shape[0], 12, 16, torch.Generator().manual_seed(3))
    xr, yr = _reference(x, y, d, crop)
    assert xo.dtype == torch.uint8 and yo.dtype == torch.uint8
    assert xo.shape == (6, 3, *crop) and yo.shape == (6, *crop)
    assert torch.equal(xo, xr) and torch.equal(yo, yr)
    if flip:
        assert d.flip.any() and (~d.flip).any()


@pytest.mark.parametrize("scale", [(0.5, 0.8), (1.3, 2.0), (0.4, 2.5)])
def test_scaled_crop_matches_interpolate_per_image(scale):
    """Scale != 1: images as F.interpolate(bilinear) then slicing (float images: up to float
    error). Masks agree with nearest-exact resizing except at ties of the nearest rule, which
    are many at simple scales (0.5: every pixel): the next test checks them exactly."""
    x, y = _data(n=8, h=12, w=16)
    x = x.float() / 255
    crop = (10, 14)
    aug = SegAugment(crop=crop, scale=scale)
    xo, yo = aug(x, y, torch.Generator().manual_seed(7))
    d = aug.draw(8, 12, 16, torch.Generator().manual_seed(7))
    assert ((d.scaled_h != 12) | (d.scaled_w != 16)).sum() >= 5  # mostly really scaled
    xr, yr = _reference(x, y, d, crop)
    assert xo.dtype == torch.float32
    torch.testing.assert_close(xo, xr, rtol=0, atol=1e-5)
    assert ((yo == IGNORE_INDEX) == (yr == IGNORE_INDEX)).all()  # the same padding


@pytest.mark.parametrize("scale", [(0.3, 0.9), (1.0, 1.0), (1.1, 3.0)])
def test_masks_that_encode_their_coordinates_land_where_the_geometry_says(scale):
    """Label = source column (or row): each output pixel holds the nearest source pixel of its
    scaled, cropped, mirrored position: floor((u + 0.5) * H / Hs) (ties of the rounding
    excepted), and IGNORE_INDEX exactly where the crop leaves the scaled image."""
    n, h, w = 10, 20, 30
    cols = torch.arange(w).expand(n, h, w).to(torch.uint8)
    rows = torch.arange(h)[:, None].expand(n, h, w).to(torch.uint8)
    x = torch.zeros(n, 3, h, w, dtype=torch.uint8)
    crop = (16, 24)
    aug = SegAugment(crop=crop, scale=scale)
    d = aug.draw(n, h, w, torch.Generator().manual_seed(1))
    _, col_out = apply_crop(x, cols, d, crop, IGNORE_INDEX)
    _, row_out = apply_crop(x, rows, d, crop, IGNORE_INDEX)
    for i in range(n):
        hs, ws = int(d.scaled_h[i]), int(d.scaled_w[i])
        u = int(d.top[i]) + torch.arange(crop[0])
        j = torch.arange(crop[1])
        v = int(d.left[i]) + (crop[1] - 1 - j if d.flip[i] else j)
        want_r = torch.div((2 * u + 1) * h, 2 * hs, rounding_mode="floor")
        want_c = torch.div((2 * v + 1) * w, 2 * ws, rounding_mode="floor")
        tie_r, tie_c = ((2 * u + 1) * h) % (2 * hs) == 0, ((2 * v + 1) * w) % (2 * ws) == 0
        in_r, in_c = u < hs, v < ws
        got_c, got_r = col_out[i].long(), row_out[i].long()
        pad = ~(in_r[:, None] & in_c[None, :])
        assert (got_c[pad] == IGNORE_INDEX).all() and (got_r[pad] == IGNORE_INDEX).all()
        ok_c = (in_r[:, None] & in_c[None, :] & ~tie_c[None, :]).expand_as(got_c)
        ok_r = (in_r[:, None] & in_c[None, :] & ~tie_r[:, None]).expand_as(got_r)
        assert torch.equal(got_c[ok_c], want_c[None, :].expand_as(got_c)[ok_c]), i
        assert torch.equal(got_r[ok_r], want_r[:, None].expand_as(got_r)[ok_r]), i
        if hs == h and ws == w:  # no resizing: no ties to except
            assert torch.equal(got_c[~pad], want_c[None, :].expand_as(got_c)[~pad])


def test_flip_only_is_torch_flip():
    x, y = _data(n=16)
    xo, yo = SegAugment(flip=True)(x, y, torch.Generator().manual_seed(2))
    flipped = []
    for i in range(16):
        same = torch.equal(xo[i], x[i]) and torch.equal(yo[i], y[i])
        mirrored = torch.equal(xo[i], x[i].flip(-1)) and torch.equal(yo[i], y[i].flip(-1))
        assert same != mirrored, i
        flipped.append(mirrored)
    assert any(flipped) and not all(flipped)


@pytest.mark.parametrize("seed", range(3))
def test_every_output_label_is_an_input_label_or_void(seed):
    x, y = _data(n=8, classes=7, seed=seed)
    y[y == 3] = 6  # labels with gaps: 3 never occurs
    aug = SegAugment(crop=(14, 9), scale=(0.25, 3.0))
    _, yo = aug(x, y, torch.Generator().manual_seed(seed))
    for i in range(8):
        allowed = set(y[i].unique().tolist()) | {IGNORE_INDEX}
        assert set(yo[i].unique().tolist()) <= allowed


def test_masks_stay_aligned_with_their_images():
    """mask = (red channel > 128) on a blocky image still holds after augmentation, except
    next to a boundary of the mask (where bilinear and nearest sampling may disagree) and on
    the crop's outer frame."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (12, 3, 5, 6), generator=g).float()
    x = F.interpolate(blocks, scale_factor=6, mode="nearest").to(torch.uint8)  # 30 x 36
    x[:, 0][(x[:, 0] > 118) & (x[:, 0] < 138)] = 200  # no red near the threshold
    y = (x[:, 0] > 128).to(torch.uint8)
    aug = SegAugment(crop=(24, 28), scale=(0.5, 2.0))
    xo, yo = aug(x, y, torch.Generator().manual_seed(4))
    valid = yo != IGNORE_INDEX
    agree = (xo[:, 0] > 128).to(torch.uint8) == yo
    lab = yo.float()[:, None]
    hi = F.max_pool2d(lab.masked_fill(~valid[:, None], -1), 3, 1, 1)[:, 0]
    lo = -F.max_pool2d(-lab.masked_fill(~valid[:, None], 2), 3, 1, 1)[:, 0]
    boundary = hi != lo
    # at the crop's edge the other side of a boundary may lie outside the crop
    boundary[:, [0, -1], :] = True
    boundary[:, :, [0, -1]] = True
    assert valid.float().mean() > 0.5 and (~agree & valid).any()  # boundaries exist
    assert (agree | ~valid | boundary).all()
    assert (agree | ~valid).float().mean() > 0.95
    # padded pixels are zero in the image and void in the mask together
    assert (xo.permute(1, 0, 2, 3)[:, ~valid] == 0).all()


def test_one_grid_sample_per_tensor_per_batch(monkeypatch):
    """The whole batch in one call for the images and one for the masks: no per-image loop."""
    calls = []
    real = F.grid_sample

    def counting(inp, *args, **kwargs):
        calls.append(inp.shape[0])
        return real(inp, *args, **kwargs)

    monkeypatch.setattr(seg_loader.F, "grid_sample", counting)
    x, y = _data(n=20)
    loader = SegTensorLoader(x, y, 8, augment=SegAugment(crop=(8, 8), scale=(0.5, 2.0)))
    batches = list(loader)
    assert len(batches) == 3 and calls == [8, 8, 8, 8, 4, 4]


def _batches(loader):
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_epochs_are_seeded_by_seed_and_epoch_alone():
    x, y = _data(n=20)
    aug = SegAugment(crop=(8, 10), scale=(0.5, 1.5))

    def make(seed=0):
        return SegTensorLoader(x, y, 6, augment=aug, seed=seed)

    a, b = make(), make()
    for _ in range(2):  # an earlier epoch on one of them does not change epoch 1
        list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    ea, eb = _batches(a), _batches(b)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ea, eb))
    b.set_epoch(2)
    assert not torch.equal(_batches(b)[0][0], ea[0][0])
    other = make(seed=1)
    other.set_epoch(1)
    assert not torch.equal(_batches(other)[0][0], ea[0][0])
    assert a.sampler is not None and hasattr(a.sampler, "set_epoch")
    # the augmentation itself, not only the order, is drawn anew every epoch
    fixed = SegTensorLoader(x, y, 6, augment=aug, shuffle=False)
    fixed.set_epoch(1)
    e1 = _batches(fixed)
    fixed.set_epoch(2)
    assert not torch.equal(_batches(fixed)[0][0], e1[0][0])


def test_loader_shapes_shares_and_evaluation_batches():
    x, y = _data(n=21)
    loader = SegTensorLoader(x, y, 4, shuffle=False)  # evaluation: stored images, in order
    got = list(loader)
    assert len(loader) == len(got) == 6
    assert torch.equal(torch.cat([b[0] for b in got]), x)
    assert torch.equal(torch.cat([b[1] for b in got]), y)
    dl = SegTensorLoader(x, y, 4, drop_last=True, augment=SegAugment(crop=(6, 6)))
    assert len(dl) == 5 and all(b[0].shape == (4, 3, 6, 6) for b in dl)
    # two ranks: equal, disjoint shares of the same epoch order (ids carried in a mask pixel)
    ids = y.clone()
    ids[:, 0, 0] = torch.arange(21, dtype=torch.uint8)
    seen = []
    for rank in range(2):
        r = SegTensorLoader(x, ids, 5, rank=rank, world_size=2, seed=3)
        seen.append(torch.cat([b[1][:, 0, 0] for b in r]).tolist())
    assert len(seen[0]) == len(seen[1]) == 10 and not set(seen[0]) & set(seen[1])


def test_bad_inputs_are_refused_with_the_fix():
    x, y = _data()
    with pytest.raises(InputError, match="do not match"):
        SegTensorLoader(x, y[:, :-1], 2)
    with pytest.raises(InputError, match="do not match"):
        SegTensorLoader(x, y[:-1], 2)
    with pytest.raises(InputError, match="integer labels"):
        SegTensorLoader(x, y.float(), 2)
    with pytest.raises(ConfigError, match="s_min"):
        SegAugment(scale=(2.0, 1.0))
    with pytest.raises(ConfigError, match="crop"):
        SegAugment(crop=(0, 4))
    with pytest.raises(ConfigError, match="SegAugment"):
        SegTensorLoader(x, y, 2, augment=object())
