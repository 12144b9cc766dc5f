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

From BYOL files the paper fine-tuned the target (momentum) backbone; so does load_backbone by default. A
3-channel conv1 becomes 1-channel by summing over the colour axis, as the paper did. A known name that is no
file (weights.py) is fetched first; messages name the file, after its flag where given (flag="--weights").
"""
import math
import pickle
import re
import zipfile
from collections import Counter

import torch

import metadata
import normalisation
import weights
from resnet import ARCHS
from unet import UNet


class CheckpointError(Exception):
    """a checkpoint that cannot be read or does not fit the model; the message names the file"""


# -----------------------------------------------------------------------------
# reading a file safely

def describe(source, flag=None, name=None):
    """how messages name a checkpoint: the flag it came from, then the file ('--weights FILE')"""
    name = name or ("checkpoint dict" if isinstance(source, dict) else str(source))
    return f"{flag} {name}" if flag else name


def read_checkpoint(source, trust=False, flag=None, name=None):
    """the one torch.load of the project: a path or a known name -> the dict it holds (a dict as is).
    Only tensors and plain containers are unpickled, so a file cannot run code while it loads;
    trust=True (the scripts' --trust-checkpoint) lifts that, for files the user vouches for."""
    if isinstance(source, dict):
        return source
    # before 2.6 the weights-only unpickler could still be made to run code (CVE-2025-32434)
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 6):
        raise CheckpointError(f"reading checkpoints safely needs torch >= 2.6, this is {torch.__version__}")
    label = describe(source, flag, name)
    try:
        path = weights.resolve(source, check=refusal)  # a file as it is; a known name from the cache or the web
    except weights.WeightsError as e:
        raise CheckpointError(f"{flag} {e}" if flag else str(e)) from None
    if why := not_torch_save(path):
        raise CheckpointError(f"{label}: not a PyTorch checkpoint ({why})")
    names = [] if trust else metadata.stand_ins(path)
    try:
        with torch.serialization.safe_globals(names):
            ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        # torch names what it refused: a GLOBAL, or the class of an object it would not build
        refused = re.search(r"GLOBAL (\S+)|Can only .*?but got <class '([^']+)'>", str(e))
        if refused and not trust:
            raise CheckpointError(f"{label}: holds objects that the safe loader (torch.load weights_only=True) does "
                                  f"not allow (the first: {refused[1] or refused[2]}): unpickling them could run code "
                                  "stored in the file; if you trust where it came from, pass --trust-checkpoint") from e
        # torch's message is long: keep its first line that says what went wrong
        detail = gist([line for line in str(e).split("WeightsUnpickler error:")[-1].splitlines()
                       if line.strip()][0])
        raise CheckpointError(f"{label}: not a PyTorch checkpoint, or a damaged one ({detail})") from e
    except Exception as e:  # a damaged archive, a truncated pickle
        raise CheckpointError(f"{label}: a truncated or damaged PyTorch checkpoint? ({type(e).__name__}: "
                              f"{gist(e)})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{label}: holds a {type(ckpt).__name__}, not a dict of tensors")
    return metadata.plain(ckpt) if names else ckpt


def refusal(path, name):
    """raise weights.DownloadFailed unless the safe loader reads the file at path (`name` in messages):
    weights.py asks before a file it fetched takes its name"""
    try:
        read_checkpoint(path, name=name)
    except CheckpointError as e:
        raise weights.DownloadFailed(e) from None


def not_torch_save(path):
    """why the file cannot be torch.save's (a zip archive holding data.pkl, or before torch 1.6 a pickle)"""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        return None if any(n.endswith("data.pkl") for n in names) else f"a zip archive of {few(names, 3)}"
    with open(path, "rb") as f:
        head = f.read(16)
    return None if head.startswith((b"PK\x03\x04", b"\x80")) else f"it starts with {head!r}, not a zip archive"


def state_dict_of(ckpt):
    """a loaded checkpoint -> (what the file is, the state dict inside it, names of its other entries)"""
    what, state, others = "state dict", ckpt, []
    if isinstance(ckpt.get("state_dict"), dict):  # PyTorch Lightning (solo-learn, the paper's U-Net)
        what, state = "Lightning checkpoint", ckpt["state_dict"]
        others = [k for k in ckpt if k != "state_dict"]
        if any(k.startswith("model.encoder.") for k in state):  # the paper's module held the U-Net as .model
            state = {k.removeprefix("model."): v for k, v in state.items()}
    elif ckpt.get("kind") in ("byol", "segmentation"):  # this project's checkpoint.pt / best.pt
        what, state = f"this project's {ckpt['kind']} checkpoint", ckpt["model"]
        others = [k for k in ckpt if k != "model"]
    elif isinstance(ckpt.get("target_backbone"), dict):  # yaox12/BYOL-PyTorch: one state dict per network
        nets = ("online_backbone", "target_backbone")
        state = {f"{net}.{k}": v for net in nets for k, v in ckpt.get(net, {}).items()}
        what, others = "yaox12/BYOL-PyTorch checkpoint", [k for k in ckpt if k not in nets]
    if "encoder.model.conv1.weight" in state:  # SMP's timm encoder ("tu-resnet50", the paper's) has a .model
        state = {k.replace("encoder.model.", "encoder.", 1) if k.startswith("encoder.model.") else k: v
                 for k, v in state.items()}
    return what, state, others


# -----------------------------------------------------------------------------
# messages and checks

def gist(message):
    """the first sentence of a (often long) error message"""
    return " ".join(str(message).split()).split(". ")[0].rstrip(".")


def few(keys, n=6):
    """'a, b, c, ... (318 in all)': enough of a key list to recognise it"""
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# what this project reads from its checkpoints besides the tensors (format, normalisation, spacing): not unused
READ = {"kind", "mean", "std", "train_spacing"}


def summarize_unused(keys, others=()):
    """'projector (9 tensors), predictor (9 tensors), epoch, optimizer_states' (or 'nothing')"""
    groups = Counter(k.split(".")[0] for k in keys)
    parts = [f"{g} ({n} tensor{'s' * (n != 1)})" for g, n in groups.items()] + [k for k in others if k not in READ]
    return ", ".join(parts) or "nothing"


def resnet_arch(state, exact=False):
    """which of ARCHS has the tensor names of `state` (18 and 34 differ in depth, 50 has conv3): the
    nearest, or with exact=True the one with exactly these names (None if there is none)"""
    def names(keys):  # num_batches_tracked may be missing from legacy files: leave it out
        return {k for k in keys if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):  # skeletons only: no memory, no initialisation cost
        mismatch = {arch: len(names(make().state_dict()) ^ names(state)) for arch, make in ARCHS.items()}
    arch = min(mismatch, key=mismatch.get)
    return None if exact and mismatch[arch] else arch


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

# Where each known layout keeps its backbone, tried in order: (what it is, prefix of the target (momentum)
# backbone, which the paper fine-tuned, prefix of the online one or None where there is one backbone only).
BACKBONE_LAYOUTS = [
    ("BYOL", "target_backbone.", "backbone."),  # this project's
    ("solo-learn BYOL", "momentum_backbone.", "backbone."),
    ("BYOL", "target_backbone.module.", "online_backbone.module."),  # yaox12's, saved from DataParallel
    ("BYOL", "target_backbone.", "online_backbone."),  # yaox12's, saved without it
    ("U-Net encoder", "encoder.", None),
    ("ResNet", "", None),
]


def find_backbone(state):
    """-> the entry of BACKBONE_LAYOUTS whose keys `state` has, or None"""
    return next(((layout, target, online) for layout, target, online in BACKBONE_LAYOUTS if target
                 + "conv1.weight" in state and (online is None or online + "conv1.weight" in state)), None)


def split_backbone(state, label, what, branch="target"):
    """-> (layout, prefix, online prefix, the backbone's tensors without prefix or fc, keys left unused)"""
    if find_backbone(state) is None:  # the layout is told by the keys, never by the file name
        raise CheckpointError(f"{label}: no ResNet found in this {what}; its keys: {few(state)}")
    layout, target, online = find_backbone(state)
    prefix = online if branch == "online" and online is not None else target
    fc = {prefix + "fc.weight", prefix + "fc.bias"}  # the ImageNet classifier: the U-Net has no use for it
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k not in fc}
    unused = [k for k in state if not k.startswith(prefix) or k in fc]
    return layout, prefix, online, backbone, unused


def load_backbone(source, in_chans=1, branch="target", trust=False, arch=None, flag=None, name=None):
    """any checkpoint holding a ResNet -> state dict for ARCHS[arch](in_chans) (no fc), checked.
    source: a path, a known name or an already loaded dict. branch: "target" or "online", for BYOL
    files. arch: None finds it from the tensor names; given, the file must hold that ResNet."""
    if branch not in ("target", "online"):
        raise ValueError(f"branch must be 'target' or 'online', not {branch!r}")
    label, name = describe(source, flag, name), describe(source, None, name)
    what, state, others = state_dict_of(read_checkpoint(source, trust, flag, name))
    layout, prefix, online, backbone, unused = split_backbone(state, label, what, branch)
    found = resnet_arch(backbone, exact=True)
    if arch and found and found != arch:
        raise CheckpointError(f"{label} holds a {found} backbone, not {arch}: pass --arch {found}")
    arch = arch or found or resnet_arch(backbone)
    with torch.device("meta"):
        model = ARCHS[arch](in_chans)
    notes = ""
    if not any(k.endswith("num_batches_tracked") for k in backbone):
        # legacy files predate this counter; BatchNorm ignores it when momentum is set, as here
        counters = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
        backbone.update({k: torch.zeros((), dtype=torch.long) for k in counters})
        notes += "; num_batches_tracked missing, set to 0"
    c = backbone["conv1.weight"].shape[1]
    if c != in_chans:
        backbone["conv1.weight"] = adapt_conv1(backbone["conv1.weight"], in_chans)
        rule = "summed" if in_chans == 1 else "repeated, rescaled"
        notes += f"; conv1 {c} -> {in_chans} channels ({rule})"
    check_state_dict(model, backbone, f"{label} as {arch}")
    where = f"'{prefix}*' " if prefix else ""
    side = f"{branch} branch" if online is not None else "single backbone"
    print(f"loaded {arch} backbone {where}({layout}, {what}) from {name} ({side}){notes}; "
          f"unused: {summarize_unused(unused, others)}")
    return backbone


def arch_of(source, trust=False, flag=None, name=None):
    """-> "resnet18", "resnet34" or "resnet50": the ResNet of a file holding a backbone or a U-Net,
    read from its tensor names (so a script can choose --arch by itself)"""
    label = describe(source, flag, name)
    what, state, _ = state_dict_of(read_checkpoint(source, trust, flag, name))
    _, prefix, _, backbone, _ = split_backbone(state, label, what)
    if (arch := resnet_arch(backbone, exact=True)) is None:
        raise CheckpointError(f"{label}: its ResNet ('{prefix}*') has the tensors of none of {', '.join(ARCHS)}")
    return arch


# -----------------------------------------------------------------------------
# U-Nets

def unet_args(state):
    """the UNet(...) arguments that a UNet state dict was made with, read from its tensors"""
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    return {"in_chans": state["encoder.conv1.weight"].shape[1],
            "num_classes": state["segmentation_head.0.weight"].shape[0], "arch": resnet_arch(encoder)}


def load_segmentation(source, trust=False, flag=None, name=None, in_chans=None, num_classes=None, arch=None):
    """the paper's Lightning checkpoint, a plain SMP Unet state dict, or this project's
    checkpoint.pt / best.pt -> state dict for UNet(**unet_args(state)), checked. in_chans,
    num_classes, arch: given, the U-Net must have them. flag, name: how messages name the file."""
    label, name = describe(source, flag, name), describe(source, None, name)
    what, state, others = state_dict_of(read_checkpoint(source, trust, flag, name))
    if "segmentation_head.0.weight" not in state and find_backbone(state) is not None:
        kind = f"a {find_backbone(state)[0]} state dict" if what == "state dict" else what
        raise CheckpointError(f"{label} holds a backbone ({kind}), not a fine-tuned U-Net: "
                              f"fine-tune it first with train_segment.py "
                              f"--weights {'FILE' if name == 'checkpoint dict' else name}")
    if "encoder.conv1.weight" not in state or "segmentation_head.0.weight" not in state:
        raise CheckpointError(f"{label}: no U-Net found in this {what}; its keys: {few(state)}")
    parts = ("encoder", "decoder", "segmentation_head")
    unet_state = {k: v for k, v in state.items() if k.split(".")[0] in parts}
    unused = [k for k in state if k not in unet_state]
    args = unet_args(unet_state)
    if in_chans not in (None, args["in_chans"]):  # what the caller needs, checked before any shape
        raise CheckpointError(f"{label} holds a U-Net with {args['in_chans']} input channels; this project "
                              f"segments {in_chans}-channel MRI")
    if num_classes not in (None, args["num_classes"]):
        needs = "ACDC has 4: background, RV, MYO, LV" if num_classes == 4 else f"the model has {num_classes}"
        raise CheckpointError(f"{label} holds a U-Net with {args['num_classes']} classes, {needs}")
    if arch not in (None, args["arch"]):
        raise CheckpointError(f"{label} holds a {args['arch']} U-Net, not {arch}: pass --arch {args['arch']}")
    with torch.device("meta"):  # a skeleton only, to check names and shapes against
        skeleton = UNet(**args)
    check_state_dict(skeleton, unet_state, label)
    print(f"loaded U-Net ({args['arch']}, {args['in_chans']} input channels, {args['num_classes']} classes; "
          f"{what}) from {name}; unused: {summarize_unused(unused, others)}")
    return unet_state


def load_weights(model, source, trust=False, flag=None, name=None):
    """--weights of fine-tuning: a segmentation checkpoint (one with a segmentation head) continues
    the whole U-Net `model`; any other initialises its encoder. -> what was loaded, in words"""
    name = describe(source, None, name)
    ckpt = read_checkpoint(source, trust, flag, name)
    in_chans = model.encoder.conv1.in_channels
    if "segmentation_head.0.weight" in state_dict_of(ckpt)[1]:
        model.load_state_dict(load_segmentation(ckpt, flag=flag, name=name, in_chans=in_chans, arch=model.arch,
                                                num_classes=model.segmentation_head[0].out_channels))
        return f"the whole U-Net from {name}"
    model.encoder.load_state_dict(load_backbone(ckpt, in_chans, arch=model.arch, flag=flag, name=name))
    return f"the encoder from {name}; decoder and head start from random weights"


def load_unet(source, trust=False, num_classes=4, flag=None, name=None):
    """a segmentation checkpoint -> (UNet with its weights, on the CPU, (mean, std, where they come
    from) of its input normalisation); its encoder, input channels and classes are read from the weights"""
    name = describe(source, None, name)
    ckpt = read_checkpoint(source, trust, flag, name)
    state = load_segmentation(ckpt, flag=flag, name=name, in_chans=1, num_classes=num_classes)
    model = UNet(**unet_args(state))
    model.load_state_dict(state)
    return model, normalisation.of_checkpoint(ckpt)
