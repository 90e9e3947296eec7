"""Tests for datasets/augment.py: parameter distributions, agreement with torchvision's
get_params logic and functional ops, per-image randomness, forward and determinism."""

import itertools
import math

import pytest
import torch
import torchvision.transforms.functional as TF

from datasets.augment import NUM_UNIFORMS, UNIFORM_SLOTS, BatchAugment, apply_params, sample_params

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def uniforms(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, NUM_UNIFORMS, generator=g)


def within_sigma(rate, p, n, k=5.0):
    return abs(rate - p) <= k * math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- distributions

@pytest.fixture(scope="module")
def many_params():
    n, size = 20_000, 32
    return n, size, sample_params(uniforms(n, seed=0), size, size)


def test_crops_inside_image_and_in_range(many_params):
    n, size, p = many_params
    top, left, h, w = (p[k].double() for k in ("top", "left", "crop_h", "crop_w"))
    assert (top >= 0).all() and (left >= 0).all()
    assert (h >= 1).all() and (w >= 1).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    # w, h are rounded from continuous w0, h0 with w0 * h0 in [0.2, 1] * area and
    # w0 / h0 in [3/4, 4/3]; check some w0 in [w - .5, w + .5], h0 in [h - .5, h + .5]
    # satisfies both, i.e. the integers are consistent with rounding.
    area = size * size
    assert ((w + 0.5) * (h + 0.5) >= 0.2 * area).all()
    assert ((w - 0.5) * (h - 0.5) <= area).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
    assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    # ...and that the range is actually used.
    frac = h * w / area
    assert frac.min() < 0.22 and frac.max() == 1.0
    aspect = w / h
    assert aspect.min() < 0.8 and aspect.max() > 1.25
    # Offsets are spread over the available range, not e.g. always centred.
    assert (top == 0).any() and (top + h == size).any()
    assert (left == 0).any() and (left + w == size).any()


def test_jitter_factor_distributions(many_params):
    n, _, p = many_params
    sd_uniform = 0.8 / math.sqrt(12)  # std of U(a, a + 0.8)
    for name in ("brightness", "contrast", "saturation"):
        f = p[name]
        assert f.min() >= 0.6 and f.max() <= 1.4, name
        assert abs(f.mean().item() - 1.0) < 5 * sd_uniform / math.sqrt(n), name
    h = p["hue"]
    assert h.min() >= -0.4 and h.max() <= 0.4
    assert abs(h.mean().item()) < 5 * sd_uniform / math.sqrt(n)
    # Factors of one image are independent of each other.
    corr = torch.corrcoef(torch.stack([p["brightness"], p["contrast"], p["saturation"], h]))
    assert (corr - torch.eye(4)).abs().max() < 5 / math.sqrt(n)


def test_grayscale_and_flip_rates(many_params):
    n, _, p = many_params
    assert p["grayscale"].dtype == torch.bool and p["flip"].dtype == torch.bool
    assert within_sigma(p["grayscale"].float().mean().item(), 0.2, n)
    assert within_sigma(p["flip"].float().mean().item(), 0.5, n)


def test_jitter_orders_are_uniform_permutations(many_params):
    n, _, p = many_params
    order = p["order"]
    assert order.shape == (n, 4) and order.dtype == torch.long
    assert (order.sort(dim=1).values == torch.arange(4)).all()  # each row a permutation
    counts = {perm: 0 for perm in itertools.permutations(range(4))}
    for row in map(tuple, order.tolist()):
        counts[row] += 1
    for perm, c in counts.items():
        assert c > 0, perm
        assert within_sigma(c / n, 1 / 24, n), (perm, c)


def test_disabled_flip_and_color():
    u = uniforms(1000, seed=1)
    p = sample_params(u, 32, 32, flip=False, color=False)
    assert not p["flip"].any() and not p["grayscale"].any()
    assert (p["brightness"] == 1).all() and (p["contrast"] == 1).all()
    assert (p["saturation"] == 1).all() and (p["hue"] == 0).all()
    # Crops are unaffected by the switches.
    q = sample_params(u, 32, 32)
    for k in ("top", "left", "crop_h", "crop_w"):
        assert torch.equal(p[k], q[k])


# ------------------------------------------ crop sampling vs torchvision's logic

def reference_crop(u, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params in plain Python, with its random
    draws taken from the uniform slots instead of the global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    a_slot, r_slot = UNIFORM_SLOTS["area"], UNIFORM_SLOTS["log_ratio"]
    for attempt in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[a_slot.start + attempt])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[r_slot.start + attempt])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(math.floor(u[UNIFORM_SLOTS["top"]] * (height - h + 1)))  # randint(0, H-h+1)
            j = int(math.floor(u[UNIFORM_SLOTS["left"]] * (width - w + 1)))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def force_fallback(u):
    """Make every crop attempt too large to fit: full area at the extreme aspect."""
    u = u.clone()
    u[:, UNIFORM_SLOTS["area"]] = 0.999
    u[:, UNIFORM_SLOTS["log_ratio"]] = torch.where(u[:, UNIFORM_SLOTS["flip"], None] < 0.5, 0.0, 0.999)
    return u


@pytest.mark.parametrize("height,width", [(32, 32), (20, 48), (48, 20), (32, 30), (96, 96)])
def test_crop_params_match_reference(height, width):
    u = uniforms(300, seed=height * 100 + width)
    if (height, width) == (32, 30):
        # in_ratio within ratio: the fallback is the whole image; force it.
        u[:100] = force_fallback(u[:100])
    p = sample_params(u, height, width)
    got = torch.stack([p["top"], p["left"], p["crop_h"], p["crop_w"]], dim=1).tolist()
    want = [list(reference_crop(row, height, width)) for row in u.double().tolist()]
    assert got == want
    if (height, width) in [(20, 48), (48, 20), (32, 30)]:
        # The non-square or forced cases must exercise the fallback somewhere.
        fb_h, fb_w = {(20, 48): (20, 27), (48, 20): (27, 20), (32, 30): (32, 30)}[(height, width)]
        fb = (height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w
        assert list(fb) in got


def test_fallback_branches_with_forced_uniforms():
    u = force_fallback(uniforms(8, seed=3))
    for (height, width), want in {(20, 48): (0, 10, 20, 27), (48, 20): (10, 0, 27, 20),
                                  (32, 30): (0, 0, 32, 30)}.items():
        p = sample_params(u, height, width)
        got = torch.stack([p["top"], p["left"], p["crop_h"], p["crop_w"]], dim=1)
        assert (got == torch.tensor(want)).all(), (height, width)


# ------------------------------------------- apply_params vs torchvision ops

def reference_apply(images, p, out_size):
    """torchvision's tensor functional ops, one image at a time."""
    ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
    names = {0: "brightness", 1: "contrast", 2: "saturation", 3: "hue"}
    outs = []
    for b in range(images.shape[0]):
        img = TF.resized_crop(images[b], int(p["top"][b]), int(p["left"][b]), int(p["crop_h"][b]),
                              int(p["crop_w"][b]), [out_size, out_size], antialias=True)
        for op in p["order"][b].tolist():
            img = ops[op](img, float(p[names[op]][b]))
        if p["grayscale"][b]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p["flip"][b]:
            img = TF.hflip(img)
        outs.append(img)
    return torch.stack(outs)


def fixed_batch_params(batch, height, width, seed):
    """Random params, with orders, flips and grayscale forced to cover every case."""
    p = sample_params(uniforms(batch, seed), height, width)
    perms = list(itertools.permutations(range(4)))
    p["order"] = torch.tensor([perms[(7 * b) % 24] for b in range(batch)])
    p["flip"] = torch.arange(batch) % 2 == 0
    p["grayscale"] = torch.arange(batch) % 3 == 0
    return p


# Tolerance: the only differences are float32 rounding -- the grid_sample coordinate
# round trip (~W * 2**-24 px), summation order of the contrast mean, and an RGB->HSV
# ->RGB round trip that amplifies those by up to ~1/(max-min) for low-saturation
# pixels.  Observed max error is ~1e-6; 1e-4 leaves margin and still catches any
# real mistake (a wrong op, order, crop offset or half-pixel shift is >= 1e-2).
ATOL = 1e-4


@pytest.mark.parametrize("height,width,out_size", [(32, 32, 32), (24, 40, 40), (17, 17, 32)])
def test_apply_params_matches_torchvision(height, width, out_size):
    batch = 48
    g = torch.Generator().manual_seed(height + width)
    images = torch.rand(batch, 3, height, width, generator=g)
    p = fixed_batch_params(batch, height, width, seed=out_size)
    got = apply_params(images, p, out_size)
    want = reference_apply(images, p, out_size)
    assert got.shape == (batch, 3, out_size, out_size)
    assert (got - want).abs().max().item() < ATOL


def test_apply_params_geometry_only_matches_torchvision():
    # Without colour ops the comparison isolates crop/resize/flip.
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    p = sample_params(uniforms(16, seed=6), 32, 32, color=False)
    got = apply_params(images, p, 32, color=False)
    want = reference_apply(images, p, 32)  # factors 1 / hue 0 / no grayscale
    assert (got - want).abs().max().item() < ATOL


# ---------------------------------------------------------- module behaviour

def test_parameters_differ_across_batch():
    p = sample_params(uniforms(64, seed=9), 32, 32)
    crops = set(zip(*(p[k].tolist() for k in ("top", "left", "crop_h", "crop_w"))))
    assert len(crops) > 48
    for k in ("brightness", "contrast", "saturation", "hue"):
        assert p[k].unique().numel() == 64, k
    assert 0 < p["flip"].sum() < 64
    assert len(set(map(tuple, p["order"].tolist()))) > 10


def test_forward_uint8_normalised():
    aug = BatchAugment(32, CIFAR_MEAN, CIFAR_STD)
    assert set(dict(aug.named_buffers())) == {"mean", "std"}
    g = torch.Generator().manual_seed(10)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    u = uniforms(16, seed=11)
    out = aug(images, u)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    want = (apply_params(images.float() / 255, sample_params(u, 32, 32), 32) - mean) / std
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    # Images differ from each other (per-image randomness reaches the pixels).
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 0


def test_forward_float_input_and_ablations():
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    u = uniforms(8, seed=13)
    out = BatchAugment(24, CIFAR_MEAN, CIFAR_STD)(images, u)
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32
    # flip=False, color=False: just the crop, equal to torchvision's resized_crop.
    plain = BatchAugment(32, (0, 0, 0), (1, 1, 1), flip=False, color=False)(images, u)
    p = sample_params(u, 32, 32)
    want = torch.stack([TF.resized_crop(images[b], int(p["top"][b]), int(p["left"][b]),
                                        int(p["crop_h"][b]), int(p["crop_w"][b]), [32, 32],
                                        antialias=True) for b in range(8)])
    assert (plain - want).abs().max().item() < ATOL


def test_deterministic_for_given_uniforms():
    aug = BatchAugment(32, CIFAR_MEAN, CIFAR_STD)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(14))
    u = uniforms(16, seed=15)
    a, b = aug(images, u), aug(images, u.clone())
    assert torch.equal(a, b)
    assert not torch.equal(a, aug(images, uniforms(16, seed=16)))
