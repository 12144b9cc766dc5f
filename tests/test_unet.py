"""Tests for unet.py: shapes, the decoder's channels, the multiple-of-32 rule.
Run: python -m pytest tests/test_unet.py"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from unet import UNet  # noqa: E402


def test_output_shape():
    model = UNet(in_chans=1, num_classes=4, arch="resnet18").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 96)).shape == (2, 4, 64, 96)
    assert [b.conv2[0].out_channels for b in model.decoder.blocks] == [256, 128, 64, 32, 16]


def test_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        UNet(arch="resnet18")(torch.randn(1, 1, 64, 70))
