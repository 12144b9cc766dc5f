"""The paper's U-Net: a ResNet encoder, a five-block decoder, a 3x3 conv head.

The layout is segmentation_models_pytorch's `Unet("tu-resnet50")` at its default settings, so the
paper's fine-tuned checkpoints load into it.

    model = UNet(in_chans=1, num_classes=4)            # background, RV, MYO, LV
    logits = model(x)                                  # (B, 1, H, W) -> (B, 4, H, W), H and W multiples of 32
    model.load_state_dict(checkpoints.load_segmentation("RUN/best.pt"))

inference.py pads whole slices to multiples of 32 and crops the logits back.

The tensor names are SMP's without the Lightning module's `model.` and timm's `encoder.model.`:
`encoder.<ResNet key>`, `decoder.blocks.{0..4}.conv{1,2}.{0,1}.*`, `segmentation_head.0.*`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import resnet


def conv_bn_relu(in_ch, out_ch):
    # no conv bias: the BatchNorm right after it has one (SMP's Conv2dReLU)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """x2 nearest upsampling, concatenation of the encoder feature of that resolution, two convs"""

    def __init__(self, in_ch, skip_ch, out_ch):
        super().__init__()
        self.conv1 = conv_bn_relu(in_ch + skip_ch, out_ch)
        self.conv2 = conv_bn_relu(out_ch, out_ch)

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, h, w) -> (B, C, 2h, 2w)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)                    # (B, C + C_skip, 2h, 2w)
        return self.conv2(self.conv1(x))


class Decoder(nn.Module):
    # decoder channels 256-128-64-32-16: SMP's default, which the paper kept
    def __init__(self, encoder_channels, decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        # block i starts from the layer4 feature (i = 0) or the previous block, and takes the
        # skip at strides 16, 8, 4, 2; the last block, back at full resolution, has no skip
        in_chs = [encoder_channels[-1]] + list(decoder_channels[:-1])  # r50: 2048, 256, 128, 64, 32
        skip_chs = list(encoder_channels[-2::-1]) + [0]                 # r50: 1024, 512, 256, 64, 0
        self.blocks = nn.ModuleList(
            DecoderBlock(i, s, o) for i, s, o in zip(in_chs, skip_chs, decoder_channels))

    def forward(self, features):
        # features: strides 2, 4, 8, 16, 32; SMP's "center" is an identity at these settings
        x = features[-1]                           # (B, 2048, H/32, W/32)
        skips = features[-2::-1] + [None]          # strides 16, 8, 4, 2, then none
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip)
        return x                                   # (B, 16, H, W)


class UNet(nn.Module):
    def __init__(self, in_chans=1, num_classes=4, arch="resnet50"):
        super().__init__()
        self.arch = arch
        self.encoder = resnet.ARCHS[arch](in_chans)
        self.decoder = Decoder(self.encoder.feature_channels)
        self.segmentation_head = nn.Sequential(nn.Conv2d(16, num_classes, 3, padding=1))
        # SMP's initialisation of the decoder and the head (the encoder keeps the ResNet's own)
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.segmentation_head[0].weight)
        nn.init.zeros_(self.segmentation_head[0].bias)

    def forward(self, x):
        # (B, C, H, W) -> (B, num_classes, H, W) logits
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"UNet needs height and width that are multiples of 32 (the encoder's "
                             f"stride), got {tuple(x.shape[-2:])}: pad with inference.pad_to(x, 32) first")
        return self.segmentation_head(self.decoder(self.encoder.features(x)))
