"""ResNet encoders (18/34/50) with torchvision's parameter names, and the loading of every
published backbone checkpoint of the paper by key remapping.

    model = resnet50(in_chans=1)                       # (B, 1, H, W) -> (B, 2048)
    model.load_state_dict(load_backbone("byol_acdc_backbone_last.pth", in_chans=1))
    feats = model.features(x)                          # strides 2, 4, 8, 16, 32

The key names (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer1.0.downsample.0/1`, `fc`) are
torchvision's and timm's, so ImageNet weights and the paper's checkpoints load without a
translation table for the network itself.
"""
import math
import os
import pickle
from collections import Counter

import torch
import torch.nn as nn


# -----------------------------------------------------------------------------
# the network

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


class ResNet(nn.Module):
    def __init__(self, block, layers, in_chans=1, num_classes=0):
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
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

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

    def features(self, x):
        """(B, C, H, W) -> [stride 2 (64 ch), 4, 8, 16, 32 (2048 ch for ResNet50)]"""
        f0 = self.relu(self.bn1(self.conv1(x)))   # (B, 64, H/2, W/2): the stem, before the max pool
        f1 = self.layer1(self.maxpool(f0))        # (B, 256, H/4, W/4)
        f2 = self.layer2(f1)                      # (B, 512, H/8, W/8)
        f3 = self.layer3(f2)                      # (B, 1024, H/16, W/16)
        f4 = self.layer4(f3)                      # (B, 2048, H/32, W/32)
        return [f0, f1, f2, f3, f4]

    def forward(self, x):
        x = self.features(x)[-1]
        x = torch.flatten(self.avgpool(x), 1)     # (B, 2048)
        return x if self.fc is None else self.fc(x)


def resnet18(in_chans=1, num_classes=0):
    return ResNet(BasicBlock, [2, 2, 2, 2], in_chans, num_classes)


def resnet34(in_chans=1, num_classes=0):
    return ResNet(BasicBlock, [3, 4, 6, 3], in_chans, num_classes)


def resnet50(in_chans=1, num_classes=0):
    return ResNet(Bottleneck, [3, 4, 6, 3], in_chans, num_classes)


ARCHS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


# -----------------------------------------------------------------------------
# reading checkpoints

class CheckpointError(Exception):
    """a checkpoint that cannot be read or does not fit the model; the message names the file"""


def read_checkpoint(source, trust=False):
    """the one torch.load of the project: a path -> the dict it holds (a dict is returned as is).

    Only tensors and plain containers are unpickled, so a file cannot run code while it loads;
    trust=True (the scripts' --trust-checkpoint) lifts that, for files the user vouches for."""
    if isinstance(source, dict):
        return source
    # before 2.6 the weights-only unpickler could still be made to run code (CVE-2025-32434)
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 6):
        raise CheckpointError(f"reading checkpoints safely needs torch >= 2.6, this is {torch.__version__}")
    path = str(source)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found")
    try:
        with torch.serialization.safe_globals([] if trust else stand_ins(path)):
            ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if trust:
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({gist(e)})") from e
        # torch's message is long: keep the line that says what it refused
        refused = [line for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise CheckpointError(
            f"{path}: the safe loader (torch.load weights_only=True) refused it: "
            f"{gist(refused[0]) if refused else 'not only tensors'}. Unpickling other objects can "
            "run code stored in the file; if you trust where it came from, pass --trust-checkpoint") from e
    except Exception as e:  # a damaged zip archive, a truncated pickle, a file of another kind
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                              f"{gist(e)}); truncated, damaged, or another kind of file?") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: holds a {type(ckpt).__name__}, not a dict of tensors")
    return ckpt


# Lightning and OmegaConf keep a run's hyper-parameters as their own classes, which the safe loader
# refuses and which need those libraries (not dependencies) for a full unpickle. The loaders never
# read them: inert stand-ins take their place, so the tensors of a Lightning .ckpt load safely.
# Any other object still needs --trust-checkpoint.
METADATA_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "typing.",
                    "pathlib.", "argparse.Namespace")


class Inert:
    """stands in for a metadata object: takes any arguments and state, runs nothing"""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def stand_ins(path):
    """(stand-in, name) pairs for the safe loader when every object it would refuse is metadata"""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a readable archive: torch.load says why
        return []
    if not all(n.startswith(METADATA_MODULES) for n in names):
        return []
    # AttributeDict is a dict with attribute access: a plain dict keeps its content
    return [(dict if n.endswith(".AttributeDict") else Inert, n) for n in names]


def unwrap(ckpt):
    """-> (what the file is, the state dict inside it, names of the file's other entries)"""
    if isinstance(ckpt.get("state_dict"), dict):  # PyTorch Lightning (solo-learn, the paper's U-Net)
        state = ckpt["state_dict"]
        # the paper's segmentation module held the U-Net as self.model
        if any(k.startswith("model.encoder.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items()}
        return "Lightning checkpoint", state, [k for k in ckpt if k != "state_dict"]
    if ckpt.get("kind") in ("byol", "segmentation"):  # this project's checkpoint.pt / best.pt
        return f"this project's {ckpt['kind']} checkpoint", ckpt["model"], [k for k in ckpt if k != "model"]
    if isinstance(ckpt.get("target_backbone"), dict):  # yaox12/BYOL-PyTorch: one state dict per network
        nets = ("online_backbone", "target_backbone")
        state = {f"{net}.{k}": v for net in nets for k, v in ckpt.get(net, {}).items()}
        return "yaox12/BYOL-PyTorch checkpoint", state, [k for k in ckpt if k not in nets]
    return "state dict", ckpt, []


def gist(message):
    """the first sentence of a (often long) error message"""
    return " ".join(str(message).split()).split(". ")[0].rstrip(".")


def few(keys, n=6):
    """'a, b, c, ... (318 in all)': enough of a key list to recognise it"""
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def summarize_unused(keys, others=()):
    """'projector (9 tensors), predictor (9 tensors), epoch, optimizer_states' (or 'nothing')"""
    groups = Counter(k.split(".")[0] for k in keys)
    parts = [f"{g} ({n} tensor{'s' * (n != 1)})" for g, n in groups.items()] + list(others)
    return ", ".join(parts) or "nothing"


def resnet_arch(state):
    """which of ARCHS has the tensor names of `state` (18 and 34 differ in depth, 50 has conv3)"""
    def names(keys):  # num_batches_tracked may be missing from legacy files: leave it out
        return {k for k in keys if not k.endswith("num_batches_tracked")}
    def mismatch(arch):
        with torch.device("meta"):  # a skeleton only: no memory, no initialisation cost
            return len(names(ARCHS[arch]().state_dict()) ^ names(state))
    return min(ARCHS, key=mismatch)


def check_state_dict(model, state, name):
    """raise CheckpointError unless `state` holds exactly the tensors of `model`, with its shapes"""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = [f"missing {len(missing)} ({few(missing)})"] if missing else []
    problems += [f"unexpected {len(unexpected)} ({few(unexpected)})"] if unexpected else []
    if problems:
        raise CheckpointError(f"{name}: does not fit the model: " + "; ".join(problems))
    for k, v in expected.items():
        found = list(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__
        if found != list(v.shape):
            raise CheckpointError(f"{name}: {k} has shape {found}, the model expects {list(v.shape)}")


def adapt_conv1(weight, in_chans):
    """(64, C, 7, 7) -> (64, in_chans, 7, 7), as the paper did (timm's adapt_input_conv)"""
    c = weight.shape[1]
    if c == in_chans:
        return weight
    dtype, weight = weight.dtype, weight.float()  # half-precision files: sum in fp32
    if in_chans == 1:
        # a grey image is R = G = B, so the summed kernel answers it as the RGB kernel would
        weight = weight.sum(dim=1, keepdim=True)
    else:
        # repeat the kernels over the new channels, rescaled so the layer's output keeps its scale
        weight = weight.repeat(1, math.ceil(in_chans / c), 1, 1)[:, :in_chans] * (c / in_chans)
    return weight.to(dtype)


# Where each known layout keeps its backbone, tried in order: (what it is, prefix of the target
# (momentum) backbone, prefix of the online one, or None where there is one backbone only).
# The paper fine-tuned the target backbone. See reference/CHECKPOINT_FORMATS.md.
BACKBONE_LAYOUTS = [
    ("BYOL", "target_backbone.", "backbone."),  # this project's
    ("solo-learn BYOL", "momentum_backbone.", "backbone."),
    ("BYOL", "target_backbone.module.", "online_backbone.module."),  # yaox12's, saved from DataParallel
    ("BYOL", "target_backbone.", "online_backbone."),  # yaox12's, saved without it
    ("U-Net encoder, timm", "encoder.model.", None),  # SMP's "tu-resnet50" encoder: the paper's U-Net
    ("U-Net encoder", "encoder.", None),
    ("ResNet", "", None),
]


def load_backbone(source, in_chans=1, branch="target", trust=False, arch=None):
    """any checkpoint holding a ResNet -> state dict for ARCHS[arch](in_chans) (no fc), checked.

    source: a path or an already loaded dict. branch: "target" or "online", for BYOL files.
    arch: None finds it from the tensor names; given, the file must hold that ResNet."""
    if branch not in ("target", "online"):
        raise ValueError(f"branch must be 'target' or 'online', not {branch!r}")
    name = "checkpoint dict" if isinstance(source, dict) else str(source)
    what, state, others = unwrap(read_checkpoint(source, trust))

    # the layout is told by the keys, never by the file name
    for layout, target, online in BACKBONE_LAYOUTS:
        if target + "conv1.weight" in state and (online is None or online + "conv1.weight" in state):
            break
    else:
        raise CheckpointError(f"{name}: no ResNet found in this {what}; its keys: {few(state)}")
    prefix = online if branch == "online" and online is not None else target
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    unused = [k for k in state if not k.startswith(prefix)]
    for k in ("fc.weight", "fc.bias"):  # the ImageNet classifier: the U-Net has no use for it
        if k in backbone:
            unused.append(prefix + k)
            del backbone[k]

    arch = arch or resnet_arch(backbone)
    with torch.device("meta"):
        model = ARCHS[arch](in_chans)
    notes = ""
    if not any(k.endswith("num_batches_tracked") for k in backbone):
        # legacy files predate this counter; BatchNorm ignores it when momentum is set, as here
        for k in model.state_dict():
            if k.endswith("num_batches_tracked"):
                backbone[k] = torch.zeros((), dtype=torch.long)
        notes += "; num_batches_tracked missing, set to 0"
    c = backbone["conv1.weight"].shape[1] if "conv1.weight" in backbone else in_chans
    if c != in_chans:
        backbone["conv1.weight"] = adapt_conv1(backbone["conv1.weight"], in_chans)
        notes += f"; conv1 {c} -> {in_chans} channels ({'summed' if in_chans == 1 else 'repeated, rescaled'})"
    check_state_dict(model, backbone, f"{name} as {arch}")

    where = f"'{prefix}*' " if prefix else ""
    side = f"{branch} branch" if online is not None else "single backbone"
    print(f"loaded {arch} backbone {where}({layout}, {what}) from {name} ({side}){notes}; "
          f"unused: {summarize_unused(unused, others)}")
    return backbone
