"""Tests for resnet.py's network: torchvision's ResNets as the oracle, feature maps, 1-channel input.
Run: python -m pytest tests/test_resnet.py"""
import os
import sys

import pytest
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import resnet  # noqa: E402


def randomize_(model, seed=0):
    """random weights AND BatchNorm statistics, so that eval-mode outputs test every tensor"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_matches_torchvision(arch):
    ours = resnet.ARCHS[arch](in_chans=3, num_classes=10)
    theirs = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours.eval()(x) - theirs.eval()(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("arch, channels", [("resnet18", [64, 64, 128, 256, 512]),
                                            ("resnet50", [64, 256, 512, 1024, 2048])])
def test_features_strides_and_channels(arch, channels):
    model = resnet.ARCHS[arch](in_chans=1).eval()
    assert model.feature_channels == channels and model.num_features == channels[-1]
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        feats = model.features(x)
        pooled = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 96 // s) for c, s in zip(channels, [2, 4, 8, 16, 32])]
    assert pooled.shape == (2, channels[-1])  # num_classes=0: no fc, forward returns pooled features
    assert model.fc is None and not any(k.startswith("fc.") for k in model.state_dict())


def test_one_channel_input():
    model = resnet.resnet18(in_chans=1)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 512)
