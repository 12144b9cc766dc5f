"""phantom.py: the synthetic phantom's files, anatomy and determinism, and its command line."""
import base64
import functools
import json
import os
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest
import torch
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
def test_synth_command_and_montage(tmp_path, monkeypatch):
    monkeypatch.setattr(ph, "write_phantom", functools.partial(ph.write_phantom, **TINY))
    assert ph.main([str(tmp_path), "--patients", "2", "--seed", "3"]) == 0
    assert len(acdc.find_cases(str(tmp_path))) == 2 and not (tmp_path / "montage.png").exists()
    root = ET.parse(tmp_path / "montage.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    images = root.findall(f".//{ns}image")
    assert len(images) == 2 * 8  # a row a patient: three ED and one ES slice, each image and labels
    data = base64.b64decode(images[0].get("href").split(",", 1)[1])
    assert torchvision.io.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8)).shape == (3, 160, 160)
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert texts[0] == f"{tmp_path}: a synthetic phantom (not ACDC), its first 2 patients"
    assert {"RV", "MYO", "LV", "ED base", "ED base, labels", "ED near apex", "ES mid, labels"} <= set(texts)
    assert sum(t.startswith(("patient001: group ", "patient002: group ")) and "ES frame" in t for t in texts) == 2


def refused(capsys, *argv):
    """the one-line error of a phantom.py refused (exit 1)"""
    with pytest.raises(SystemExit) as e:
        ph.main([*argv])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code and not capsys.readouterr().out
    return e.value.code


def test_phantom_into_an_existing_folder(tmp_path, monkeypatch, capsys):
    root, marker = str(tmp_path / "p"), tmp_path / "p" / acdc.PHANTOM_MARKER
    write = functools.partial(ph.write_phantom, **TINY)
    write(root, patients=2, seed=0)
    assert json.loads(marker.read_text())["complete"] is True
    monkeypatch.setattr(ph, "write_phantom", lambda *a, **k: pytest.fail("wrote into an existing phantom"))
    assert ph.main([root, "--patients", "2", "--seed", "0"]) == 0  # the same phantom: nothing to write
    assert capsys.readouterr().out == f"{root} already holds this phantom (2 patients, seed 0): nothing written\n"
    assert "holds a phantom of 2 patients, seed 0: pass --overwrite" in refused(capsys, root, "--seed", "1")
    assert "a phantom of 2 patients" in refused(capsys, root, "--patients", "1", "--seed", "0")
    # a phantom.json from before the completion field: complete when every patient's five files are there
    marker.write_text(json.dumps({"patients": 2, "seed": 0}))
    assert ph.main([root, "--patients", "2", "--seed", "0"]) == 0 and "already holds" in capsys.readouterr().out
    os.remove(tmp_path / "p" / "training" / "patient002" / "patient002_frame01_gt.nii.gz")
    assert "holds no complete phantom" in refused(capsys, root, "--patients", "2", "--seed", "0")
    patient, stop = ph._phantom_patient, iter([ph._phantom_patient, lambda *a: 1 / 0])
    monkeypatch.setattr(ph, "_phantom_patient", lambda *a: next(stop)(*a))
    with pytest.raises(ZeroDivisionError):  # a write stopped in its second patient: "complete" stays false
        write(root, patients=2, seed=0)
    monkeypatch.setattr(ph, "_phantom_patient", patient)
    assert json.loads(marker.read_text())["complete"] is False
    assert "holds no complete phantom" in refused(capsys, root, "--patients", "2", "--seed", "0")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert refused(capsys, str(other)) == (f"error: {other} is not empty and holds no complete phantom: "
                                           "pass --overwrite to write over it, or choose another folder")
    monkeypatch.setattr(ph, "write_phantom", write)
    assert ph.main([str(other), "--patients", "1", "--overwrite"]) == 0 and (other / "montage.svg").exists()
    assert (other / "notes.txt").exists() and ph.phantom_in(str(other)) == (1, 0) and capsys.readouterr().out
    assert "a file is there" in refused(capsys, str(other / "notes.txt"))
