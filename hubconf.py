"""Entry points for torch.hub: the ResNet encoders, a fine-tuned U-Net.

    encoder = torch.hub.load("REPO", "resnet50", weights="byol_acdc_backbone_last.pth", source="local")
    model = torch.hub.load("REPO", "unet", checkpoint="runs/seg/best.pt", source="local")  # model.mean, .std

REPO: this repository's folder (source="local"), or "OWNER/REPO" on GitHub. Weights go through
checkpoints.py, as --weights and --checkpoint do: a path, or a name of weights.py fetched on first use.
"""
import checkpoints
import inference
import resnet

dependencies = ['torch', 'torchvision', 'numpy', 'nibabel', 'tqdm']


def _resnet(arch, weights, in_chans):
    """ResNet `arch` with timm's random initialisation (weights=None), else with the backbone of `weights`"""
    model = resnet.ARCHS[arch](in_chans)
    if weights is not None:
        model.load_state_dict(checkpoints.load_backbone(weights, in_chans, arch=arch))
    return model


def resnet18(weights=None, in_chans=1):
    """ResNet18 encoder, (B, in_chans, H, W) -> (B, 512); weights: None, a path or a name of weights.py"""
    return _resnet("resnet18", weights, in_chans)


def resnet34(weights=None, in_chans=1):
    """ResNet34 encoder, (B, in_chans, H, W) -> (B, 512); weights: None, a path or a name of weights.py"""
    return _resnet("resnet34", weights, in_chans)


def resnet50(weights=None, in_chans=1):
    """ResNet50 encoder, (B, in_chans, H, W) -> (B, 2048); weights: None, a path or a name of weights.py (the
    paper's: "byol_acdc_backbone_last.pth", "supervised_imagenet", ...)"""
    return _resnet("resnet50", weights, in_chans)


def unet(checkpoint, trust=False):
    """a fine-tuned U-Net (RUN/best.pt, or the paper's fine-tuned file) in eval mode on the CPU; .mean and .std:
    its input normalisation, (x - mean) / std (inference.predict_volume applies it)"""
    return inference.load_model(checkpoint, "cpu", trust=trust)[0]
