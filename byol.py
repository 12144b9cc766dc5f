"""BYOL as the paper configured it (solo-learn's): the method, its LARS optimiser, its on-device views.

Online and target networks, the loss, the cosine tau schedule, LARS, and the augmentations,
batched on the training device:

    model = BYOL(resnet50(in_chans=1))                  # paper sizes: 2048 -> 4096 -> 256 -> 8192 -> 256
    optimizer = LARS(lars_param_groups(model, 1e-5), lr=lr)
    v1 = augment(x, sizes, gen, acdc.MEAN, acdc.STD)             # (B, 1, H, W) raw -> (B, 1, 224, 224)
    v2 = augment(x, sizes, gen, acdc.MEAN, acdc.STD)
    loss, z1 = model(v1, v2); loss.backward(); optimizer.step()
    model.update_target(tau_at(step, total_steps))               # after the optimizer step

Load initial weights into the backbone before building BYOL: the target starts as a copy of it.
Tests: python -m pytest tests/test_byol.py
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# loss and schedule: pure functions

def byol_loss(p, z):
    """(B, D) online predictions, (B, D) target projections -> mean over the batch of 2 - 2 cos(p, z)"""
    return 2 - 2 * F.cosine_similarity(p, z, dim=-1).mean()


def tau_at(step, total_steps, base=0.99, final=1.0):
    """target momentum, cosine from base to final over training (paper: 0.99 -> 1.0)"""
    return final - (final - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


# -----------------------------------------------------------------------------
# the networks

def mlp(in_dim, hidden_dim, out_dim):
    """projector / predictor head of solo-learn's BYOL; state-dict keys 0.*, 1.*, 3.*"""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class BYOL(nn.Module):
    def __init__(self, backbone, proj_hidden=4096, proj_dim=256, pred_hidden=8192, concat_views=False):
        # paper (solo-learn byol_acdc.yaml): proj_hidden_dim 4096, proj_output_dim 256, pred_hidden_dim 8192
        super().__init__()
        # concat_views=False forwards the two views one after the other, as solo-learn did, so every
        # BatchNorm normalises each view with its own batch statistics. Concatenating them into one
        # batch of 2B is a little faster on a GPU (about 7%, as reported for this project) but mixes the
        # two views' statistics, which is not what the paper trained; off by default.
        self.concat_views = concat_views
        self.backbone = backbone                                        # online
        self.projector = mlp(backbone.num_features, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, pred_hidden, proj_dim)
        self.target_backbone = copy.deepcopy(self.backbone)             # target = copy of the online net,
        self.target_projector = copy.deepcopy(self.projector)           # moved only by update_target
        for p in self._target_params():
            p.requires_grad = False

    def _online_params(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def _target_params(self):
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def _online(self, x):
        return self.projector(self.backbone(x))                # (B, 1, H, W) -> (B, 2048) -> (B, 256)

    def _target(self, x):
        return self.target_projector(self.target_backbone(x))  # (B, 1, H, W) -> (B, 2048) -> (B, 256)

    def _both_views(self, net, a, b):
        if self.concat_views:                                  # one batch of 2B: shared BN statistics
            return net(torch.cat([a, b])).chunk(2)
        return net(a), net(b)                                  # BN statistics per view (solo-learn)

    def forward(self, view1, view2):
        """two (B, 1, H, W) views of the same images
        -> (scalar loss, (B, 256) online projection of view1, detached)"""
        z1, z2 = self._both_views(self._online, view1, view2)         # (B, 256) each
        p1, p2 = self._both_views(self.predictor, z1, z2)             # (B, 256) each
        with torch.no_grad():
            z1_target, z2_target = self._both_views(self._target, view1, view2)   # (B, 256) each
        # symmetric: each view's prediction regresses the target's projection of the other view
        loss = byol_loss(p1, z2_target) + byol_loss(p2, z1_target)
        return loss, z1.detach()                                      # z1: for watching collapse (its std)

    @torch.no_grad()
    def update_target(self, tau):
        """target = tau * target + (1 - tau) * online, over parameters.
        The target's BatchNorm buffers are not averaged: as in solo-learn the target runs in train mode,
        so its own forward passes keep its running statistics."""
        online, target = self._online_params(), self._target_params()
        torch._foreach_mul_(target, tau)
        torch._foreach_add_(target, online, alpha=1 - tau)


# -----------------------------------------------------------------------------
# LARS (solo-learn's, from Lightning Bolts), with the paper's settings as defaults

class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling. For each adapted tensor w with gradient g:

        q = eta * ||w|| / (||g|| + wd * ||w|| + eps)        # trust ratio
        q = min(q / lr, 1)                                   # clip_lr (LARC): never step faster than lr
        d = q * (g + wd * w)
        v = momentum * v + d ;  w = w - lr * v

    A tensor is excluded (d = g: no adaptation, no weight decay) when its group has lars_exclude=True or,
    with exclude_bias_n_norm, when it is 1-D (biases, norm weights); also, as in solo-learn, for a step
    where ||w|| or ||g|| is zero. Paper: momentum 0.9, eta 0.02, clip_lr, exclude_bias_n_norm, wd 1e-5.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-5, eta=0.02, clip_lr=True,
                 exclude_bias_n_norm=True, eps=1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr,
                        exclude_bias_n_norm=exclude_bias_n_norm, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)
        self._adapt = {}  # per group of tensors: which ones LARS adapts

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            lr, wd = group["lr"], group["weight_decay"]
            # one trust ratio per tensor, computed on the device for all tensors at once (no host syncs)
            key = tuple(map(id, params))
            # built once: a tensor made from a list each step would wait for the GPU
            if key not in self._adapt:
                excluded = [group["lars_exclude"] or (group["exclude_bias_n_norm"] and p.ndim <= 1)
                            for p in params]
                self._adapt[key] = ~torch.tensor(excluded, device=params[0].device)
            w_norm = torch.stack(torch._foreach_norm(params))              # (N,)
            g_norm = torch.stack(torch._foreach_norm(grads))               # (N,)
            adapt = self._adapt[key] & (w_norm > 0) & (g_norm > 0)
            q = group["eta"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            if group["clip_lr"]:
                q = torch.clamp(q / lr, max=1.0)
            q = torch.where(adapt, q, 1.0)                                 # excluded: q = 1 ...
            decay = torch.where(adapt, wd, 0.0)                            # ... and no weight decay
            d = torch._foreach_add(grads, torch._foreach_mul(params, list(decay.unbind())))
            torch._foreach_mul_(d, list(q.unbind()))                       # d = q * (g + wd * w)
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:                         # zeros: first v = d, as solo-learn
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)                                   # v = momentum * v + d
            torch._foreach_add_(params, bufs, alpha=-lr)                   # w = w - lr * v
        return loss


def lars_param_groups(model, weight_decay):
    """weights (adapted, decayed) and 1-D tensors (biases, norm weights: lars_exclude); the frozen
    target is left out"""
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": weights, "weight_decay": weight_decay},
            {"params": others, "weight_decay": 0.0, "lars_exclude": True}]


# -----------------------------------------------------------------------------
# augmentations, batched on the training device, random per sample

def random_crop_boxes(sizes, generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
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
    std 255 times the paper's Normalize(67.27, 84.66), which ran after ToTensor's / 255. No labels."""
    B, _, H, W = images.shape
    dev = images.device
    y0, x0, ch, cw = random_crop_boxes(sizes, generator, scale, ratio)           # (B,) each, pixels
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

    # sampling grid: output pixel centers t in (0, 1) map to source pixels y0 + t * ch - 0.5
    # (pixel k's center at k), the half-pixel convention of cv2.resize / interpolate(align_corners=False)
    t = (torch.arange(out_size, device=dev, dtype=torch.float32) + 0.5) / out_size   # (S,)
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
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

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
    # labels: the same grid (same boxes, same flips), nearest neighbour
    y = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="border",
                      align_corners=False)
    return x, y[:, 0].round().long()                                             # (B, S, S)
