"""The device-resident data path: batch augmentation against per-image brute force, the tensor
loader's seeded epochs, and its shares under data parallelism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnnkit.data.loader import Augment, TensorLoader, epoch_seed
from bnnkit.data.transforms import cutout, random_crop_flip
from bnnkit.errors import ConfigError


def _images(n=16, c=3, h=8, w=10, dtype=torch.uint8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.int64)
    return x.to(dtype) if dtype == torch.uint8 else x.to(dtype) / 255


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("pad,flip", [(4, True), (2, False), (0, True)])
def test_random_crop_flip_equals_padding_and_slicing_each_image(dtype, pad, flip):
    x = _images(dtype=dtype)
    N, C, H, W = x.shape
    out = random_crop_flip(x, pad, flip, generator=torch.Generator().manual_seed(5))
    # the same draws, in the same order, applied image by image
    g = torch.Generator().manual_seed(5)
    oy = torch.randint(0, 2 * pad + 1, (N,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (N,), generator=g)
    mirrored = torch.rand(N, generator=g) < 0.5 if flip else torch.zeros(N, dtype=torch.bool)
    for i in range(N):
        img = F.pad(x[i], (pad, pad, pad, pad))[:, oy[i] : oy[i] + H, ox[i] : ox[i] + W]
        if mirrored[i]:
            img = img.flip(-1)
        assert torch.equal(out[i], img), i
    assert out.dtype == dtype and out.shape == x.shape
    if flip and pad == 0:  # no padding: every image is itself or its mirror image
        assert mirrored.any() and (~mirrored).any()


@pytest.mark.parametrize("size", [1, 3, 4, 8, 30])
def test_cutout_equals_a_clipped_square_per_image(size):
    x = _images(n=32, h=9, w=11)
    fill = (10, 20, 30)
    out = cutout(x, size, fill, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    N, C, H, W = x.shape
    cy = torch.randint(0, H, (N, 1), generator=g)[:, 0]
    cx = torch.randint(0, W, (N, 1), generator=g)[:, 0]
    for i in range(N):
        ref = x[i].clone()
        top, left = int(cy[i]) - size // 2, int(cx[i]) - size // 2
        for r in range(max(0, top), min(H, top + size)):
            for c in range(max(0, left), min(W, left + size)):
                ref[:, r, c] = torch.tensor(fill, dtype=torch.uint8)
        assert torch.equal(out[i], ref), i
    if size == 1:  # exactly one pixel per image
        changed = (out != x).any(1).flatten(1).sum(1)
        assert (changed <= 1).all()
    if size >= 2 * max(H, W):  # covers every image whole
        assert (out == torch.tensor(fill, dtype=torch.uint8).view(1, 3, 1, 1)).all()


def test_cutout_fill_is_checked():
    with pytest.raises(ValueError, match="1 or 3 values"):
        cutout(_images(), 4, (1, 2))


def test_augment_fill_is_the_mean_pixel_in_either_dtype():
    """A cutout square holds the mean pixel: 0 after the model's normalisation."""
    aug = Augment(crop_pad=0, flip=False, cutout=100, fill=(0.25, 0.5, 1.0))
    u8 = aug(_images(), torch.Generator().manual_seed(0))
    f32 = aug(_images(dtype=torch.float32), torch.Generator().manual_seed(0))
    want = torch.tensor([64, 128, 255], dtype=torch.uint8).expand(16, 3)
    assert torch.equal(u8[:, :, 0, 0], want)
    assert torch.allclose(f32[:, :, 0, 0], torch.tensor([0.25, 0.5, 1.0]).expand(16, 3))
    with pytest.raises(ConfigError, match=">= 0"):
        Augment(cutout=-1)


def _loader(n=50, bs=8, **kw):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return TensorLoader(x, torch.arange(n), bs, **kw)


def test_every_epoch_is_a_seeded_permutation_independent_of_history():
    loader = _loader(seed=3)
    orders = {}
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)
        ys = torch.cat([y for _, y in loader])
        assert sorted(ys.tolist()) == list(range(50))  # each example once (no drop_last)
        orders[epoch] = ys
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    # epoch 2 straight away (a resumed run) gives the same batches
    fresh = _loader(seed=3)
    fresh.set_epoch(2)
    assert torch.equal(torch.cat([y for _, y in fresh]), orders[2])
    other = _loader(seed=4)
    other.set_epoch(2)
    assert not torch.equal(torch.cat([y for _, y in other]), orders[2])
    # images travel with their labels
    for xb, yb in loader:
        assert torch.equal(xb[:, 0, 0, 0].long(), yb)


def test_batches_lengths_and_drop_last():
    assert len(_loader(50, 8)) == 7 and [len(y) for _, y in _loader(50, 8)][-1] == 2
    dl = _loader(50, 8, drop_last=True)
    assert len(dl) == 6 and all(len(y) == 8 for _, y in dl)
    ordered = torch.cat([y for _, y in _loader(50, 8, shuffle=False)])
    assert torch.equal(ordered, torch.arange(50))


def test_ranks_get_equal_disjoint_shares_of_one_epoch_order():
    shares = []
    for rank in range(3):
        dl = _loader(50, 4, seed=1, rank=rank, world_size=3)
        dl.set_epoch(5)
        shares.append(torch.cat([y for _, y in dl]))
        assert len(dl) == 4  # 16 examples each, 4 per batch
    assert all(len(s) == 16 for s in shares)
    seen = torch.cat(shares)
    assert len(set(seen.tolist())) == 48  # disjoint; the remainder of 2 is left out
    single = _loader(50, 4, seed=1)
    single.set_epoch(5)
    order = torch.cat([y for _, y in single])
    assert torch.equal(shares[1], order[:48][1::3])
    with pytest.raises(ConfigError, match="outside"):
        _loader(rank=3, world_size=3)
    with pytest.raises(ConfigError, match="both"):
        _loader(rank=1)


def test_augmented_epochs_are_reproducible_and_differ_between_epochs():
    x = _images(n=40, h=8, w=8)
    aug = Augment(crop_pad=2, flip=True, cutout=3, fill=(0.5, 0.5, 0.5))

    def epoch(e, seed=0):
        dl = TensorLoader(x, torch.arange(40), 10, seed=seed, augment=aug)
        dl.set_epoch(e)
        return torch.cat([xb for xb, _ in dl]), torch.cat([y for _, y in dl])

    a, ya = epoch(1)
    b, yb = epoch(1)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    c, yc = epoch(2)
    assert not torch.equal(a[ya.argsort()], c[yc.argsort()])
    assert a.dtype == torch.uint8 and a.shape == (40, 3, 8, 8)
    assert epoch_seed(0, 1, 0) != epoch_seed(0, 1, 1) != epoch_seed(1, 1, 1)


def test_bad_loader_input_is_refused():
    import numpy as np

    with pytest.raises(ConfigError, match="torch tensors"):
        TensorLoader(np.zeros((4, 1, 2, 2)), torch.zeros(4), 2)
    with pytest.raises(ConfigError, match="labels"):
        TensorLoader(torch.zeros(4, 1, 2, 2), torch.zeros(3), 2)
    with pytest.raises(ConfigError, match="batch_size"):
        TensorLoader(torch.zeros(4, 1, 2, 2), torch.zeros(4), 0)
    with pytest.raises(ConfigError, match=r"\[N, C, H, W\]"):
        TensorLoader(torch.zeros(4, 5), torch.zeros(4), 2, augment=Augment())


def test_streams_stack_independent_orders_stream_major():
    loader = _loader(50, 8, seed=2, streams=3)
    loader.set_epoch(4)
    batches = [y for _, y in loader]
    assert len(batches) == 7 and all(len(y) % 3 == 0 for y in batches)
    per_stream = [torch.cat([y.view(3, -1)[k] for y in batches]) for k in range(3)]
    for order in per_stream:  # every stream sees every example once
        assert sorted(order.tolist()) == list(range(50))
    assert not torch.equal(per_stream[0], per_stream[1])
    assert not torch.equal(per_stream[1], per_stream[2])
    single = _loader(50, 8, seed=2)
    single.set_epoch(4)
    assert torch.equal(per_stream[0], torch.cat([y for _, y in single]))  # stream 0 = usual
    with pytest.raises(ConfigError, match="streams"):
        _loader(streams=0)
