"""Applying a trained U-Net to whole slices or volumes by the paper's evaluation protocol.

    model, norm = load_model("RUN/best.pt", device)              # eval mode, on the device
    labels = predict_volume(model, volume, device, norm)         # (X, Y, Z) raw -> (X, Y, Z) uint8 labels

Each slice is zero-padded at the bottom and right to a multiple of 32 (the encoder's stride) and
to at least 224 pixels (the paper's training crop), normalised, segmented, and its logits cropped
back. Validation in train_segment.py, evaluate.py and predict.py all predict through here.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

import acdc
import checkpoints


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


def load_model(source, device, trust=False, flag=None):
    """a segmentation checkpoint -> (UNet in eval mode on `device`, channels_last, (mean, std, where
    they come from) of its input normalisation); flag: how messages name the file ('--checkpoint FILE')"""
    model, norm = checkpoints.load_unet(source, trust=trust, flag=flag)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, norm


@torch.inference_mode()
def predict_slices(model, images, norm=(acdc.MEAN, acdc.STD), autocast=contextlib.nullcontext, min_size=224):
    """(B, H, W) raw intensities -> (B, H, W) int64 labels, by the protocol the paper evaluated with:
    zero-padded at the bottom/right to a multiple of 32 and at least min_size (224, its training
    crop), then normalised (the paper padded the raw image first), logits cropped back"""
    x, size = pad_to(images.float()[:, None], multiple=32, min_size=min_size)  # (B, 1, H', W')
    x = acdc.normalize(x, *norm)
    x = x.contiguous(memory_format=torch.channels_last)
    with autocast():
        logits = model(x)  # (B, C, H', W')
    return crop_to(logits, size).argmax(1)  # (B, H, W)


def predict_volume(model, volume, device, norm=(acdc.MEAN, acdc.STD), autocast=contextlib.nullcontext,
                   batch_size=32, min_size=224):
    """(X, Y, Z) image volume (numpy or tensor, nibabel's axis order) -> (X, Y, Z) uint8 labels on
    `device`, predicted slice by slice ([:, :, z], as acdc.py hands slices to the model) in batches.
    The model must already be on `device` and in eval mode."""
    slices = torch.as_tensor(volume).to(device).permute(2, 0, 1)  # (Z, X, Y)
    labels = [predict_slices(model, slices[i:i + batch_size], norm, autocast, min_size)
              for i in range(0, len(slices), batch_size)]
    return torch.cat(labels).to(torch.uint8).permute(1, 2, 0)  # (X, Y, Z)
