"""Applying a trained U-Net to whole slices or volumes by the paper's evaluation protocol.

    model, norm = load_model("RUN/best.pt", device)              # eval mode, on the device
    labels = predict_volume(model, volume, device, norm)         # (X, Y, Z[, T]) raw -> the same shape, uint8
    labels = predict_volume(model, volume, device, norm, tta=True)  # + flipped copies, probabilities averaged

Each slice is zero-padded at the bottom and right to a multiple of 32 (the encoder's stride) and
to at least 224 pixels (the paper's training crop), normalised, segmented, and its logits cropped
back. Validation in train_segment.py, evaluate.py and predict.py all predict through here, with the
(mean, std) that normalisation.py chooses. Also here: the geometry a model expects (the spacing range
it was trained on, checked by geometry_warnings) and resampling to it (--resample; the paper did none).
"""
import contextlib
import math
import os

import torch
import torch.nn.functional as F

import acdc
import checkpoints
import normalisation
from training import number


def pad_to(x, multiple=32, min_size=0):
    """(..., h, w) -> ((..., H, W) zero-padded at the bottom and right, (h, w)), where H and W are
    the smallest multiples of `multiple` that are >= the image and >= min_size. The image stays
    at the top-left corner, as in the paper's evaluation."""
    h, w = x.shape[-2:]
    H = math.ceil(max(h, min_size) / multiple) * multiple
    W = math.ceil(max(w, min_size) / multiple) * multiple
    return F.pad(x, (0, W - w, 0, H - h)), (h, w)


def crop_to(logits, hw):
    """undo pad_to: (..., H, W) -> (..., h, w)"""
    h, w = hw
    return logits[..., :h, :w]


def load_model(source, device, trust=False, flag=None, name=None):
    """a segmentation checkpoint (a path or the dict read from it) -> (UNet in eval mode on `device`,
    channels_last, (mean, std, where they come from) of its input normalisation), the model carrying .mean,
    .std and .train_spacing (train_spacing's pair). flag and name: how messages name the file ('--checkpoint FILE')"""
    if not isinstance(source, dict) and not os.path.exists(source):  # every published name is a backbone
        raise checkpoints.CheckpointError(
            f"{checkpoints.describe(source, flag, name)}: no such file, and no segmentation model is published "
            f"(the paper released backbones): give RUN/best.pt of train_segment.py fine-tuned on ACDC, or a "
            f"fine-tuned checkpoint file of the paper's code")
    ckpt = checkpoints.read_checkpoint(source, trust, flag, name)
    model, norm = checkpoints.load_unet(ckpt, trust=trust, flag=flag, name=checkpoints.describe(source, None, name))
    model = model.to(device, memory_format=torch.channels_last).eval()
    model.mean, model.std, model.train_spacing = *norm[:2], train_spacing(ckpt)
    return model, norm


def logits_of(model, images, norm, autocast, min_size):
    """(B, H, W) raw intensities -> (B, C, H, W) logits, by the protocol the paper evaluated with:
    zero-padded at the bottom/right to a multiple of 32 and at least min_size (224, its training
    crop), then normalised, logits cropped back. (The paper zero-padded the raw slice to 224, then
    normalised, then padded to the multiple of 32 with zeros of the normalised input: README,
    Faithfulness, Evaluation padding.)"""
    x, size = pad_to(images.float()[:, None], multiple=32, min_size=min_size)  # (B, 1, H', W')
    x = normalisation.normalize(x, *norm[:2])
    x = x.contiguous(memory_format=torch.channels_last)
    with autocast():
        logits = model(x)  # (B, C, H', W')
    return crop_to(logits, size)  # (B, C, H, W)


@torch.inference_mode()
def predict_probabilities(model, images, norm=normalisation.PUBLISHED, autocast=contextlib.nullcontext,
                          min_size=224, tta=False):
    """(B, H, W) raw intensities -> (B, C, H, W) float32 softmax probabilities. tta: the mean of the
    probabilities of the slice and of its horizontally flipped copy (Y, the last axis, mirrored;
    flipped before padding, so the padding stays at the bottom and right, and flipped back)"""
    probs = logits_of(model, images, norm, autocast, min_size).float().softmax(1)
    if tta:
        flipped = logits_of(model, images.flip(-1), norm, autocast, min_size).float().softmax(1)
        probs = (probs + flipped.flip(-1)) / 2
    return probs


@torch.inference_mode()
def predict_slices(model, images, norm=normalisation.PUBLISHED, autocast=contextlib.nullcontext, min_size=224,
                   tta=False):
    """(B, H, W) raw intensities -> (B, H, W) int64 labels (see logits_of for the protocol; tta:
    predict_probabilities' flips). norm: (mean, std[, where they come from])"""
    if tta:
        return predict_probabilities(model, images, norm, autocast, min_size, tta=True).argmax(1)
    return logits_of(model, images, norm, autocast, min_size).argmax(1)  # (B, H, W)


def resize(x, size):
    """(B, C, h, w) -> (B, C, *size), bilinear; antialiased when shrinking, so fine detail does not alias"""
    return F.interpolate(x, size=tuple(size), mode="bilinear", antialias=any(n < o for n, o in zip(size, x.shape[-2:])))


@torch.inference_mode()
def predict_resampled(model, images, size, norm, autocast, min_size, tta):
    """(B, H, W) raw intensities -> (B, H, W) labels, the model applied at `size` pixels: the slices resampled
    to it, the softmax probabilities resampled back before the argmax (as nnU-Net: no blocky labels)"""
    probs = predict_probabilities(model, resize(images.float()[:, None], size)[:, 0], norm, autocast, min_size, tta)
    return resize(probs, images.shape[-2:]).argmax(1)


def predict_volume(model, volume, device, norm=normalisation.PUBLISHED, autocast=contextlib.nullcontext,
                   batch_size=32, min_size=224, tta=False, spacing=None, to=None):
    """(X, Y, Z) image volume or (X, Y, Z, T) cine (numpy or tensor, nibabel's axis order) -> labels of
    the same shape, uint8, on `device`, predicted slice by slice ([:, :, z(, t)], as acdc.py hands
    slices to the model) in batches. The model must already be on `device` and in eval mode. spacing, to:
    the scan's pixel size in mm and the one the model sees (model_spacing), to resample each slice in-plane."""
    volume = torch.as_tensor(volume)
    shape = volume.shape
    slices = volume.reshape(*shape[:2], -1).to(device).permute(2, 0, 1)  # (Z * T, X, Y)
    size = [max(1, round(n * s / t)) for n, s, t in zip(shape[:2], spacing, to)] if to else list(shape[:2])
    labels = [predict_slices(model, slices[i:i + batch_size], norm, autocast, min_size, tta) if size == list(shape[:2])
              else predict_resampled(model, slices[i:i + batch_size], size, norm, autocast, min_size, tta)
              for i in range(0, len(slices), batch_size)]
    return torch.cat(labels).to(torch.uint8).permute(1, 2, 0).reshape(shape)  # (X, Y, Z[, T])


def checked(path, volume, norm):
    """-> the acdc.Volume if its values stay finite once normalised (a tiny --norm std can overflow float32)"""
    x = torch.tensor([volume.data.min(initial=0), volume.data.max(initial=0)], dtype=torch.float32)  # 0: padding
    if not torch.isfinite(normalisation.normalize(x, *norm[:2])).all():
        raise acdc.DatasetError(f"{path}: values overflow float32 once normalised as (x - {norm[0]:g}) / {norm[1]:g}")
    return volume


# -----------------------------------------------------------------------------
# the geometry the model was trained on. The paper did no resampling: with --resample off a scan far from
# it is segmented as it is, with a warning; auto (predict.py's default) resamples it to the nearest end

# ACDC's in-plane pixel size and distance between slices, mm: the training range of the paper's
# checkpoints and of checkpoints written before best.pt stored its own
ACDC_SPACING = {"in_plane": (1.37, 1.68), "between_slices": (5.0, 10.0)}
TOLERANCE = 1.25  # "far outside": more than 25 % below the smallest or above the largest pixel trained on


def train_spacing(ckpt):
    """a loaded checkpoint -> ({"in_plane": (lo, hi), "between_slices": (lo, hi)} in mm, source in
    words): the "train_spacing" that train_segment.py stores in best.pt, else ACDC's"""
    stored = ckpt.get("train_spacing") if ckpt.get("kind") == "segmentation" else None
    if isinstance(stored, dict) and all(len(stored.get(k) or ()) == 2 for k in ACDC_SPACING):
        return {k: tuple(float(v) for v in stored[k]) for k in ACDC_SPACING}, "stored in the checkpoint"
    return dict(ACDC_SPACING), "ACDC's range, as the checkpoint stores none"


def geometry_warnings(spacing, trained, to=None):
    """(x, y, z) spacing in mm of a scan, train_spacing's ranges, model_spacing -> [warning]: the slices must
    run along the third axis (the largest spacing in short-axis stacks), and the pixel size must be near the
    training data's (the model sees pixels, not mm), else resampled to it, which one line says"""
    found = []
    if spacing[2] < max(spacing[:2]):
        found.append(f"spacing {fmt(spacing)} mm: the third axis is not the one with the largest spacing, "
                     f"so the slices the model sees ([:, :, z]) may not be short-axis slices")
    lo, hi = trained["in_plane"]
    if to is not None and tuple(to[:2]) != tuple(spacing[:2]):
        found.append(f"resampled from {fmt(spacing[:2])} mm to {fmt(to[:2])} mm")
    elif far_outside(spacing, trained):
        found.append(f"in-plane spacing {fmt(spacing[:2])} mm, far from the {lo:g}-{hi:g} mm the model was "
                     f"trained on: structures look larger or smaller than it learned (--resample off)")
    return found


def far_outside(spacing, trained):
    """whether a pixel side lies more than TOLERANCE outside the in-plane range the model was trained on"""
    lo, hi = trained["in_plane"]
    return any(not lo / TOLERANCE <= s <= hi * TOLERANCE for s in spacing[:2])


def model_spacing(spacing, trained, resample="auto"):
    """(x, y, z) spacing of a scan in mm, train_spacing's ranges, --resample -> the (x, y, z) spacing the model
    sees: with "on", or "auto" when the scan is far_outside the range, each pixel side clamped into it (the
    nearest end; nnU-Net resamples every scan to its training spacing); the scan's own otherwise"""
    if resample == "off" or resample == "auto" and not far_outside(spacing, trained):
        return tuple(spacing[:3])
    lo, hi = trained["in_plane"]
    return tuple(min(max(s, lo), hi) for s in spacing[:2]) + tuple(spacing[2:3])


def fmt(values):
    return " x ".join(f"{v:.3g}" for v in values)


def add_args(p, resample="off"):
    """the flags of how evaluate.py and predict.py apply a model: --batch-size, --min-size, --norm, --tta,
    --workers, --resample (its default given)"""
    p.add_argument("--batch-size", type=number(int, 1), default=32, help="slices per forward pass")
    p.add_argument("--min-size", type=number(int, 0), default=224,
                   help="pad slices to at least this size (the paper: 224, its training crop); "
                        "0: to a multiple of 32 only")
    normalisation.add_inference_flag(p)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the softmax probabilities of each slice and of its "
                        "horizontally flipped copy (twice the compute)")
    p.add_argument("--workers", type=number(int, 0), default=2,
                   help="processes reading the next volumes while the model runs")
    p.add_argument("--resample", choices=["auto", "on", "off"], default=resample,
                   help="on: resample each slice in-plane to the training range of pixel sizes; auto: when "
                        "more than 25 %% outside it; off: never (the paper)")
