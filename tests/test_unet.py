"""Tests for unet.py: shapes, the multiple-of-32 rule, padding, and the paper's fine-tuned
checkpoint layout (exact names and shapes from the reference key list) loading strictly.
Run: python -m pytest tests/test_unet.py"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resnet import CheckpointError  # noqa: E402
from test_checkpoints import KEYS, random_state  # noqa: E402  (the reference key list, random tensors)
from unet import UNet, crop_to, load_segmentation, pad_to, unet_args  # noqa: E402


def test_output_shape():
    model = UNet(in_chans=1, num_classes=4, arch="resnet18").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 96)).shape == (2, 4, 64, 96)
    assert [b.conv2[0].out_channels for b in model.decoder.blocks] == [256, 128, 64, 32, 16]


def test_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        UNet(arch="resnet18")(torch.randn(1, 1, 64, 70))


def test_pad_and_crop_round_trip():
    x = torch.randn(2, 1, 50, 70)
    padded, hw = pad_to(x, 32)
    assert padded.shape == (2, 1, 64, 96) and hw == (50, 70)
    assert torch.equal(padded[..., :50, :70], x) and padded[..., 50:, :].abs().sum() == 0  # top-left
    assert torch.equal(crop_to(padded, hw), x)
    assert pad_to(x, 32, min_size=224)[0].shape == (2, 1, 224, 224)
    labels = torch.randint(0, 4, (2, 64, 64))
    assert torch.equal(pad_to(labels, 32)[0], labels)  # already a multiple: unchanged


def test_paper_lightning_checkpoint_loads(tmp_path, capsys):
    """the paper's fine-tuned model: state_dict of model.encoder.model.<ResNet50> + model.decoder.* + head"""
    encoder = {k: s for k, s in KEYS["resnet50_imagenet_3ch_with_fc"].items() if not k.startswith("fc.")}
    encoder["conv1.weight"] = [64, 1, 7, 7]  # fine-tuned on 1-channel MRI
    shapes = {**{"model.encoder.model." + k: s for k, s in encoder.items()},
              **{"model." + k: s for k, s in KEYS["unet_decoder_and_head_4_classes"].items()}}
    paper = random_state(shapes, seed=0)
    path = tmp_path / "epoch=99.ckpt"
    torch.save({"state_dict": paper, "epoch": 99, "global_step": 7, "hyper_parameters": {"lr": 0.001}}, path)

    state = load_segmentation(path)
    assert unet_args(state) == {"in_chans": 1, "num_classes": 4, "arch": "resnet50"}
    model = UNet(in_chans=1, num_classes=4, arch="resnet50")
    model.load_state_dict(state, strict=True)
    ours = model.state_dict()
    for k, v in paper.items():  # every tensor lands in its place
        ours_key = k.removeprefix("model.").replace("encoder.model.", "encoder.")
        assert torch.equal(ours[ours_key], v), k
    line = capsys.readouterr().out.strip()
    assert line.startswith("loaded U-Net (resnet50, 1 input channels, 4 classes; Lightning checkpoint)")
    assert line.endswith("unused: epoch, global_step, hyper_parameters")


def test_own_checkpoint_and_errors(tmp_path):
    model = UNet(in_chans=1, num_classes=3, arch="resnet18")
    ckpt = {"kind": "segmentation", "model": model.state_dict(), "arch": "resnet18", "in_chans": 1,
            "num_classes": 3, "epoch": 2, "config": {}}
    state = load_segmentation(ckpt)
    assert unet_args(state) == {"in_chans": 1, "num_classes": 3, "arch": "resnet18"}
    ckpt["model"]["decoder.blocks.1.conv1.0.weight"] = torch.zeros(128, 7, 3, 3)
    with pytest.raises(CheckpointError, match=r"decoder.blocks.1.conv1.0.weight has shape \[128, 7, 3, 3\]"):
        load_segmentation(ckpt)
    with pytest.raises(CheckpointError, match="no U-Net found"):
        load_segmentation({"conv1.weight": torch.zeros(64, 1, 7, 7)})
