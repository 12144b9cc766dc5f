"""Reading any checkpoint of the paper or of this project into state dicts for this project's networks.

    state = load_backbone("byol_acdc_backbone_last.pth", in_chans=1)   # -> ResNet state dict (no fc)
    state = load_segmentation("RUN/best.pt")                           # -> UNet state dict
    model, norm = load_unet("RUN/best.pt")                             # -> UNet, (mean, std) of its input

The layouts it reads, told apart by their keys (never by the file name); K is the ResNet's own key
set (torchvision's and timm's names: conv1, bn1, layer1.0.conv1, ..., layer1.0.downsample.0/1, fc):

    supervised ImageNet (timm, torchvision)     flat: K + fc.weight [1000, 2048], fc.bias; 3-channel conv1
    yaox12/BYOL-PyTorch .pth.tar                 {online_backbone, target_backbone: module. + K, ...}
    solo-learn BYOL, Lightning .ckpt             {state_dict: backbone. + K (online), momentum_backbone. + K
                                                  (target), projector.*, predictor.*, ...; epoch, ...}
    the same saved flat (byol-...-ep=25.pth)     backbone. + K, momentum_backbone. + K, ...
    a backbone alone (byol_acdc_backbone_last)   K
    the paper's fine-tuned U-Net, Lightning      {state_dict: model.encoder.model. + K, model.decoder.*,
                                                  model.segmentation_head.0.*}
    this project's checkpoint.pt, best.pt        {kind: byol | segmentation, model: ..., config, ...}

From BYOL files the paper fine-tuned the target (momentum) backbone; so does load_backbone by default.
A 3-channel conv1 becomes 1-channel by summing over the colour axis, as the paper did.

Files are unpickled with torch.load(weights_only=True): tensors and plain containers only, so a file
cannot run code while it loads; trust=True (the scripts' --trust-checkpoint) lifts that.
"""
import math
import os
import pickle
from collections import Counter

import torch

import acdc
from resnet import ARCHS
from unet import UNet


class CheckpointError(Exception):
    """a checkpoint that cannot be read or does not fit the model; the message names the file"""


# -----------------------------------------------------------------------------
# reading a file safely

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


def state_dict_of(ckpt):
    """a loaded checkpoint -> (what the file is, the state dict inside it, names of its other entries)"""
    if isinstance(ckpt.get("state_dict"), dict):  # PyTorch Lightning (solo-learn, the paper's U-Net)
        state = ckpt["state_dict"]
        # the paper's segmentation module held the U-Net as self.model
        if any(k.startswith("model.encoder.") for k in state):
            state = {k.removeprefix("model."): v for k, v in state.items()}
        return "Lightning checkpoint", state, [k for k in ckpt if k != "state_dict"]
    if ckpt.get("kind") in ("byol", "segmentation"):  # this project's checkpoint.pt / best.pt
        others = [k for k in ckpt if k != "model"]
        return f"this project's {ckpt['kind']} checkpoint", ckpt["model"], others
    if isinstance(ckpt.get("target_backbone"), dict):  # yaox12/BYOL-PyTorch: one state dict per network
        nets = ("online_backbone", "target_backbone")
        state = {f"{net}.{k}": v for net in nets for k, v in ckpt.get(net, {}).items()}
        return "yaox12/BYOL-PyTorch checkpoint", state, [k for k in ckpt if k not in nets]
    return "state dict", ckpt, []


# -----------------------------------------------------------------------------
# messages and checks

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


# -----------------------------------------------------------------------------
# backbones

# Where each known layout keeps its backbone, tried in order: (what it is, prefix of the target
# (momentum) backbone, prefix of the online one, or None where there is one backbone only).
# The paper fine-tuned the target backbone.
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
    what, state, others = state_dict_of(read_checkpoint(source, trust))

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
        rule = "summed" if in_chans == 1 else "repeated, rescaled"
        notes += f"; conv1 {c} -> {in_chans} channels ({rule})"
    check_state_dict(model, backbone, f"{name} as {arch}")

    where = f"'{prefix}*' " if prefix else ""
    side = f"{branch} branch" if online is not None else "single backbone"
    print(f"loaded {arch} backbone {where}({layout}, {what}) from {name} ({side}){notes}; "
          f"unused: {summarize_unused(unused, others)}")
    return backbone


# -----------------------------------------------------------------------------
# U-Nets

def unet_args(state):
    """the UNet(...) arguments that a UNet state dict was made with, read from its tensors"""
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return {"in_chans": state["encoder.conv1.weight"].shape[1],
            "num_classes": state["segmentation_head.0.weight"].shape[0],
            "arch": resnet_arch(encoder)}


def load_segmentation(source, trust=False):
    """the paper's Lightning checkpoint, a plain SMP Unet state dict, or this project's
    checkpoint.pt / best.pt -> state dict for UNet(**unet_args(state)), checked"""
    name = "checkpoint dict" if isinstance(source, dict) else str(source)
    what, state, others = state_dict_of(read_checkpoint(source, trust))
    if "encoder.model.conv1.weight" in state:
        # SMP's timm encoder ("tu-resnet50", the paper's) holds the ResNet as .model
        state = {"encoder." + k.removeprefix("encoder.model.") if k.startswith("encoder.model.") else k: v
                 for k, v in state.items()}
    if "encoder.conv1.weight" not in state or "segmentation_head.0.weight" not in state:
        raise CheckpointError(f"{name}: no U-Net found in this {what}; its keys: {few(state)}")

    parts = ("encoder", "decoder", "segmentation_head")
    unet_state = {k: v for k, v in state.items() if k.split(".")[0] in parts}
    unused = [k for k in state if k not in unet_state]
    args = unet_args(unet_state)
    with torch.device("meta"):  # a skeleton only, to check names and shapes against
        skeleton = UNet(**args)
    check_state_dict(skeleton, unet_state, name)
    print(f"loaded U-Net ({args['arch']}, {args['in_chans']} input channels, {args['num_classes']} classes; "
          f"{what}) from {name}; unused: {summarize_unused(unused, others)}")
    return unet_state


def load_weights(model, source, trust=False):
    """--weights of fine-tuning: a segmentation checkpoint (one with a segmentation head) continues
    the whole U-Net `model`; any other initialises its encoder. -> what was loaded, in words"""
    ckpt = read_checkpoint(source, trust=trust)
    if "segmentation_head.0.weight" in state_dict_of(ckpt)[1]:
        model.load_state_dict(load_segmentation(ckpt))
        return f"the whole U-Net from {source}"
    model.encoder.load_state_dict(load_backbone(ckpt, in_chans=1, arch=model.arch))
    return f"the encoder from {source}; decoder and head start from random weights"


def normalisation_of(ckpt):
    """-> (mean, std, where they come from, in words): the input normalisation the checkpoint's model
    was trained with. This project stores it. The paper's code normalised with albumentations'
    Normalize, whose max_pixel_value (default 255) multiplies mean and std: its fine-tuned models
    saw (x - 255 * MEAN) / (255 * STD), and their BatchNorm statistics expect that input."""
    if ckpt.get("kind") == "segmentation":
        return ckpt.get("mean", acdc.MEAN), ckpt.get("std", acdc.STD), "stored in the checkpoint"
    hyper = ckpt.get("hyper_parameters") or {}
    config = hyper.get("config", {}) if isinstance(hyper, dict) else {}
    if isinstance(config, dict) and "norm_max_pixel_value" in config:
        scale = config["norm_max_pixel_value"]
        return acdc.MEAN * scale, acdc.STD * scale, f"ACDC's statistics x {scale:g}, the checkpoint's config"
    return acdc.MEAN * 255, acdc.STD * 255, "ACDC's statistics x 255, as the paper's code applied them"


def load_unet(source, trust=False, num_classes=4):
    """a segmentation checkpoint -> (UNet with its weights, on the CPU, (mean, std, where they come
    from) of its input normalisation); its encoder, input channels and classes are read from the weights"""
    ckpt = read_checkpoint(source, trust=trust)
    state = load_segmentation(ckpt)
    config = unet_args(state)
    if config["num_classes"] != num_classes:
        raise CheckpointError(f"{source}: a U-Net with {config['num_classes']} classes; "
                              f"ACDC's are 4 (BG, RV, MYO, LV)")
    model = UNet(**config)
    model.load_state_dict(state)
    return model, normalisation_of(ckpt)
