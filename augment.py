"""The training views, batched on the device: random resized crop, flip, brightness/contrast jitter.

Both training scripts augment here, after the loader handed over raw slices (the paper augmented in
CPU workers): every draw per sample from one generator on the device, so a seed fixes the views.

    v = augment(x, sizes, gen, mean, std)                           # (B, 1, H, W) raw -> (B, 1, 224, 224)
    v, y = augment(x, sizes, gen, mean, std, labels=masks)          # fine-tuning: masks cropped alike
    v = augment(x8, sizes, gen, *normalisation.paper_scale(), paper_uint8=True)   # --paper-inputs

mean and std come from normalisation.py; this file only applies them. Tests: tests/test_augment.py
"""
import math

import torch
import torch.nn.functional as F


def random_resized_crop_boxes(sizes, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision's RandomResizedCrop.get_params for a batch: (B, 2) true (h, w) -> y0, x0, h, w, each (B,)
    float holding whole pixels. Draws `attempts` candidate boxes per sample and keeps the first that fits;
    if none fits, a center crop at the clamped aspect ratio. Always the same number of draws, so the
    random stream does not depend on the data."""
    h, w = sizes.to(generator.device).float().unbind(1)                            # (B,) each
    u = torch.rand(len(h), attempts, 4, generator=generator, device=generator.device)
    area = (h * w)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[..., 0])       # (B, attempts)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])                      # log-uniform w/h
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw > 0) & (cw <= w[:, None]) & (ch > 0) & (ch <= h[:, None])           # (B, attempts)
    first = fits.float().argmax(1, keepdim=True)                                    # first fitting attempt
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    uy, ux = u[..., 2].gather(1, first)[:, 0], u[..., 3].gather(1, first)[:, 0]
    y0 = torch.minimum(torch.floor(uy * (h - ch + 1)), h - ch)                      # uniform offset
    x0 = torch.minimum(torch.floor(ux * (w - cw + 1)), w - cw)
    # fallback (torchvision's): whole image, cut to the nearest allowed aspect ratio, centered
    in_ratio = w / h
    fw = torch.where(in_ratio > ratio[1], torch.round(h * ratio[1]), w)
    fh = torch.where(in_ratio < ratio[0], torch.round(w / ratio[0]), h)
    ok = fits.any(1)
    y0 = torch.where(ok, y0, torch.div(h - fh, 2, rounding_mode="floor"))
    x0 = torch.where(ok, x0, torch.div(w - fw, 2, rounding_mode="floor"))
    return y0, x0, torch.where(ok, ch, fh), torch.where(ok, cw, fw)


def random_resized_crop(images, boxes, flip, out_size, mode):
    """the crop itself: each sample's box (y0, x0, h, w, each (B,) from random_resized_crop_boxes) cut
    out of (B, C, H, W), resized to (B, C, out_size, out_size) by `mode` interpolation, mirrored where
    `flip` (B,) is set"""
    B, _, H, W = images.shape
    y0, x0, ch, cw = boxes
    # sampling grid: output pixel centers t in (0, 1) map to source pixels y0 + t * ch - 0.5
    # (pixel k's center at k), the half-pixel convention of cv2.resize / interpolate(align_corners=False)
    t = (torch.arange(out_size, device=images.device, dtype=torch.float32) + 0.5) / out_size   # (S,)
    tx = torch.where(flip[:, None], 1 - t, t)                                    # (B, S), mirrored if flipped
    xs = x0[:, None] + tx * cw[:, None] - 0.5                                    # (B, S) source x, pixels
    ys = y0[:, None] + t * ch[:, None] - 0.5                                     # (B, S) source y, pixels
    # clamp to the box's outer pixel centers: the edge repeats, as cv2.resize of the cut-out crop does,
    # so neither the zero padding beyond the true extent nor pixels outside the box leak in
    xs = torch.clamp(xs, x0[:, None], (x0 + cw - 1)[:, None])
    ys = torch.clamp(ys, y0[:, None], (y0 + ch - 1)[:, None])
    # grid_sample's coordinates (align_corners=False) run from -1 to 1 over the PADDED tensor, W x H
    gx = (2 * xs + 1) / W - 1
    gy = (2 * ys + 1) / H - 1
    S = out_size
    # (B, S, S, 2) as (x, y)
    grid = torch.stack([gx[:, None, :].expand(B, S, S), gy[:, :, None].expand(B, S, S)], dim=-1)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def _uniform(n, lo, hi, generator):
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device)


# the paper's pretraining views were made by torchvision on uint8 PIL images: the two functions below
# compute what PIL computed, batched on the device

def pil_bicubic_weights(start, length, in_size, out_size):
    """PIL's resampling weights for 8-bit images, crops along one axis: (B,) crop start and length in
    whole pixels -> (B, out_size, in_size) float64 integers, in PIL's fixed point (units of 2**-22).
    Bicubic with a = -0.5, antialiased (a crop larger than out_size widens the kernel by the ratio), only
    the crop's pixels, normalised per output pixel: precompute_coeffs and normalize_coeffs_8bpc of
    PIL's resize of the cut-out crop, which torchvision's RandomResizedCrop calls. float64 holds PIL's
    integer sums exactly, so the views equal PIL's bit for bit."""
    start, length = start.double().view(-1, 1, 1), length.double().view(-1, 1, 1)
    scale = length / out_size                                                          # (B, 1, 1)
    out = torch.arange(out_size, device=start.device, dtype=torch.float64).view(1, -1, 1)
    src = torch.arange(in_size, device=start.device, dtype=torch.float64).view(1, 1, -1) + 0.5  # centers
    t = ((src - start - (out + 0.5) * scale) / scale.clamp(min=1)).abs()               # (B, out, in)
    w = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1,                                # PIL's bicubic_filter
                    torch.where(t < 2, ((2.5 - 0.5 * t) * t - 4) * t + 2, 0))
    w = w * ((src > start) & (src < start + length))
    w = w / w.sum(-1, keepdim=True) * 2 ** 22
    return torch.where(w < 0, w - 0.5, w + 0.5).trunc()                                # C's (int) rounding


def pil_jitter(x, b, c, brightness_first):
    """torchvision's ColorJitter (brightness b, contrast c, (B,) each) on uint8 PIL images, (B, 1, S, S)
    in 0..255: PIL's ImageEnhance blends with black (x * b) and with the image's mean grey, rounded
    (m + c * (x - m)); each result is truncated to an integer and clipped to 0..255. ColorJitter
    applies them in a random order, which matters once values clip"""
    b, c = b.view(-1, 1, 1, 1), c.view(-1, 1, 1, 1)

    def brightness(v):
        return (b * v).clamp(0, 255).floor()

    def contrast(v):
        m = (v.mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()
        return (m + c * (v - m)).clamp(0, 255).floor()
    return torch.where(brightness_first.view(-1, 1, 1, 1), contrast(brightness(x)), brightness(contrast(x)))


@torch.no_grad()
def augment(images, sizes, generator, mean, std, out_size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
            flip_p=0.5, jitter_p=0.8, brightness=0.2, contrast=0.2, labels=None, paper_uint8=False):
    """(B, 1, H, W) raw intensities, zero padded at bottom/right, (B, 2) true (h, w)
    -> (B, 1, out_size, out_size) float32 normalised [, (B, out_size, out_size) int64 labels].

    Random resized crop (inside the true h x w) -> horizontal flip -> brightness/contrast jitter
    -> (x - mean) / std.
    The jitter follows torchvision's ColorJitter on raw intensities; the paper's albumentations
    RandomBrightnessContrast on uint16 images added up to 20% of 65535, blanking many views: not copied.
    Defaults are the paper's pretraining views (augmentations/acdc.yaml: crop 224, scale 0.08-1,
    flip 0.5, jitter p 0.8 with brightness 0.2 and contrast 0.2; blur and solarization off).
    Its saturation 0.2, hue 0.1 and grayscale p 0.2 change nothing on a 1-channel image: left out.
    All draws come from `generator` (on images.device): deterministic per seed, and per rank when
    each rank seeds its own.

    paper_uint8=True makes the paper's pretraining views exactly (train_pretrain.py --paper-inputs):
    images hold uint8 values (slices.UnlabelledSlices(paper_inputs=True)), the crops are resized as PIL
    did (pil_bicubic_weights; each pass rounded and clipped to 0..255), the jitter is PIL's
    (pil_jitter), and the views stay uint8 values until (x - mean) / std, with the caller's mean and
    std normalisation.paper_scale(): the paper's Normalize(67.27, 84.66) after ToTensor's / 255. No labels."""
    B, _, H, W = images.shape
    dev = images.device
    y0, x0, ch, cw = random_resized_crop_boxes(sizes, generator, scale, ratio)           # (B,) each, pixels
    flip = torch.rand(B, generator=generator, device=dev) < flip_p
    jitter = torch.rand(B, generator=generator, device=dev) < jitter_p
    b = _uniform(B, max(0.0, 1 - brightness), 1 + brightness, generator)       # ColorJitter's ranges
    c = _uniform(B, max(0.0, 1 - contrast), 1 + contrast, generator)
    if paper_uint8:
        if labels is not None:
            raise ValueError("paper_uint8 makes the paper's pretraining views: no labels")
        brightness_first = torch.rand(B, generator=generator, device=dev) < 0.5   # ColorJitter's order
        wy = pil_bicubic_weights(y0, ch, H, out_size)                              # (B, S, H)
        wx = pil_bicubic_weights(x0, cw, W, out_size)                              # (B, S, W)
        # the horizontal pass, then the vertical one, each rounded and clipped to uint8, as Pillow up to
        # version 12 resized (13 runs the vertical pass first when it shrinks the height much more)
        half, one = 2 ** 21, 2 ** 22
        x = ((images[:, 0].double() @ wx.transpose(1, 2) + half) // one).clamp(0, 255)  # (B, H, S)
        x = ((wy @ x + half) // one).clamp(0, 255).float()[:, None]                # (B, 1, S, S)
        x = torch.where(jitter.view(B, 1, 1, 1), pil_jitter(x, b, c, brightness_first), x)
        x = torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)                      # the paper flipped last
        return (x - mean) / std

    x = random_resized_crop(images.float(), (y0, x0, ch, cw), flip, out_size, "bilinear")  # (B, 1, S, S)

    # brightness then contrast, torchvision's formulas on raw intensities: x * b, then blend with the
    # image mean, c * x + (1 - c) * mean(x), then clamp at 0 (torchvision clamps floats to [0, 1]; raw
    # MRI has no upper bound). Both are linear and b > 0, so their order does not change the result.
    b = b.view(B, 1, 1, 1)
    c = c.view(B, 1, 1, 1)
    xj = b * x
    xj = (c * xj + (1 - c) * xj.mean(dim=(1, 2, 3), keepdim=True)).clamp(min=0)
    x = torch.where(jitter.view(B, 1, 1, 1), xj, x)
    x = (x - mean) / std                                                         # (B, 1, S, S)
    if labels is None:
        return x
    # labels: the same boxes and flips, nearest neighbour
    y = random_resized_crop(labels[:, None].float(), (y0, x0, ch, cw), flip, out_size, "nearest")
    return x, y[:, 0].round().long()                                             # (B, S, S)
