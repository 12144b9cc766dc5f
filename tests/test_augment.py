"""Tests for augment.py: the random resized crop, flips, jitter, labels, the paper's uint8 views.
Run: python -m pytest tests/test_augment.py"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from PIL import Image  # torchvision's own dependency

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from augment import augment, pil_jitter, random_resized_crop_boxes  # noqa: E402

MEAN, STD = 67.27297657740893, 84.6606962344396  # normalisation.MEAN, normalisation.STD


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- augmentations

def padded_batch(value=7.0, sizes=((40, 30), (24, 48), (48, 48), (20, 36))):
    """real region filled with `value`, zero padding at bottom/right"""
    sizes = torch.tensor(sizes)
    x = torch.zeros(len(sizes), 1, 48, 48)
    for i, (h, w) in enumerate(sizes.tolist()):
        x[i, 0, :h, :w] = value
    return x, sizes


def test_shapes_dtype_and_constant_value():
    x, sizes = padded_batch(7.0)
    labels = (x[:, 0] > 0).long()
    out, lab = augment(x, sizes, gen(), MEAN, STD, out_size=32, jitter_p=0.0, labels=labels)
    assert out.shape == (4, 1, 32, 32) and out.dtype == torch.float32
    assert lab.shape == (4, 32, 32) and lab.dtype == torch.int64
    # a constant image maps to (v - mean) / std; the padding (0) never shows up
    assert torch.allclose(out, torch.full_like(out, (7.0 - MEAN) / STD), atol=1e-5)
    assert (lab == 1).all()


def test_jitter_on_constant_image_scales_by_brightness():
    x, sizes = padded_batch(100.0)
    out = augment(x, sizes, gen(), MEAN, STD, out_size=16, jitter_p=1.0) * STD + MEAN
    per_sample = out.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1], atol=1e-3)   # contrast leaves a constant alone
    b = per_sample[:, 0] / 100
    assert ((b >= 0.8 - 1e-5) & (b <= 1.2 + 1e-5)).all() and not torch.allclose(b, torch.ones(4))


def test_crop_boxes_inside_extent_and_fallback():
    sizes = torch.tensor([[40, 30]] * 200 + [[4, 200], [200, 4]])
    y0, x0, h, w = random_resized_crop_boxes(sizes, gen())
    H, W = sizes[:, 0].float(), sizes[:, 1].float()
    assert ((y0 >= 0) & (x0 >= 0) & (h >= 1) & (w >= 1) & (y0 + h <= H) & (x0 + w <= W)).all()
    frac, aspect = (h * w / (H * W))[:200], (w / h)[:200]
    assert frac.min() >= 0.06 and frac.max() <= 1 and aspect.min() > 0.6 and aspect.max() < 1.6
    assert frac.std() > 0.1                                           # crops differ per sample
    # no 4 x 200 box can have an aspect ratio within 3/4..4/3 and area >= 8%: centered fallback
    assert (y0[200], x0[200], h[200], w[200]) == (0, 97, 4, 5)
    assert (y0[201], x0[201], h[201], w[201]) == (97, 0, 5, 4)


def test_fallback_samples_only_its_box():
    x = torch.zeros(1, 1, 8, 256)
    x[0, 0, :4, :200] = torch.arange(1, 201).float()                 # value = column + 1
    out = augment(x, torch.tensor([[4, 200]]), gen(), MEAN, STD, out_size=8, jitter_p=0.0, flip_p=0.0)
    v = out * STD + MEAN
    assert v.min() >= 98 - 1e-3 and v.max() <= 102 + 1e-3            # columns 97..101 only


def test_crops_differ_per_sample_and_seed_determinism():
    x = torch.linspace(1, 100, 48 * 48).view(1, 1, 48, 48).repeat(4, 1, 1, 1)
    sizes = torch.tensor([[48, 48]] * 4)
    a = augment(x, sizes, gen(0), MEAN, STD, out_size=16)
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[2], a[3])
    assert torch.equal(a, augment(x, sizes, gen(0), MEAN, STD, out_size=16))
    assert not torch.allclose(a, augment(x, sizes, gen(1), MEAN, STD, out_size=16))


def test_flips():
    x = torch.arange(48.0).view(1, 1, 1, 48).expand(3, 1, 48, 48) + 1    # increases to the right
    sizes = torch.tensor([[48, 48], [30, 40], [48, 20]])
    plain = augment(x, sizes, gen(3), MEAN, STD, out_size=16, flip_p=0.0)
    flipped = augment(x, sizes, gen(3), MEAN, STD, out_size=16, flip_p=1.0)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-6)          # same draws, only the flip differs
    assert (plain.diff(dim=-1) >= 0).all() and (flipped.diff(dim=-1) <= 0).all()


def test_labels_follow_images():
    # vertical stripes, one label level apart, image = 100 + 50 * label: nearest label and bilinear
    # image agree to within half a level everywhere, also under per-sample flips and crops
    col = torch.clamp(torch.arange(48) // 8, max=5)
    labels = col.view(1, 1, 48).expand(8, 48, 48).clone()
    images = (100 + 50 * labels).float()[:, None]
    sizes = torch.tensor([[48, 48], [40, 44], [30, 48], [48, 24]] * 2)
    out, lab = augment(images, sizes, gen(5), MEAN, STD, out_size=32, jitter_p=0.0, labels=labels)
    diff = (out[:, 0] * STD + MEAN - (100 + 50 * lab)).abs()
    assert diff.max() <= 25 + 1e-3
    assert (diff < 1e-3).float().mean() > 0.8


# ---------------------------------------------------------------- the paper's uint8 views (--paper-inputs)

def uint8_batch(seed=0):
    """smooth images with noise, uint8 values, zero padded at bottom/right: (16, 1, 96, 80), (16, 2)"""
    g = gen(seed)
    sizes = torch.tensor([[96, 80], [60, 70], [96, 40], [30, 80]] * 4)
    x = torch.zeros(len(sizes), 1, 96, 80)
    for i, (h, w) in enumerate(sizes.tolist()):
        smooth = nn.functional.interpolate(torch.rand(1, 1, 6, 6, generator=g), size=(h, w), mode="bilinear")
        smooth = smooth[0, 0]
        x[i, 0, :h, :w] = (255 * smooth + 20 * torch.randn(h, w, generator=g)).round().clamp(0, 255)
    return x, sizes


@pytest.mark.parametrize("out_size", [32, 128])  # crops mostly shrunk (antialiased), mostly enlarged
def test_paper_uint8_crops_are_pils(out_size):
    x, sizes = uint8_batch()
    y0, x0, h, w = (v.int().tolist() for v in random_resized_crop_boxes(sizes, gen(1)))   # augment's first draws
    ours = augment(x, sizes, gen(1), 0.0, 1.0, out_size=out_size, jitter_p=0, flip_p=0, paper_uint8=True)
    for i, (H, W) in enumerate(sizes.tolist()):
        pil = Image.fromarray(x[i, 0, :H, :W].numpy().astype(np.uint8))
        pil = pil.crop((x0[i], y0[i], x0[i] + w[i], y0[i] + h[i]))
        # torchvision's resized_crop, BICUBIC; as two calls, so that each runs one pass in Pillow's old order
        pil = pil.resize((out_size, h[i]), Image.BICUBIC).resize((out_size, out_size), Image.BICUBIC)
        assert torch.equal(ours[i, 0], torch.tensor(np.asarray(pil), dtype=torch.float32)), i


@pytest.mark.parametrize("brightness_first", [True, False])
def test_paper_uint8_jitter_is_torchvisions_on_pil(brightness_first):
    x = uint8_batch()[0][:, :, :32, :32]
    b, c = torch.linspace(0.8, 1.2, len(x)), torch.linspace(1.2, 0.8, len(x))
    ours = pil_jitter(x, b, c, torch.full((len(x),), brightness_first))
    for i in range(len(x)):
        pil = Image.fromarray(x[i, 0].numpy().astype(np.uint8))
        if brightness_first:
            pil = TF.adjust_contrast(TF.adjust_brightness(pil, b[i].item()), c[i].item())
        else:
            pil = TF.adjust_brightness(TF.adjust_contrast(pil, c[i].item()), b[i].item())
        assert torch.equal(ours[i, 0], torch.tensor(np.asarray(pil), dtype=torch.float32)), i


def test_paper_uint8_views_normalise_uint8_values():
    x, sizes = uint8_batch()
    mean, std = 255 * MEAN, 255 * STD  # the paper's Normalize(MEAN, STD) after ToTensor's / 255
    views = augment(x, sizes, gen(2), mean, std, out_size=32, paper_uint8=True)
    values = views * std + mean
    assert torch.allclose(values, values.round(), atol=1e-2)          # whole grey levels ...
    assert values.min() > -0.01 and values.max() < 255.01              # ... of uint8 images
    assert torch.equal(views, augment(x, sizes, gen(2), mean, std, out_size=32, paper_uint8=True))
    with pytest.raises(ValueError, match="no labels"):
        augment(x, sizes, gen(2), mean, std, out_size=32, paper_uint8=True, labels=x[:, 0].long())
