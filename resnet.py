"""The ResNet encoder (50 as in the paper; 18 or 34 for quick runs) with torchvision's parameter names.

    model = resnet50(in_chans=1)                       # (B, 1, H, W) -> (B, 2048)
    model.load_state_dict(checkpoints.load_backbone("byol_acdc_backbone_last.pth", in_chans=1))
    feats = model.features(x)                          # strides 2, 4, 8, 16, 32

The key names (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer1.0.downsample.0/1`, `fc`) are
torchvision's and timm's, so ImageNet weights and the paper's checkpoints load without a
translation table for the network itself (checkpoints.py reads them). The initialisation is
timm's, which the paper's code used (zero_init_last). The stem (conv1, bn1, relu) runs in
float32 under any autocast: see ResNet.stem.
"""
import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    """two 3x3 convs (ResNet18/34)"""
    expansion = 1

    def __init__(self, in_ch, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def zero_init_last(self):
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's "ResNet v1.5"), 1x1 expand x4"""
    expansion = 4

    def __init__(self, in_ch, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)


class ResNet(nn.Module):
    def __init__(self, block, layers, in_chans=1, num_classes=0, zero_init_last=True):
        super().__init__()
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._ch = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512 * block.expansion
        # channels of features(): stem, layer1..layer4
        self.feature_channels = [64] + [w * block.expansion for w in (64, 128, 256, 512)]
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else None
        for m in self.modules():  # timm's initialisation (torchvision's is the same without zero_init_last)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # the paper's: timm's default zero_init_last=True. The last BatchNorm of every residual block
        # scales by 0, so each block starts as its shortcut; this shapes the random-initialisation
        # baseline and BYOL from scratch (--init none)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def _make_layer(self, block, width, blocks, stride):
        downsample = None
        if stride != 1 or self._ch != width * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._ch, width * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(width * block.expansion))
        layers = [block(self._ch, width, stride, downsample)]
        self._ch = width * block.expansion
        layers += [block(self._ch, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x):
        """(B, C, H, W) -> (B, 64, H/2, W/2): conv1, bn1, relu in float32, whatever the autocast.

        A normalised input can have a large offset relative to its spread: the paper's fine-tuned
        models take (x - 17154.6) / 21588.5, about -0.79 +- 0.05 for raw intensities 0-1000, and
        its pretraining took ((x mod 256) / 255 - 67.27) / 84.66, within -0.795..-0.783. Cast to
        bfloat16 (8 significant bits) before conv1, raw intensities 0-1000 keep 12 distinct values
        and the 256 grey levels 4; float16 keeps 95 and 25. The stem is 1.0% of the ResNet50's
        multiply-adds at 224 x 224 (39 of 4,008 million; 0.5% of the U-Net's 8,084), so it stays
        in float32.
        The input goes to the weights' dtype: float32 unless the model itself was cast."""
        with torch.autocast(x.device.type, enabled=False):
            return self.relu(self.bn1(self.conv1(x.to(self.conv1.weight.dtype))))

    def features(self, x):
        """(B, C, H, W) -> [stride 2 (64 ch), 4, 8, 16, 32 (2048 ch for ResNet50)]"""
        f0 = self.stem(x)                         # (B, 64, H/2, W/2), float32, before the max pool
        if torch.is_autocast_enabled(x.device.type):
            # back to the autocast dtype: layer1's convs and the decoder's would round it to that dtype
            # anyway (and max pooling commutes with the rounding), so no value changes, and the max
            # pool and the skip connection move half the bytes
            f0 = f0.to(torch.get_autocast_dtype(x.device.type))
        f1 = self.layer1(self.maxpool(f0))        # (B, 256, H/4, W/4)
        f2 = self.layer2(f1)                      # (B, 512, H/8, W/8)
        f3 = self.layer3(f2)                      # (B, 1024, H/16, W/16)
        f4 = self.layer4(f3)                      # (B, 2048, H/32, W/32)
        return [f0, f1, f2, f3, f4]

    def forward(self, x):
        x = self.features(x)[-1]
        x = torch.flatten(self.avgpool(x), 1)     # (B, 2048)
        return x if self.fc is None else self.fc(x)


def resnet18(in_chans=1, num_classes=0, zero_init_last=True):
    return ResNet(BasicBlock, [2, 2, 2, 2], in_chans, num_classes, zero_init_last)


def resnet34(in_chans=1, num_classes=0, zero_init_last=True):
    return ResNet(BasicBlock, [3, 4, 6, 3], in_chans, num_classes, zero_init_last)


def resnet50(in_chans=1, num_classes=0, zero_init_last=True):
    return ResNet(Bottleneck, [3, 4, 6, 3], in_chans, num_classes, zero_init_last)


ARCHS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
