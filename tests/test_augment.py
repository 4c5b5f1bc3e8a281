"""samlib.augment against hand computations (no captured outputs of the code itself)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers_method import augment_batch, random_crop, random_flip
from samlib.augment import TrainTransform, crop_windows, cutmix, cutout, mix_batch, mixup, one_hot, sample_lambda
from samlib.config import resolve
from samlib.errors import ConfigError


def gen(seed):
    return torch.Generator().manual_seed(seed)


def images(b=16, c=3, h=32, w=32, seed=0):
    # Strictly positive, so zeros in an output can only come from padding / cutout.
    return torch.rand(b, c, h, w, generator=gen(seed)) * 0.9 + 0.1


def hand_pad(x, p):
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h + 2 * p, w + 2 * p)
    out[:, :, p:p + h, p:p + w] = x
    return out


def crop_offsets(x, out, p):
    """For every output image, all (dy, dx) whose crop of the zero-padded input equals it."""
    padded, (h, w) = hand_pad(x, p), x.shape[-2:]
    return [[(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
             if torch.equal(padded[i, :, dy:dy + h, dx:dx + w], out[i])]
            for i in range(len(x))]


def test_random_crop_is_a_crop_of_the_zero_padded_image():
    x = images()
    out = random_crop(x, 4, gen(1))
    found = crop_offsets(x, out, 4)
    assert all(len(f) == 1 for f in found)  # exactly one valid offset per image
    assert len({f[0] for f in found}) > 4    # offsets drawn per sample, not per batch


def test_random_crop_covers_all_offsets():
    x = images(b=600, c=1, h=5, w=5)
    found = crop_offsets(x, random_crop(x, 2, gen(2)), 2)
    assert {f[0] for f in found} == {(dy, dx) for dy in range(5) for dx in range(5)}


def test_random_flip_each_image_flipped_or_not():
    x = images()
    out = random_flip(x, gen(3))
    mirrored = x[..., torch.arange(x.shape[-1] - 1, -1, -1)]
    same = [torch.equal(out[i], x[i]) for i in range(len(x))]
    flipped = [torch.equal(out[i], mirrored[i]) for i in range(len(x))]
    assert all(s or f for s, f in zip(same, flipped))
    assert any(same) and any(flipped)


def test_cutout_one_clipped_square_of_zeros():
    x = images(b=64)
    out = cutout(x, 16, gen(4))
    sides = set()
    for i in range(len(x)):
        hole = out[i] == 0
        assert torch.equal(hole, hole[:1].expand_as(hole))  # same hole in every channel
        hole = hole[0]
        rows = hole.any(1).nonzero().flatten()
        cols = hole.any(0).nonzero().flatten()
        assert len(rows) > 0  # the centre is always inside the image
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert len(rows) == r1 - r0 and len(cols) == c1 - c0  # contiguous
        box = torch.zeros_like(hole)
        box[r0:r1, c0:c1] = True
        assert torch.equal(hole, box)  # a filled rectangle
        assert r1 - r0 <= 16 and c1 - c0 <= 16
        # Clipped only at the border: a side shorter than 16 touches an edge.
        assert r1 - r0 == 16 or r0 == 0 or r1 == 32
        assert c1 - c0 == 16 or c0 == 0 or c1 == 32
        sides.add((int(r1 - r0), int(c1 - c0)))
        assert torch.equal(out[i][:, ~hole], x[i][:, ~hole])  # rest unchanged
    assert (16, 16) in sides and len(sides) > 1


def test_crop_windows_is_hand_slicing_at_any_index_and_dtype():
    for dtype in (torch.uint8, torch.float32):
        padded = torch.randint(0, 256, (7, 3, 12, 10), generator=gen(6)).to(dtype)
        index = torch.tensor([5, 0, 5, 3, 6])
        dy, dx = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([2, 0, 1, 2, 0])
        out = crop_windows(padded, index, dy, dx, (8, 8))
        by_hand = torch.stack([padded[i, :, a:a + 8, b:b + 8] for i, a, b in zip(index, dy, dx)])
        assert out.dtype == dtype and torch.equal(out, by_hand)


def test_train_transform_is_crop_flip_cutout_of_the_indexed_images():
    """The mirror-store path agrees bit for bit with the three public transforms in the
    documented draw order, and with a per-image hand computation of the same draws."""
    raw = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=gen(7))
    index = torch.randperm(40, generator=gen(8))[:25]
    for p, flip, size in [(4, True, 16), (0, True, 16), (3, False, 0), (4, True, 0), (0, False, 10)]:
        out = TrainTransform(raw, p, flip, size)(index, gen(9))
        g = gen(9)
        assert torch.equal(out, cutout(random_flip(random_crop(raw[index], p, g), g) if flip else
                                       random_crop(raw[index], p, g), size, g))
        g, b = gen(9), len(index)       # the same draws, applied image by image
        dy, dx = (torch.randint(0, 2 * p + 1, (b,), generator=g) for _ in range(2)) if p else ([0] * b,) * 2
        flipped = torch.rand(b, generator=g) < 0.5 if flip else [False] * b
        cy, cx = (torch.randint(0, 32, (b, 1), generator=g) for _ in range(2)) if size else (None, None)
        padded = torch.zeros(len(raw), 3, 32 + 2 * p, 32 + 2 * p, dtype=torch.uint8)
        padded[:, :, p:p + 32, p:p + 32] = raw
        for i, j in enumerate(index):
            want = padded[j, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
            want = want.flip(-1) if flipped[i] else want.clone()
            if size:
                r, c = int(cy[i]), int(cx[i])
                want[:, max(r - size // 2, 0):r + size // 2, max(c - size // 2, 0):c + size // 2] = 0
            assert torch.equal(out[i], want), (p, flip, size, i)


def test_train_transform_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        TrainTransform(images())


def test_one_hot_by_hand():
    expected = torch.tensor([[0., 0., 1.], [1., 0., 0.]])
    assert torch.equal(one_hot(torch.tensor([2, 0]), 3), expected)
    assert one_hot(torch.tensor([1]), dtype=torch.float16).dtype == torch.float16


def recover_pairs(y_out):
    """Targets were one_hot(arange(B)): row i = lam*e_i + (1-lam)*e_j. Return lam_i, j_i."""
    pairs = []
    for i, row in enumerate(y_out):
        others = [k for k in row.nonzero().flatten().tolist() if k != i]
        pairs.append((row[i].item(), others[0]) if others else (None, i))
    return pairs


@pytest.mark.parametrize("lam", [None, 0.7])
def test_mixup_convex_pairs(lam):
    b = 8
    x, y = images(b=b), one_hot(torch.arange(b), num_classes=b)
    x_out, y_out = mixup(x, y, alpha=0.3, generator=gen(5), lam=lam)
    pairs = recover_pairs(y_out)
    lams = {round(l, 6) for l, _ in pairs if l is not None}
    assert len(lams) == 1  # one lambda per batch
    lam_hat = lams.pop()
    if lam is not None:
        assert lam_hat == pytest.approx(lam)
    js = [j for _, j in pairs]
    assert sorted(js) == list(range(b))  # partners form a permutation
    for i, j in enumerate(js):
        assert torch.allclose(x_out[i], lam_hat * x[i] + (1 - lam_hat) * x[j], atol=1e-5)
        assert torch.allclose(y_out[i], lam_hat * y[i] + (1 - lam_hat) * y[j], atol=1e-6)
    assert torch.allclose(y_out.sum(1), torch.ones(b))


def test_mixup_inplace_same_numbers_and_overwrites_its_input():
    x, y = images(), one_hot(torch.arange(16) % 10)
    x_out, y_out = mixup(x, y, 0.3, gen(5), lam=0.7)
    x_in = x.clone()
    x_out2, y_out2 = mixup(x_in, y, 0.3, gen(5), lam=0.7, inplace=True)
    assert x_out2 is x_in and torch.equal(x_out2, x_out) and torch.equal(y_out2, y_out)


def test_cutmix_box_and_area_weights():
    b, h, w = 8, 32, 32
    x, y = images(b=b), one_hot(torch.arange(b), num_classes=b)
    nontrivial = 0
    for seed in range(10):
        x_out, y_out = cutmix(x, y, alpha=1.0, generator=gen(seed))
        boxes = set()
        for i, (weight_i, j) in enumerate(recover_pairs(y_out)):
            if j == i:
                assert torch.equal(x_out[i], x[i])
                continue
            inside = (x_out[i] != x[i]).any(0)
            rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
            r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            boxes.add((r0, r1, c0, c1))
            box = torch.zeros(h, w, dtype=torch.bool)
            box[r0:r1, c0:c1] = True
            assert torch.equal(inside, box)
            assert torch.equal(x_out[i][:, box], x[j][:, box])
            assert torch.equal(x_out[i][:, ~box], x[i][:, ~box])
            area = (r1 - r0) * (c1 - c0) / (h * w)
            assert y_out[i, j].item() == pytest.approx(area, abs=1e-6)
            assert weight_i == pytest.approx(1 - area, abs=1e-6)
        assert len(boxes) <= 1  # one box for the whole batch
        nontrivial += len(boxes)
        assert torch.allclose(y_out.sum(1), torch.ones(b))
    assert nontrivial > 0


def test_cutmix_scalars_come_from_the_host_generator_when_given():
    """lam and the box centre are drawn from host_generator (no device sync on a GPU): the
    same host seed gives the same box and target weights whatever the batch generator."""
    x, y = images(b=8), one_hot(torch.arange(8), num_classes=8)
    boxes, weights = [], []
    for batch_seed in (1, 2):
        x_out, y_out = cutmix(x, y, 1.0, gen(batch_seed), host_generator=gen(7))
        boxes.append((x_out != x).any(0).any(0))           # pixels replaced in some image
        weights.append({round(v, 6) for v in y_out.flatten().tolist() if 0 < v < 1})  # lam, 1 - lam
    assert torch.equal(boxes[0], boxes[1]) and weights[0] == weights[1] and len(weights[0]) >= 1
    _, y_other = cutmix(x, y, 1.0, gen(1), host_generator=gen(8))
    assert {round(v, 6) for v in y_other.flatten().tolist() if 0 < v < 1} != weights[0]


def test_sample_lambda_beta_moments_and_errors():
    draws = torch.tensor([sample_lambda(0.3, gen(s)) for s in range(3000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws.mean().item() == pytest.approx(0.5, abs=0.03)
    # Var of Beta(a, a) = 1 / (4 (2a + 1)).
    assert draws.var().item() == pytest.approx(1 / (4 * 1.6), abs=0.015)
    for bad in (0, -0.1):
        with pytest.raises(ValueError):
            sample_lambda(bad, gen(0))


def test_mix_batch_dispatch():
    x, y = images(b=4), one_hot(torch.arange(4), 10)
    for kind, alpha in (("none", 0.3), ("mixup", 0), ("cutmix", 0)):
        xo, yo = mix_batch(x, y, kind, alpha, gen(0))
        assert xo is x and yo is y  # no mixing, not even a copy
    for kind, fn in (("mixup", mixup), ("cutmix", cutmix)):
        a, b = mix_batch(x, y, kind, 0.3, gen(7)), fn(x, y, 0.3, gen(7))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ConfigError, match="mixup"):    # samlib.config validates the mix kind
        resolve("final", "smoke", mix="mosaic")
    with pytest.raises(ValueError):
        mixup(x, torch.arange(4), 0.3)  # hard labels must be one-hot first


def test_augment_batch_conversion_and_errors():
    raw = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    plain = augment_batch(raw, crop_padding=0, flip=False, cutout_size=0)
    assert plain.dtype == torch.float32 and torch.equal(plain, raw.float() / 255)
    with pytest.raises(ValueError):
        augment_batch(raw.float())


@pytest.mark.parametrize("fn", [
    lambda x, g: random_crop(x, 4, g), lambda x, g: random_flip(x, g),
    lambda x, g: cutout(x, 16, g),
    lambda x, g: mixup(x, one_hot(torch.arange(len(x)) % 10), 0.3, g),
    lambda x, g: cutmix(x, one_hot(torch.arange(len(x)) % 10), 1.0, g),
])
def test_determinism_under_seed(fn):
    x = images()
    a, b, c = fn(x, gen(11)), fn(x, gen(11)), fn(x, gen(12))
    a, b, c = (t if isinstance(t, tuple) else (t,) for t in (a, b, c))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_global_rng_when_no_generator():
    x = images()
    torch.manual_seed(3)
    a = random_crop(x)
    torch.manual_seed(3)
    assert torch.equal(a, random_crop(x))


SHAPES = dict(b=st.integers(1, 8), h=st.integers(4, 40), w=st.integers(4, 40),
              seed=st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(**SHAPES, crop=st.integers(0, 6), flip=st.booleans(), size=st.integers(0, 20))
def test_property_augment_batch(b, h, w, seed, crop, flip, size):
    raw = torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=gen(seed))
    out = augment_batch(raw, crop, flip, size, gen(seed))
    assert out.shape == (b, 3, h, w) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, augment_batch(raw, crop, flip, size, gen(seed)))


@settings(max_examples=25, deadline=None)
@given(**SHAPES, alpha=st.floats(0.05, 2.0), kind=st.sampled_from(["mixup", "cutmix"]),
       classes=st.integers(2, 12))
def test_property_mix_batch(b, h, w, seed, alpha, kind, classes):
    g = gen(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    y = one_hot(torch.randint(0, classes, (b,), generator=g), classes)
    xo, yo = mix_batch(x, y, kind, alpha, gen(seed))
    assert xo.shape == x.shape and xo.dtype == x.dtype and yo.shape == y.shape
    assert xo.min() >= 0 and xo.max() <= 1
    assert yo.min() >= 0 and torch.allclose(yo.sum(1), torch.ones(b))
    xo2, yo2 = mix_batch(x, y, kind, alpha, gen(seed))
    assert torch.equal(xo, xo2) and torch.equal(yo, yo2)
