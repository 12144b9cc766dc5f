"""hubconf.py through torch.hub, offline from local files; README's "Use from Python" snippet, run as printed."""
import os
import re

import nibabel as nib
import numpy as np
import torch

import phantom
import resnet
import unet
import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_best(path, arch="resnet18"):
    """an untrained U-Net saved as train_segment.py saves best.pt"""
    model = unet.UNet(arch=arch)
    torch.save({"kind": "segmentation", "model": model.state_dict(), "arch": arch, "in_chans": 1, "num_classes": 4,
                "mean": 10.0, "std": 20.0, "train_spacing": {"in_plane": [1.2, 1.9], "between_slices": [5.0, 10.0]}},
               path)
    return model.eval()


def test_torch_hub_loads_the_resnets_and_the_unet_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_MEDSEG_OFFLINE", "1")  # nothing is downloaded
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)  # the repository is named by its path, not found from the working directory
    fresh = torch.hub.load(ROOT, "resnet18", source="local")
    assert isinstance(fresh, resnet.ResNet) and fresh.conv1.in_channels == 1
    assert not fresh.layer1[0].bn2.weight.any()  # timm's initialisation: zero_init_last
    # weights: a name of weights.py, here found in torch's cache (or a path); the 1-channel conv1 repeated for 3
    os.makedirs(weights.cache_dir())
    torch.save(fresh.state_dict(), os.path.join(weights.cache_dir(), "byol_acdc_backbone_last.pth"))
    loaded = torch.hub.load(ROOT, "resnet18", weights="byol_acdc_backbone_last.pth", in_chans=3, source="local")
    assert loaded.conv1.in_channels == 3
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in loaded.state_dict().items() if k != "conv1.weight")

    model = save_best(tmp_path / "best.pt")
    hub = torch.hub.load(ROOT, "unet", checkpoint=str(tmp_path / "best.pt"), source="local")
    assert not hub.training and next(hub.parameters()).device.type == "cpu" and (hub.mean, hub.std) == (10.0, 20.0)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hub(x), model(x), atol=1e-5)


def test_readme_snippet_segments_a_volume(tmp_path, monkeypatch):
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("\n## Use from Python\n", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)[1]
    monkeypatch.chdir(tmp_path)  # the snippet's paths: the quickstart's phantom and model
    phantom.write_phantom("data/acdc-synth", patients=1, seed=0, size_range=(28, 32), frames_range=(3, 3),
                          slices_range=(2, 2))
    os.makedirs("runs/quickstart")
    save_best("runs/quickstart/best.pt")
    exec(snippet, {})
    source = nib.load("data/acdc-synth/training/patient001/patient001_frame01.nii.gz")
    labels = nib.load("patient001_frame01_pred.nii.gz")
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine)
    assert labels.get_data_dtype() == np.uint8 and np.asanyarray(labels.dataobj).max() <= 3
