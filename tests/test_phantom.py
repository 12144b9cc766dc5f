"""phantom.py: the synthetic phantom's files, anatomy and determinism, and its command line."""
import os

import nibabel as nib
import numpy as np
import pytest
import torchvision

import acdc
import phantom as ph
from test_acdc import TINY


def test_phantom_files(phantom):
    case = acdc.find_cases(phantom)[0]
    image = nib.load(case.frames[0].image)
    assert image.get_data_dtype() in (np.int16, np.float32)
    assert nib.load(case.frames[0].label).get_data_dtype() == np.uint8
    spacing = image.header.get_zooms()
    assert np.allclose(np.diag(image.affine)[:3], spacing) and 1.2 <= spacing[0] <= 1.9 and 5 <= spacing[2] <= 10
    cine = acdc.read_volume(case.cine, ndim=4).data
    ed, es = (acdc.read_volume(f.image).data for f in case.frames)
    assert np.array_equal(cine[..., case.ed - 1], ed) and np.array_equal(cine[..., case.es - 1], es)
    ed_label, es_label = (acdc.read_label(f.label).data for f in case.frames)
    assert set(np.unique(ed_label)) == {0, 1, 2, 3}
    assert (es_label == 3).sum() < (ed_label == 3).sum()  # the LV contracts
    lv, rv = (np.mean(ed[ed_label == k]) for k in (3, 1))
    assert lv > 2 * np.mean(ed[ed_label == 2]) and rv > 2 * np.mean(ed[ed_label == 2])  # bright pools, dark muscle


def test_phantom_is_deterministic(phantom, tmp_path):
    ph.write_phantom(str(tmp_path / "a"), patients=2, seed=0, **TINY)
    ph.write_phantom(str(tmp_path / "b"), patients=1, seed=1, **TINY)
    for name in ("patient002_4d.nii.gz", "patient002_frame01_gt.nii.gz"):
        a = nib.load(tmp_path / "a" / "training" / "patient002" / name).get_fdata()
        assert np.array_equal(a, nib.load(os.path.join(phantom, "training", "patient002", name)).get_fdata())
    a, b = (nib.load(tmp_path / d / "training" / "patient001" / "patient001_4d.nii.gz") for d in "ab")
    assert a.shape != b.shape or not np.array_equal(a.get_fdata(), b.get_fdata())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's PNG decoder, used here as the oracle
def test_synth_command_and_montage(tmp_path):
    assert ph.main([str(tmp_path), "--patients", "2", "--seed", "3"]) == 0
    assert len(acdc.find_cases(str(tmp_path))) == 2
    montage = torchvision.io.decode_png(torchvision.io.read_file(str(tmp_path / "montage.png")))
    assert montage.shape == (3, 2 * 160, 8 * 160)
