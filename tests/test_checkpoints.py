"""Tests for checkpoints.py: every published layout (checkpoints.py's docstring)
and this project's own files, built with real key names and random values; conv1 adaptation;
clear errors; and the safe loader, which must never run code from a file unless trusted.
Run: python -m pytest tests/test_checkpoints.py"""
import json
import os
import random
import sys
import types
import typing
import zipfile
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import resnet  # noqa: E402
import acdc  # noqa: E402
import normalisation  # noqa: E402
from checkpoints import CheckpointError, adapt_conv1, load_backbone, load_segmentation, read_checkpoint  # noqa: E402
from checkpoints import arch_of, load_unet, load_weights, unet_args  # noqa: E402
from unet import UNet  # noqa: E402

# the reference key list (names and shapes of the published files), as the original code wrote them
with open(os.path.join(HERE, "data", "checkpoint_keys.json")) as f:
    KEYS = json.load(f)


def random_state(shapes, seed):
    """name -> random tensor of that shape (BatchNorm counters as integers)"""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(1, 100, s, generator=g) if k.endswith("num_batches_tracked")
            else torch.randn(s, generator=g) for k, s in shapes.items()}


def resnet18_state(seed, in_chans, fc=False):
    with torch.device("meta"):
        model = resnet.resnet18(in_chans, num_classes=1000 if fc else 0)
    return random_state({k: v.shape for k, v in model.state_dict().items()}, seed)


def prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def without_counters(state):
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


MLP = {"0.weight": [8, 4], "0.bias": [8], "1.weight": [8], "3.weight": [2, 8], "3.bias": [2]}  # tiny heads
OPTIMIZER = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1, 2]}]}


def build(fmt, target, online):
    """a checkpoint of layout `fmt` around the backbones `target` (and `online`, for BYOL files)"""
    head = random_state(MLP, 9)
    if fmt == "imagenet":  # supervised ImageNet: flat, with the classifier
        return target
    if fmt == "yaox12":  # resnet50_byol_imagenet2012.pth.tar: legacy, DataParallel names, no counters
        return {"online_backbone": prefixed("module.", without_counters(online)),
                "target_backbone": prefixed("module.", without_counters(target)),
                "online_projection": prefixed("module.", head), "predictor": prefixed("module.", head),
                "optimizer": OPTIMIZER, "config": {"model": {"base_momentum": 0.99}}}
    solo = {**prefixed("backbone.", online), **prefixed("momentum_backbone.", target),
            **prefixed("projector.", head), **prefixed("momentum_projector.", head),
            **prefixed("predictor.", head), "classifier.weight": torch.randn(3, 4), "classifier.bias": torch.randn(3)}
    if fmt == "solo_ckpt":  # byol-imagenet-acdc-ep=34.ckpt
        return {"state_dict": solo, "epoch": 34, "global_step": 1000, "optimizer_states": [OPTIMIZER],
                "lr_schedulers": [{"last_epoch": 3}], "hyper_parameters": {"lr": 1.0, "method": "byol"}}
    if fmt == "solo_pth":  # byol-imagenet-acdc-ep=25.pth
        return solo
    if fmt == "plain":  # byol_acdc_backbone_last.pth, and this project's RUN/backbone.pth
        return target
    if fmt == "project_byol":  # this project's pretraining RUN/checkpoint.pt
        model = {**prefixed("backbone.", online), **prefixed("projector.", head), **prefixed("predictor.", head),
                 **prefixed("target_backbone.", target), **prefixed("target_projector.", head)}
        return {"kind": "byol", "model": model, "optimizer": OPTIMIZER, "scaler": {}, "epoch": 1, "step": 10,
                "rng": {"torch": torch.get_rng_state()}, "config": {"arch": "resnet18"}}
    decoder = {"decoder.blocks.0.conv1.0.weight": torch.randn(4, 4, 3, 3), "segmentation_head.0.bias": torch.randn(4)}
    if fmt == "project_segmentation":  # this project's segmentation RUN/best.pt
        return {"kind": "segmentation", "model": {**prefixed("encoder.", target), **decoder},
                "arch": "resnet18", "in_chans": 1, "num_classes": 4, "epoch": 3, "config": {}}
    if fmt in ("paper_segmentation", "paper_segmentation_timm"):  # the paper's fine-tuned U-Net (Lightning)
        encoder = "model.encoder.model." if fmt.endswith("timm") else "model.encoder."
        return {"state_dict": {**prefixed(encoder, target), **prefixed("model.", decoder)},
                "epoch": 99, "global_step": 5, "hyper_parameters": {"config": {"lr": 0.001}}}
    raise ValueError(fmt)


# format -> (conv1 input channels stored, holds an online branch too)
FORMATS = {"imagenet": (3, False), "yaox12": (3, True), "solo_ckpt": (1, True), "solo_pth": (1, True),
           "plain": (1, False), "project_byol": (1, True), "project_segmentation": (1, False),
           "paper_segmentation": (1, False), "paper_segmentation_timm": (1, False)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_layout_loads_the_right_backbone(fmt, tmp_path, capsys):
    stored_chans, two_branches = FORMATS[fmt]
    target = resnet18_state(1, stored_chans, fc=(fmt == "imagenet"))
    online = resnet18_state(2, stored_chans)
    path = tmp_path / "weights.pth"
    torch.save(build(fmt, target, online), path)

    branches = ["target", "online"] if two_branches else ["target"]
    for branch, expected in zip(branches, [target, online]):
        state = load_backbone(path, in_chans=1, branch=branch)
        line = capsys.readouterr().out.strip()
        model = resnet.resnet18(in_chans=1)
        model.load_state_dict(state, strict=True)
        # every value comes from the chosen branch (conv1 after its adaptation)
        for k, v in model.state_dict().items():
            if fmt == "yaox12" and k.endswith("num_batches_tracked"):  # legacy, not stored: zeros
                assert v == 0
            else:
                assert torch.equal(v, adapt_conv1(expected[k], 1) if k == "conv1.weight" else expected[k]), k
        side = f"({branch} branch)" if two_branches else "(single backbone)"
        assert line.startswith("loaded resnet18 backbone ") and f" from {path} {side}" in line
        assert "; unused: " in line and line.count("\n") == 0
    if fmt == "imagenet":
        assert "fc (2 tensors)" in line and "conv1 3 -> 1 channels (summed)" in line
    if fmt == "yaox12":
        assert "num_batches_tracked missing, set to 0" in line
    if fmt == "solo_ckpt":
        assert "projector (5 tensors)" in line and "optimizer_states" in line and "hyper_parameters" in line


def test_exact_resnet50_imagenet_keys():
    """the reference list itself: 320 names of torchvision/timm's ResNet50, fc included"""
    imagenet = random_state(KEYS["resnet50_imagenet_3ch_with_fc"], 0)
    state = load_backbone(imagenet, in_chans=1)
    assert set(state) == set(imagenet) - {"fc.weight", "fc.bias"} and len(state) == 318
    assert torch.equal(state["conv1.weight"], imagenet["conv1.weight"].sum(1, keepdim=True))
    resnet.resnet50(in_chans=1).load_state_dict(state, strict=True)


def test_adapt_conv1():
    w = torch.randn(64, 3, 7, 7)
    assert adapt_conv1(w, 3) is w
    assert torch.equal(adapt_conv1(w, 1), w.sum(1, keepdim=True))  # the paper: summed over RGB
    # timm: repeat the kernels, cut to in_chans, rescale by C / in_chans
    assert torch.allclose(adapt_conv1(w, 2), w[:, [0, 1]] * 1.5)
    assert torch.allclose(adapt_conv1(w, 5), w[:, [0, 1, 2, 0, 1]] * 0.6)
    assert torch.allclose(adapt_conv1(w[:, :1], 3), w[:, [0, 0, 0]] / 3)
    # why summing is right: a grey image (R = G = B) gets the response the RGB network gave it
    grey = torch.randn(2, 1, 32, 32)
    assert torch.allclose(F.conv2d(grey, adapt_conv1(w, 1)), F.conv2d(grey.repeat(1, 3, 1, 1), w), atol=1e-4)
    assert adapt_conv1(w.half(), 1).dtype == torch.half


def test_conv1_to_two_channels(capsys):
    imagenet = resnet18_state(0, 3, fc=True)
    state = load_backbone(imagenet, in_chans=2)
    assert torch.allclose(state["conv1.weight"], imagenet["conv1.weight"][:, [0, 1]] * 1.5)
    assert "conv1 3 -> 2 channels (repeated, rescaled)" in capsys.readouterr().out


def test_bad_branch_and_wrong_arch():
    with pytest.raises(ValueError, match="branch"):
        load_backbone(resnet18_state(0, 1), branch="momentum")
    with pytest.raises(CheckpointError) as err:
        load_backbone(resnet18_state(0, 1), arch="resnet50", flag="--init", name="r18.pth")
    assert str(err.value) == "--init r18.pth holds a resnet18 backbone, not resnet50: pass --arch resnet18"


def test_unknown_format_lists_keys():
    with pytest.raises(CheckpointError, match="no ResNet found .*weird.weight, other.bias"):
        load_backbone({"weird.weight": torch.zeros(2), "other.bias": torch.zeros(2)})


def test_wrong_shape_names_key_and_shapes():
    state = resnet18_state(0, 1)
    state["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    with pytest.raises(CheckpointError) as err:
        load_backbone(state)
    assert "layer2.0.conv1.weight" in str(err.value)
    assert "[128, 32, 3, 3]" in str(err.value) and "[128, 64, 3, 3]" in str(err.value)


def test_missing_key_is_listed():
    state = resnet18_state(0, 1)
    del state["layer4.1.bn2.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 \(layer4.1.bn2.weight\)"):
        load_backbone(state)


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file, and not a known name"):
        read_checkpoint(tmp_path / "nothing.pth")
    good = tmp_path / "good.pth"
    torch.save(resnet18_state(0, 1), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100_000])
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    for path in (truncated, text, listing):
        with pytest.raises(CheckpointError, match=str(path)):
            read_checkpoint(path)


def test_torch_older_than_2_6_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(CheckpointError, match="torch >= 2.6"):
        read_checkpoint(tmp_path / "any.pth")


class Payload:
    """a pickle that, when unpickled by the full unpickler, runs code (here: creates a file)"""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_malicious_pickle_never_runs_without_trust(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Payload(marker)}, path)
    for load in (read_checkpoint, load_backbone):
        with pytest.raises(CheckpointError, match="--trust-checkpoint") as err:
            load(path)
        assert str(path) in str(err.value)
        assert not marker.exists()
    # the control: the payload is live, and trust=True really means the full unpickler
    read_checkpoint(path, trust=True)
    assert marker.exists()


class System:
    """a pickle that calls os.system (posix.system here) when the full unpickler reads it"""

    def __reduce__(self):
        return os.system, ("true",)


def test_refused_objects_are_named_with_what_to_do_if_trusted(tmp_path):
    """torch's reason, the first object it does not allow, reaches the message: not 'damaged'"""
    blocked = f"{os.system.__module__}.system"
    for name, legacy in (("zip.pth", False), ("legacy.pth", True)):  # torch.save's archive, a bare pickle
        path = tmp_path / name
        torch.save({"weight": torch.zeros(1), "payload": System()}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path, flag="--weights")
        assert str(err.value) == (
            f"--weights {path}: holds objects that the safe loader (torch.load weights_only=True) does not allow "
            f"(the first: {blocked}): unpickling them could run code stored in the file; if you trust where it "
            f"came from, pass --trust-checkpoint")


class Hyper:
    """an object of some other library inside hyper_parameters"""

    def __init__(self, lr):
        self.lr = lr


def save_as(ckpt, path, *fakes):
    """torch.save with each class of `fakes`, (cls, "module.Name"), pretending to live in a library that is
    not installed here"""
    old = {cls: (cls.__module__, cls.__qualname__) for cls, _ in fakes}
    added = []
    for cls, where in fakes:
        module, name = where.rsplit(".", 1)
        parts = module.split(".")
        for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if p not in sys.modules:
                sys.modules[p] = types.ModuleType(p)
                added.append(p)
        setattr(sys.modules[module], name, cls)
        cls.__module__, cls.__qualname__ = module, name
    try:
        torch.save(ckpt, path)
    finally:
        for cls, (module, name) in old.items():
            cls.__module__, cls.__qualname__ = module, name
        for p in added:
            del sys.modules[p]


def test_lightning_hyper_parameters_load_safely_without_lightning(tmp_path):
    """Lightning stores hyper_parameters as its AttributeDict, and configs as OmegaConf objects: without
    those libraries and without trust, inert stand-ins take their place and the tensors load"""
    class AttributeDict(dict):
        pass
    target, online = resnet18_state(1, 1), resnet18_state(2, 1)
    path = tmp_path / "byol.ckpt"
    ckpt = build("solo_ckpt", target, online)
    ckpt["hyper_parameters"] = AttributeDict(lr=1.0, method="byol")
    save_as(ckpt, path, (AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"))
    state = load_backbone(path)
    assert torch.equal(state["layer1.0.conv1.weight"], target["layer1.0.conv1.weight"])
    assert read_checkpoint(path)["hyper_parameters"]["lr"] == 1.0


def test_objects_of_other_modules_still_need_trust(tmp_path):
    path = tmp_path / "other.ckpt"
    save_as({"state_dict": {}, "hyper_parameters": Hyper(0.5)}, path, (Hyper, "some_library.config.Hyper"))
    with pytest.raises(CheckpointError, match=f"{path}.*--trust-checkpoint"):
        read_checkpoint(path)


def test_yaox12_saved_without_dataparallel_loads_both_branches(tmp_path):
    target, online = resnet18_state(1, 3), resnet18_state(2, 3)
    path = tmp_path / "byol_no_module.pth.tar"
    torch.save({"online_backbone": online, "target_backbone": target, "config": {}}, path)
    for branch, expected in (("target", target), ("online", online)):
        state = load_backbone(path, in_chans=3, branch=branch)
        assert torch.equal(state["layer1.0.conv1.weight"], expected["layer1.0.conv1.weight"]), branch


# -----------------------------------------------------------------------------
# U-Nets

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
    with pytest.raises(CheckpointError, match="no U-Net found in this state dict; its keys: weird"):
        load_segmentation({"weird": torch.zeros(1)})


# -----------------------------------------------------------------------------
# messages name the file and the flag it came from, and say what to do

def test_another_arch_says_which_to_pass(tmp_path):
    backbone, unet = tmp_path / "r18.pth", tmp_path / "unet18.pth"
    torch.save(resnet18_state(0, 1), backbone)
    torch.save(UNet(arch="resnet18").state_dict(), unet)
    net = UNet(arch="resnet34")
    with pytest.raises(CheckpointError) as err:
        load_weights(net, backbone, flag="--weights")
    assert str(err.value) == f"--weights {backbone} holds a resnet18 backbone, not resnet34: pass --arch resnet18"
    with pytest.raises(CheckpointError) as err:
        load_weights(net, unet, flag="--weights")
    assert str(err.value) == f"--weights {unet} holds a resnet18 U-Net, not resnet34: pass --arch resnet18"


def test_arch_of_reads_the_resnet_from_the_tensor_names(tmp_path):
    for arch, make in resnet.ARCHS.items():
        with torch.device("meta"):  # names and shapes only
            backbone, unet = make(1).state_dict(), UNet(arch=arch).state_dict()
        assert arch_of(backbone) == arch
        assert arch_of({"kind": "segmentation", "model": unet}) == arch
        assert arch_of({**prefixed("backbone.", backbone), **prefixed("momentum_backbone.", backbone)}) == arch
    paper = {"model.encoder.model." + k: torch.empty(s, device="meta")  # the paper's U-Net, timm's encoder
             for k, s in KEYS["resnet50_imagenet_3ch_with_fc"].items() if not k.startswith("fc.")}
    assert arch_of({"state_dict": paper, "epoch": 3}) == "resnet50"
    path = tmp_path / "r18.pth"
    torch.save(resnet18_state(0, 3, fc=True), path)
    assert arch_of(path) == "resnet18"
    with pytest.raises(CheckpointError, match="--init x.pth: no ResNet found"):
        arch_of({"weird": torch.zeros(1)}, flag="--init", name="x.pth")
    cut = {k: v for k, v in resnet18_state(0, 1).items() if not k.startswith("layer4.")}
    with pytest.raises(CheckpointError, match="has the tensors of none of resnet18, resnet34, resnet50"):
        arch_of(cut)


def test_unet_of_other_channels_or_classes_is_told_in_words(tmp_path):
    rgb, binary = tmp_path / "rgb.pth", tmp_path / "binary.pth"
    torch.save(UNet(in_chans=3, arch="resnet18").state_dict(), rgb)  # a plain SMP-style state dict
    torch.save(UNet(num_classes=2, arch="resnet18").state_dict(), binary)
    net = UNet(arch="resnet18")
    for flag, load in (("--weights", lambda p: load_weights(net, p, flag="--weights")),
                       ("--checkpoint", lambda p: load_unet(p, flag="--checkpoint"))):
        with pytest.raises(CheckpointError) as err:
            load(rgb)
        assert str(err.value) == f"{flag} {rgb} holds a U-Net with 3 input channels; this project segments 1-channel MRI"
        with pytest.raises(CheckpointError) as err:
            load(binary)
        assert str(err.value) == f"{flag} {binary} holds a U-Net with 2 classes, ACDC has 4: background, RV, MYO, LV"


def test_backbone_where_a_unet_is_needed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(build("project_byol", resnet18_state(1, 1), resnet18_state(2, 1)), path)
    with pytest.raises(CheckpointError) as err:
        load_unet(path, flag="--checkpoint")
    assert str(err.value) == (f"--checkpoint {path} holds a backbone (this project's byol checkpoint), not a fine-tuned "
                              f"U-Net: fine-tune it first with train_segment.py --weights {path}")
    with pytest.raises(CheckpointError, match=r"^b.pth holds a backbone \(a ResNet state dict\), not a fine-tuned U-Net"):
        load_segmentation(resnet18_state(0, 1), name="b.pth")


def test_files_that_are_not_checkpoints_are_told_so(tmp_path):
    archive = tmp_path / "models.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("models/a.pth", "not this")
    files = {"notes.pth": b"these are not weights\n", "picture.pth": b"\x89PNG\r\n\x1a\n" + bytes(100),
             "noise.pth": b"\x00" + random.Random(0).randbytes(1000), "pickle.pth": b"\x80\x02" + bytes(range(7, 99))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name, says in (("notes.pth", "(it starts with b'these are not we', not a zip archive)"), ("picture.pth", "b'\\x89PNG"),
                       ("noise.pth", "not a zip archive"), ("pickle.pth", "a damaged one (Unsupported operand 7)"),
                       ("models.zip", "(a zip archive of models/a.pth)")):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(tmp_path / name, flag="--weights")
        message = str(err.value)
        assert message.startswith(f"--weights {tmp_path / name}: not a PyTorch checkpoint") and says in message
        assert "--trust-checkpoint" not in message and "\n" not in message


# OmegaConf's classes as they pickle (omegaconf 2.x): a DictConfig's state holds {key: node} under _content,
# a ListConfig's [node, ...]; a value node's state holds the value under _val; every node links its parent
# and its metadata (a dataclass naming types: typing.Any, dict; a defaultdict as resolver cache)
class ContainerMetadata:
    def __init__(self, key):
        self.ref_type, self.object_type, self.optional, self.key = typing.Any, dict, True, key
        self.flags, self.flags_root, self.resolver_cache = {}, False, defaultdict(dict, {"now": {}})
        self.key_type, self.element_type = typing.Any, typing.Any


class AnyNode:
    def __init__(self, value, parent, key):
        self._metadata, self._parent, self._val = ContainerMetadata(key), parent, value


class DictConfig:
    def __init__(self, content, parent=None, key=None):
        self._metadata, self._parent = ContainerMetadata(key), parent
        self._content = {k: node(v, self, k) for k, v in content.items()}


class ListConfig:
    def __init__(self, content, parent, key):
        self._metadata, self._parent = ContainerMetadata(key), parent
        self._content = [node(v, self, i) for i, v in enumerate(content)]


def node(value, parent, key):
    kind = DictConfig if isinstance(value, dict) else ListConfig if isinstance(value, list) else AnyNode
    return kind(value, parent, key)


def test_omegaconf_config_reads_as_plain_values_without_omegaconf(tmp_path):
    class AttributeDict(dict):
        pass
    config = {"norm_max_pixel_value": 1, "lr": 1e-4, "augment": {"crop": 224, "flip": True, "name": None},
              "classes": ["RV", "MYO", {"LV": 3}]}
    target = resnet18_state(1, 1)
    ckpt = build("solo_ckpt", target, resnet18_state(2, 1))
    ckpt["hyper_parameters"] = AttributeDict(config=DictConfig(config), lr=1e-4)
    path = tmp_path / "byol-imagenet-acdc-ep=34.ckpt"
    omegaconf = ((DictConfig, "omegaconf.dictconfig.DictConfig"), (ListConfig, "omegaconf.listconfig.ListConfig"),
                 (AnyNode, "omegaconf.nodes.AnyNode"), (ContainerMetadata, "omegaconf.base.ContainerMetadata"))
    save_as(ckpt, path, (AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"), *omegaconf)
    assert "omegaconf.dictconfig.DictConfig" in torch.serialization.get_unsafe_globals_in_checkpoint(path)

    loaded = read_checkpoint(path)  # no omegaconf installed, nothing trusted
    assert loaded["hyper_parameters"] == {"config": config, "lr": 1e-4}
    assert normalisation.of_checkpoint(loaded) == (normalisation.MEAN, normalisation.STD, "ACDC's statistics x 1, the checkpoint's config")
    assert torch.equal(load_backbone(path)["layer1.0.conv1.weight"], target["layer1.0.conv1.weight"])
    # the stand-ins never let code through: a payload beside the config is still refused
    ckpt["payload"] = Payload(tmp_path / "code_ran")
    save_as(ckpt, path, (AttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict"), *omegaconf)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        read_checkpoint(path)
    assert not (tmp_path / "code_ran").exists()


def test_a_best_pt_lists_as_unused_only_what_no_reader_takes(tmp_path, capsys):
    torch.save({"kind": "segmentation", "model": UNet(arch="resnet18").state_dict(), "epoch": 3, "val": {},
                "arch": "resnet18", "in_chans": 1, "num_classes": 4, "mean": 60.0, "std": 80.0,
                "train_spacing": {}, "config": {}}, tmp_path / "best.pt")
    model, (mean, std, source) = load_unet(str(tmp_path / "best.pt"))
    assert (mean, std) == (60.0, 80.0)  # read: not unused; nor are kind and train_spacing (predict.py's)
    assert capsys.readouterr().out.strip().endswith("unused: epoch, val, arch, in_chans, num_classes, config")
