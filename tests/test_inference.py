"""inference.py: padding and cropping, slice and volume prediction, loading a fine-tuned model."""
import argparse

import numpy as np
import pytest
import torch

import acdc
import normalisation  # noqa: E402
import inference
import unet
from inference import crop_to, pad_to


def test_pad_and_crop_round_trip():
    x = torch.randn(2, 1, 50, 70)
    padded, hw = pad_to(x, 32)
    assert padded.shape == (2, 1, 64, 96) and hw == (50, 70)
    assert torch.equal(padded[..., :50, :70], x) and padded[..., 50:, :].abs().sum() == 0  # top-left
    assert torch.equal(crop_to(padded, hw), x)
    assert pad_to(x, 32, min_size=224)[0].shape == (2, 1, 224, 224)
    labels = torch.randint(0, 4, (2, 64, 64))
    assert torch.equal(pad_to(labels, 32)[0], labels)  # already a multiple: unchanged


class Threshold(torch.nn.Module):
    """a stand-in model: LV (3) wherever the normalised intensity is above 0, background elsewhere"""

    def forward(self, x):  # (B, 1, H, W) -> (B, 4, H, W)
        never = torch.full_like(x, -1e9)
        return torch.cat([-x, never, never, x], 1)


def test_predict_volume_keeps_orientation_and_crops_padding():
    volume = np.random.default_rng(0).uniform(0, 150, size=(40, 50, 3)).astype(np.float32)  # X, Y, Z
    pred = inference.predict_volume(Threshold(), volume, "cpu", batch_size=2)  # padded to 224 x 224, cropped back
    assert pred.shape == (40, 50, 3) and pred.dtype == torch.uint8
    expected = np.where(normalisation.normalize(volume, normalisation.MEAN, normalisation.STD) > 0, 3, 0)
    assert np.array_equal(pred.numpy(), expected)


def test_load_model_reads_the_papers_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = unet.UNet(arch="resnet18").eval()
    # the paper's fine-tuned checkpoints: Lightning, the U-Net as `model.`, timm's encoder as `encoder.model.`,
    # no architecture field
    state = {"model." + k.replace("encoder.", "encoder.model.", 1): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "paper.ckpt")
    loaded, norm = inference.load_model(str(tmp_path / "paper.ckpt"), torch.device("cpu"))
    assert norm[:2] == (255 * normalisation.MEAN, 255 * normalisation.STD)  # albumentations' Normalize, max_pixel_value 255
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)  # loaded in channels_last: same values


class LeftEdge(torch.nn.Module):
    """a stand-in model that is not mirror-symmetric: LV where the pixel to the left is brighter"""

    def forward(self, x):  # (B, 1, H, W) -> (B, 4, H, W)
        left = torch.nn.functional.pad(x, (1, 0))[..., :-1]
        never = torch.full_like(x, -1e9)
        return torch.cat([x - left, never, never, left - x], 1)


def test_tta_averages_the_flipped_probabilities():
    images = torch.rand(2, 20, 30) * 200
    plain = inference.predict_probabilities(LeftEdge(), images, min_size=0)
    tta = inference.predict_probabilities(LeftEdge(), images, min_size=0, tta=True)
    mirrored = inference.predict_probabilities(LeftEdge(), images.flip(-1), min_size=0).flip(-1)
    assert tta.shape == plain.shape == (2, 4, 20, 30) and torch.allclose(tta.sum(1), torch.ones(2, 20, 30))
    assert torch.allclose(tta, (plain + mirrored) / 2) and not torch.allclose(tta, plain)
    labels = inference.predict_slices(LeftEdge(), images, min_size=0, tta=True)
    assert torch.equal(labels, tta.argmax(1))
    # a mirror-symmetric model gives the same labels with and without flips; a cine keeps its 4D shape
    cine = np.random.default_rng(0).uniform(0, 150, size=(40, 50, 3, 2)).astype(np.float32)
    assert torch.equal(inference.predict_volume(Threshold(), cine, "cpu", tta=True),
                       inference.predict_volume(Threshold(), cine, "cpu"))
    assert inference.predict_volume(Threshold(), cine, "cpu").shape == (40, 50, 3, 2)


def test_norm_flag_and_normalisation():
    assert normalisation.inference_flag("paper") == "paper" and normalisation.inference_flag("1.5,2") == (1.5, 2.0)
    for bad in ("auto", "1", "1,0", "1,nan", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected checkpoint, published, paper or MEAN,STD"):
            normalisation.inference_flag(bad)
    stored = (1.0, 2.0, "stored in the checkpoint")
    assert normalisation.for_inference("checkpoint", stored) == (1.0, 2.0, "the checkpoint's: stored in the checkpoint")
    assert normalisation.for_inference("published", stored)[:2] == (normalisation.MEAN, normalisation.STD)
    assert normalisation.for_inference("paper", stored)[:2] == (255 * normalisation.MEAN, 255 * normalisation.STD)
    assert normalisation.for_inference((3.0, 4.0), stored) == (3.0, 4.0, "given with --norm")


def test_geometry_warnings_against_the_training_spacing():
    stored = {"kind": "segmentation", "train_spacing": {"in_plane": [0.7, 0.9], "between_slices": [3, 4]}}
    assert inference.train_spacing(stored) == ({"in_plane": (0.7, 0.9), "between_slices": (3.0, 4.0)},
                                               "stored in the checkpoint")
    acdc_range, source = inference.train_spacing({"state_dict": {}})  # the paper's checkpoints: ACDC's range
    assert acdc_range == inference.ACDC_SPACING and "ACDC" in source
    assert inference.geometry_warnings((1.5, 1.5, 10.0), acdc_range) == []
    assert inference.geometry_warnings((1.2, 1.9, 5.0), acdc_range) == []  # within 25 % of 1.37-1.68
    [axis] = inference.geometry_warnings((1.5, 2.0, 1.5), acdc_range)  # slices along the second axis?
    assert "third axis" in axis
    [pixel] = inference.geometry_warnings((0.7, 0.7, 8.0), acdc_range)
    assert "in-plane spacing 0.7 x 0.7 mm" in pixel and "1.37-1.68" in pixel


def test_resampling_to_the_training_spacing():
    trained = {"in_plane": (1.37, 1.68), "between_slices": (5.0, 10.0)}
    assert inference.model_spacing((0.7, 0.7, 8.0), trained) == (1.37, 1.37, 8.0)  # auto: far outside, clamped
    assert inference.model_spacing((2.5, 1.5, 8.0), trained, "auto") == (1.68, 1.5, 8.0)  # the nearest end
    assert inference.model_spacing((1.2, 1.2, 8.0), trained, "auto") == (1.2, 1.2, 8.0)  # within 25 %: as it is
    assert inference.model_spacing((1.2, 1.2, 8.0), trained, "on") == (1.37, 1.37, 8.0)
    assert inference.model_spacing((0.7, 0.7, 8.0), trained, "off") == (0.7, 0.7, 8.0)
    # the spacing warning gives way to one line when the slices are resampled
    assert inference.geometry_warnings((0.7, 0.7, 8.0), trained, (1.37, 1.37, 8.0)) == \
        ["resampled from 0.7 x 0.7 mm to 1.37 x 1.37 mm"]
    assert "--resample off" in inference.geometry_warnings((0.7, 0.7, 8.0), trained, (0.7, 0.7, 8.0))[0]

    seen = []

    class Recorder(Threshold):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)
    volume = np.random.default_rng(0).uniform(0, 150, size=(40, 50, 3)).astype(np.float32)
    volume[10:30, 10:40] = 300  # a bright block: the labels follow it on the scan's grid
    pred = inference.predict_volume(Recorder(), volume, "cpu", min_size=0, spacing=(0.7, 0.7), to=(1.4, 1.4))
    assert seen == [(32, 32)] and pred.shape == (40, 50, 3) and pred.dtype == torch.uint8  # 20 x 25, padded
    assert (pred[12:28, 12:38] == 3).all()
    # antialiased when shrinking: a 9 x 9 checkerboard averages to grey, not to a sample of its squares
    board = (torch.arange(9)[:, None] + torch.arange(9)).remainder(2).float()[None, None]
    assert ((inference.resize(board, (3, 3)) - 0.5).abs() < 0.2).all()
