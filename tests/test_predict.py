"""predict.py: new scans segmented as evaluate.py segments them; cines, ED/ES, the tables, bad files, flags."""
import csv
import errno
import json
import os
import shutil
import types
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest
import torch

import acdc
import checkpoints
import normalisation  # noqa: E402
import evaluate
import files
import metrics
import phantom
import predict
import training
import unet
from test_evaluate import failing_save

VOLUMES_HEADER = "file,frame,spacing_x,spacing_y,spacing_z,slices,RV_ml,MYO_ml,LV_ml"
INDICES_HEADER = ("case,ed_frame,es_frame,ed_es_source,LV_EDV,LV_ESV,LV_SV,LV_EF,RV_EDV,RV_ESV,RV_SV,RV_EF,"
                  "MYO_mass_g")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """a one-patient phantom (patient 1: the test split) and an untrained U-Net saved as best.pt"""
    root = tmp_path_factory.mktemp("predict")
    phantom.write_phantom(str(root / "data"), patients=1, seed=0, size_range=(28, 40), frames_range=(3, 4),
                          slices_range=(3, 4))
    torch.manual_seed(0)
    torch.save({"kind": "segmentation", "model": unet.UNet(arch="resnet18").state_dict(), "arch": "resnet18",
                "in_chans": 1, "num_classes": 4, "mean": normalisation.MEAN, "std": normalisation.STD,
                "train_spacing": {"in_plane": [1.2, 1.9], "between_slices": [5.0, 10.0]}}, root / "best.pt")
    return root, acdc.find_cases(str(root / "data"))[0]


def run(root, *argv):
    return predict.main(predict.parse_args(["--checkpoint", str(root / "best.pt"), "--device", "cpu",
                                            "--workers", "0", "--min-size", "0", *argv]))


def svg_of(path):
    """-> (the texts, the number of embedded pictures) of an SVG file"""
    root, ns = ET.parse(path).getroot(), "{http://www.w3.org/2000/svg}"
    return [t.text for t in root.iter(f"{ns}text")], len(root.findall(f".//{ns}image"))


def read_csv(path):
    with open(path) as f:
        return f.readline().strip(), list(csv.DictReader(f, VOLUMES_HEADER.split(",") if "volumes" in str(path)
                                                        else INDICES_HEADER.split(",")))


def test_plain_folder_matches_evaluate_and_bad_files_are_refused(setup, capsys):
    root, case = setup
    scored = evaluate.main(evaluate.parse_args(["--checkpoint", str(root / "best.pt"), "--data", str(root / "data"),
                                                "--out", str(root / "eval"), "--device", "cpu", "--workers", "0",
                                                "--min-size", "0"]))
    assert scored["resample"] == "off" and scored["per_volume"][0]["model_spacing_mm"] == \
        scored["per_volume"][0]["spacing_mm"] == list(nib.load(case.frames[0].image).header.get_zooms())
    scans = root / "scans"  # the images without their _gt files, a cine in a subfolder, and bad files
    (scans / "cine").mkdir(parents=True)
    for f in case.frames:
        shutil.copy(f.image, scans)
    shutil.copy(case.cine, scans / "cine")
    (scans / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), scans / "flat.nii")
    nib.save(nib.Nifti1Image(np.full((8, 8, 2), np.nan, np.float32), np.eye(4)), scans / "nan.nii.gz")
    (scans / "notes.txt").write_text("not an image: ignored")

    with pytest.raises(SystemExit) as e:  # the good files are written, the exit status says some were refused
        run(root, "-i", str(scans), "-o", str(root / "out"))
    assert str(e.value.code).startswith("error: 3 file(s) refused")
    err = capsys.readouterr().err
    summary = json.loads((root / "out" / "summary.json").read_text())
    refused = {r["file"]: r["reason"] for r in summary["refused"]}
    assert set(refused) == {str(scans / n) for n in ("broken.nii.gz", "flat.nii", "nan.nii.gz")}
    assert "cannot be read as NIfTI" in refused[str(scans / "broken.nii.gz")]
    assert "2D" in refused[str(scans / "flat.nii")] and "NaN" in refused[str(scans / "nan.nii.gz")]
    assert all(f"refused: {path}: " in err for path in refused)  # one line each, naming the file
    assert summary["normalisation"]["source"] == "the checkpoint's: stored in the checkpoint"
    assert len(summary["segmented"]) == 3 and not summary["synthetic_phantom"]  # the copies are plain files
    assert (summary["amp"], summary["precision"]) == ("off", "fp32")  # IEEE fp32 by default

    # the same label maps as evaluate.py's
    for f in case.frames:
        name = f"patient001_frame{f.frame:02d}_pred.nii.gz"
        ours, theirs = nib.load(root / "out" / name), nib.load(root / "eval" / name)
        assert np.array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
        assert np.allclose(ours.affine, nib.load(f.image).affine) and ours.get_data_dtype() == np.uint8
    # a cine gives a 4D label file; its ED frame is the ED volume's mask
    source, labels = nib.load(case.cine), nib.load(root / "out" / "cine" / "patient001_4d_pred.nii.gz")
    assert labels.shape == source.shape and len(labels.shape) == 4 and np.allclose(labels.affine, source.affine)
    ed_mask = np.asanyarray(nib.load(root / "out" / f"patient001_frame{case.ed:02d}_pred.nii.gz").dataobj)
    assert np.array_equal(np.asanyarray(labels.dataobj)[..., case.ed - 1], ed_mask)

    header, rows = read_csv(root / "out" / "volumes.csv")
    frames = source.shape[3]
    assert header == VOLUMES_HEADER and len(rows) == frames + 2  # a row per cine frame and per 3D volume
    cine_rows = [r for r in rows if r["file"] == "cine/patient001_4d.nii.gz"]
    assert [int(r["frame"]) for r in cine_rows] == list(range(1, frames + 1))
    assert float(cine_rows[0]["spacing_z"]) == pytest.approx(float(source.header.get_zooms()[2]))
    header, indices = read_csv(root / "out" / "indices.csv")
    assert header == INDICES_HEADER and len(indices) == 1  # no Info.cfg beside the cine: ED/ES from its LV curve
    lv = [float(r["LV_ml"]) for r in cine_rows]
    row = indices[0]
    assert row["ed_es_source"].startswith("predicted LV volume")
    assert (int(row["ed_frame"]), int(row["es_frame"])) == metrics.ed_es_frames(lv)
    assert float(row["LV_SV"]) == pytest.approx(float(row["LV_EDV"]) - float(row["LV_ESV"]), abs=1e-3)
    assert "ED " in (root / "out" / "cine" / "patient001_4d_volumes.svg").read_text()
    # the pictures say what they show: the file, ED and ES rows, the slices, the legend, the ejection fractions
    texts, pictures = svg_of(root / "out" / "cine" / "patient001_4d_slices.svg")
    assert texts[:2] == ["cine/patient001_4d.nii.gz", f"ejection fraction: LV {float(row['LV_EF']):.1f} %, RV "
                                                      f"{float(row['RV_EF']):.1f} %"]
    rows = {f"ED, frame {row['ed_frame']}", f"ES, frame {row['es_frame']}"}
    assert {"RV", "MYO", "LV", "prediction"} | rows <= set(texts)
    assert any(t.startswith("slice ") and t.endswith(f" of {source.shape[2]}") for t in texts) and pictures >= 4
    texts, pictures = svg_of(root / "out" / f"patient001_frame{case.ed:02d}_slices.svg")  # a 3D file of its own
    assert texts[0] == f"patient001_frame{case.ed:02d}.nii.gz" and "3D volume" in texts and pictures >= 2
    assert not list((root / "out").rglob("*.png"))

    with pytest.raises(SystemExit, match="--overwrite"):  # results are never overwritten silently
        run(root, "-i", str(scans / "cine"), "-o", str(root / "out"))


def test_acdc_patient_folder_with_tta(setup, capsys):
    root, case = setup
    summary = run(root, "-i", case.path, "-o", str(root / "acdc"), "--tta", "--norm", "10,20")
    assert "(synthetic phantom, not ACDC)" in capsys.readouterr().out
    assert summary["synthetic_phantom"] and summary["tta"] and summary["label_files_skipped"] == 2
    assert summary["normalisation"] == {"mean": 10.0, "std": 20.0, "source": "given with --norm"}
    for name in ("patient001_4d", f"patient001_frame{case.es:02d}"):  # flips change nothing in shape
        assert nib.load(root / "acdc" / f"{name}_pred.nii.gz").shape == nib.load(f"{case.path}/{name}.nii.gz").shape
    _, indices = read_csv(root / "acdc" / "indices.csv")
    assert [(r["case"], int(r["ed_frame"]), int(r["es_frame"]), r["ed_es_source"]) for r in indices] == \
        [("patient001", case.ed, case.es, "Info.cfg")]

    # without its cine, an ACDC patient folder is a case of its ED and ES frame files
    shutil.copytree(case.path, root / "no-cine" / "patient001", ignore=shutil.ignore_patterns("*_4d.nii*"))
    run(root, "-i", str(root / "no-cine"), "-o", str(root / "frames"), "--tta", "--norm", "10,20")
    _, frames = read_csv(root / "frames" / "indices.csv")
    assert frames == indices  # the same frames, the same volumes as the cine's
    texts, _ = svg_of(root / "frames" / "patient001" / "patient001_slices.svg")  # one picture for the case
    assert texts[0] == "patient001" and f"ES, frame {case.es}" in texts and texts[1].startswith("ejection fraction")
    assert not list((root / "frames").rglob("*frame*_slices.svg"))

    # a 3D volume alone: no case, so no indices.csv, and summary.json says why
    summary = run(root, "-i", case.frames[0].image, "-o", str(root / "one"))
    assert not (root / "one" / "indices.csv").exists() and summary["indices"].startswith("none: no cine")
    assert (root / "one" / f"patient001_frame{case.frames[0].frame:02d}_slices.svg").exists()


def test_flags_and_output_folder_are_checked_first(setup, tmp_path, capsys):
    root, case = setup
    with pytest.raises(SystemExit) as e:
        predict.parse_args(["--checkpoint", "c.pt", "-i", "x", "-o", "y", "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size: 0: expected an integer >= 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="error: -o/--out .*file: a file is there, not a folder"):
        run(root, "-i", case.cine, "-o", str(tmp_path / "file"))
    with pytest.raises(SystemExit, match="error: -i/--input: no NIfTI scan"):
        run(root, "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out"))


def scan(path):
    """a tiny 3D scan of random intensities, 1.5 mm pixels"""
    data = np.random.default_rng(0).random((16, 16, 2), np.float32) * 100
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 8.0, 1.0])), path)


def test_overwrite_replaces_only_what_predict_wrote(setup, tmp_path):
    root, _ = setup
    scan(tmp_path / "A.nii.gz")
    for _ in range(2):  # into the input folder, twice: the marked mask is replaced, never taken for a scan
        summary = run(root, "-i", str(tmp_path), "-o", str(tmp_path), "--overwrite")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["A.nii.gz", "A_pred.nii.gz", "A_slices.svg",
                                                                "summary.json", "volumes.csv"]
        assert [s["file"] for s in summary["segmented"]] == [str(tmp_path / "A.nii.gz")]
        assert sorted(summary["outputs"]) == ["A_pred.nii.gz", "A_slices.svg", "volumes.csv"]
    assert files.is_mask(tmp_path / "A_pred.nii.gz") and not files.is_mask(tmp_path / "A.nii.gz")

    for foreign in ("B_pred.nii.gz", "B_slices.svg", "volumes.csv"):  # a user's own file where an output goes: refused
        folder = tmp_path / foreign.replace(".", "-")
        folder.mkdir()
        scan(folder / "B.nii.gz")
        scan(folder / foreign) if foreign.endswith(".gz") else (folder / foreign).write_text("mine\n")
        before = (folder / foreign).read_bytes()
        with pytest.raises(SystemExit) as e:
            run(root, "-i", str(folder), "-o", str(folder), "--overwrite")
        source = folder / "B.nii.gz" if foreign.startswith("B") else "all inputs (the tables)"
        assert str(e.value.code).startswith(f"error: {folder / foreign}: not written by predict.py")
        assert f"the output of {source} would replace it" in e.value.code and "\n" not in e.value.code
        assert (folder / foreign).read_bytes() == before and len(list(folder.iterdir())) == 2


def test_linked_folders_are_followed_once(tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    scan(tmp_path / "real" / "sub" / "A.nii.gz")
    (tmp_path / "real" / "sub" / "loop").symlink_to(tmp_path / "real")  # a link to a folder above
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "linked").symlink_to(tmp_path / "real")
    found, refused, _ = predict.find_scans([str(tmp_path / "scans")], str(tmp_path / "out"))
    assert found == [(str(tmp_path / "scans" / "linked" / "sub" / "A.nii.gz"), os.path.join("linked", "sub", "A.nii.gz"))]
    assert not refused


def test_values_that_overflow_once_normalised_are_refused(setup, tmp_path):
    root, _ = setup
    scan(tmp_path / "A.nii.gz")  # intensities up to 100, divided by 1e-38: beyond float32
    with pytest.raises(SystemExit, match=f"refused, the first: {tmp_path / 'A.nii.gz'}: values overflow float32"):
        run(root, "-i", str(tmp_path / "A.nii.gz"), "-o", str(tmp_path / "out"), "--norm", "0,1e-38")


def test_a_full_disk_or_ctrl_c_ends_in_one_line_leaving_nothing(setup, tmp_path, monkeypatch, capsys):
    root, _ = setup
    (tmp_path / "scans" / "sub").mkdir(parents=True)
    scan(tmp_path / "scans" / "sub" / "A.nii.gz")
    out = tmp_path / "new" / "out"
    args = predict.parse_args(["--checkpoint", str(root / "best.pt"), "--device", "cpu", "--workers", "0",
                               "--min-size", "0", "-i", str(tmp_path / "scans"), "-o", str(out)])
    monkeypatch.setattr(nib, "save", failing_save(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(SystemExit) as e:
        training.run_main(predict.main, args)
    assert e.value.code == f"error: {out / 'sub' / 'A_pred.nii.gz'}: No space left on device"
    assert not (tmp_path / "new").exists()  # the half file and the folders made for it are gone

    monkeypatch.setattr(nib, "save", failing_save(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        training.run_main(predict.main, args)
    assert e.value.code == 130 and capsys.readouterr().err.splitlines()[-1] == "stopped: interrupted (Ctrl-C)"
    assert not (tmp_path / "new").exists()


def test_resampling_nifti2_and_header_warnings(setup, tmp_path, capsys, caplog):
    root, case = setup
    source = nib.load(case.frames[0].image)
    z = float(source.header.get_zooms()[2])
    scan = nib.Nifti2Image(np.asanyarray(source.dataobj), np.diag([0.7, 0.7, z, 1.0]))  # a finer scanner, NIfTI-2
    scan.header.set_qform(scan.affine, code=1)
    scan.header.set_sform(scan.affine, code=2)
    scan.header.set_xyzt_units("mm", "sec")
    nib.save(scan, tmp_path / "fine.nii")
    summary = run(root, "-i", str(tmp_path / "fine.nii"), "-o", str(tmp_path / "auto"))  # --resample auto
    [done] = summary["segmented"]
    assert done["spacing_mm"] == pytest.approx([0.7, 0.7, z]) and done["model_spacing_mm"] == pytest.approx([1.2, 1.2, z])
    assert done["warnings"] == ["resampled from 0.7 x 0.7 mm to 1.2 x 1.2 mm"]  # replaces the spacing warning
    assert f"{tmp_path / 'fine.nii'}: resampled from 0.7 x 0.7 mm to 1.2 x 1.2 mm" in capsys.readouterr().err
    out = nib.load(tmp_path / "auto" / "fine_pred.nii.gz")  # NIfTI-2 in, NIfTI-2 out, its header kept
    assert isinstance(out, nib.Nifti2Image) and out.shape == scan.shape and np.allclose(out.affine, scan.affine)
    assert (out.header["qform_code"], out.header["sform_code"], out.header.get_xyzt_units()) == (1, 2, ("mm", "sec"))

    # nibabel's own header warnings name the file: here a negative pixel size, which it reads as positive
    flipped = nib.Nifti1Image(np.asanyarray(source.dataobj), source.affine)
    flipped.header["pixdim"][1] = -1.5
    nib.save(flipped, tmp_path / "flipped.nii")
    assert predict.read_scan(str(tmp_path / "flipped.nii")).spacing[0] == 1.5
    said = [r.getMessage() for r in caplog.records if "pixdim" in r.getMessage()]
    assert said and all(m.startswith(f"warning: {tmp_path / 'flipped.nii'}: pixdim") for m in said)


def test_unknown_checkpoint_says_no_segmentation_model_is_published(setup, tmp_path):
    root, case = setup
    for name in ("bets.pt", "byol_acdc_backbone_last.pth"):  # a typo; a published backbone, never downloaded
        with pytest.raises(checkpoints.CheckpointError) as e:
            predict.main(predict.parse_args(["--checkpoint", name, "-i", case.cine, "-o", str(tmp_path / "o")]))
        assert str(e.value).startswith(f"--checkpoint {name}: no such file, and no segmentation model is published")
        assert "best.pt" in str(e.value) and "supervised_imagenet" not in str(e.value)  # no backbone names


def test_implausible_cine_is_warned_and_missing_values_read_n_a(setup, tmp_path, monkeypatch, capsys):
    """a cine far from the training pixel size whose prediction has no RV or MYO at ED and an LV that hardly
    contracts: each said in the console and summary.json; the RV EF, undefined, reads n/a, null, empty"""
    root, _ = setup
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 2, 3), np.float32),
                             np.diag([3.0, 3.0, 8.0, 1.0])), tmp_path / "fmri.nii")
    labels = torch.zeros(16, 16, 2, 3, dtype=torch.uint8)
    labels[:10, :10, 0] = 3  # an LV of 100 voxels in each frame,
    labels[0, :2, 0, 1:] = 0  # 98 in frames 2 and 3: ED frame 1, ES frame 2, EF 2 %
    trained = ({"in_plane": [1.2, 1.9], "between_slices": [5.0, 10.0]}, "stored in the checkpoint")
    model = types.SimpleNamespace(arch="resnet18", train_spacing=trained)  # no network: its labels are given
    monkeypatch.setattr(predict.inference, "load_model", lambda *a: (model, (0.0, 1.0, "stored in the checkpoint")))
    monkeypatch.setattr(predict.inference, "predict_volume", lambda *a: labels)
    run(root, "-i", str(tmp_path / "fmri.nii"), "-o", str(tmp_path / "out"), "--resample", "off")
    out, err = capsys.readouterr()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [done], [case] = summary["segmented"], summary["cases"]
    spacing, *found = done["warnings"]
    assert spacing.startswith("in-plane spacing 3 x 3 mm, far from the 1.2-1.9 mm")  # today's rule, kept
    assert found == ["no RV predicted at ED", "no MYO predicted at ED",
                     "LV EF 2.0 % lies outside the 10-90 % of a beating heart"]
    assert all(f"warning: {tmp_path / 'fmri.nii'}: {m}" in err for m in done["warnings"])
    assert "EF 2.0 %; RV EDV 0.0 mL, EF n/a; " in out and "nan" not in out
    texts, _ = svg_of(tmp_path / "out" / "fmri_slices.svg")
    assert texts[1] == "ejection fraction: LV 2.0 %, RV n/a"
    assert case["RV_EF"] is None and read_csv(tmp_path / "out" / "indices.csv")[1][0]["RV_EF"] == ""
