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


@pytest.mark.parametrize("arch, last", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_last_as_timm(arch, last):
    model = resnet.ARCHS[arch](in_chans=1)
    blocks = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    assert all(torch.all(getattr(block, last).weight == 0) for block in blocks)
    others = [m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
              and not name.endswith(last)]
    assert others and all(torch.all(m.weight == 1) for m in others)
    # so every block starts as its shortcut: relu(identity) where it has no downsampling
    block = model.layer1[1]
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    assert torch.equal(block(x), torch.relu(x))
    assert not torch.all(resnet.ARCHS[arch](zero_init_last=False).layer1[0].get_submodule(last).weight == 0)


def test_stem_in_float32_under_bf16_autocast():
    # a smooth phantom-like image, raw intensities 0..1000, normalised as the paper's fine-tuned U-Nets
    # expect it (albumentations scaled the statistics by 255): values about -0.79 +- 0.05
    g = torch.Generator().manual_seed(0)
    raw = torch.nn.functional.interpolate(torch.rand(4, 1, 8, 8, generator=g), size=64, mode="bilinear")
    raw = 1000 * (raw - raw.min()) / (raw.max() - raw.min())
    x = (raw - 255 * 67.27297657740893) / (255 * 84.6606962344396)
    model = resnet.resnet18(in_chans=1)
    torch.nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu", generator=g)
    with torch.no_grad():
        conv = model.conv1(x)  # the BatchNorm statistics of a model trained on such inputs
        model.bn1.running_mean.copy_(conv.mean((0, 2, 3)))
        model.bn1.running_var.copy_(conv.var((0, 2, 3)))
        model.eval()
        exact = model.stem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stem = model.stem(x)
            old = model.relu(model.bn1(model.conv1(x)))  # the stem as it ran before: conv1 in bf16
            f0 = model.features(x)[0]

    def rel(a):
        return ((a.float() - exact).norm() / exact.norm()).item()
    assert stem.dtype == torch.float32 and rel(stem) < 1e-3
    assert rel(old) > 1e-2  # 1.3%: the input in bf16 keeps 12 grey levels, so the test tells the two apart
    # features() hands the rest of the network the autocast dtype: only the output's rounding differs
    assert f0.dtype == torch.bfloat16 and rel(f0) < 4e-3
