"""evaluate.py: the evaluation script end to end on a tiny phantom, with an untrained U-Net; its messages."""
import csv
import errno
import json
import os
import re
import xml.etree.ElementTree as ET

import nibabel as nib
import numpy as np
import pytest
import torch

import acdc
import normalisation  # noqa: E402
import evaluate as ev
import phantom
import precision
import training
import unet


# -----------------------------------------------------------------------------
# the script end to end, on a tiny phantom with an untrained U-Net

def test_main_end_to_end(tmp_path, capsys):

    data = tmp_path / "data"
    # 11 patients: the test split holds patients 1 and 11
    phantom.write_phantom(str(data), patients=11, seed=0, size_range=(28, 32), frames_range=(3, 4), slices_range=(3, 4))
    torch.manual_seed(0)
    model = unet.UNet(arch="resnet18")
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"kind": "segmentation", "model": model.state_dict(), "arch": "resnet18", "in_chans": 1,
                "num_classes": 4}, run / "best.pt")
    argv = ["--checkpoint", str(run / "best.pt"), "--data", str(data), "--split", "test", "--device", "cpu",
            "--workers", "0", "--min-size", "0", "--batch-size", "8"]
    precision.set_tf32(True, True)  # as an earlier run in this process (study.py) may leave it
    metrics = ev.main(ev.parse_args(argv))
    printed = capsys.readouterr().out
    # IEEE fp32 by default, the paper's scoring: TF32 off for the whole process, and metrics.json says so
    assert precision.tf32_state() == {"convolutions": False, "matmuls": False}
    assert (metrics["amp"], metrics["precision"]) == ("off", "fp32")
    precision.set_tf32(True, False)  # PyTorch's defaults again
    assert f"data: {data} (synthetic phantom, not ACDC)" in printed  # the data read, and what it is
    assert metrics["data"] == {"path": str(data), "synthetic_phantom": True}
    assert "the checkpoint's: stored in the checkpoint" in printed and metrics["normalisation"]["mean"] == normalisation.MEAN

    out = run / "eval-best-test"  # the default: beside the checkpoint, named after it and the split
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["cases"] == 2 and metrics["volumes"] == 4
    assert set(metrics["paper_slice_iou"]["per_class_iou"]) == {"BG", "RV", "MYO", "LV"}
    assert 0 <= metrics["paper_slice_iou"]["mean_iou_with_background"] <= 1
    for phase in ("ED", "ES"):
        for s in ("RV", "MYO", "LV"):
            assert set(metrics["challenge"][phase][s]) == {"dice", "hd", "hd95"}
    assert set(metrics["clinical"]) == {"LV_EDV", "LV_ESV", "LV_SV", "LV_EF", "RV_EDV", "RV_ESV", "RV_SV", "RV_EF",
                                        "MYO_mass"}
    # two patients: a correlation is undefined (any two points lie on a line)
    assert metrics["clinical"]["LV_EF"]["corr"] is None and metrics["clinical"]["LV_EF"]["bias"] is not None
    assert "  LV_EF            n/a" in printed

    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {(r["patient"], r["phase"]) for r in rows} == {("1", "ED"), ("1", "ES"), ("11", "ED"), ("11", "ES")}
    assert {"dice_LV", "hd_RV", "hd95_MYO", "vol_pred_LV", "vol_true_LV"} <= set(rows[0])
    dice_all = [float(r[f"dice_{s}"]) for r in rows for s in ("RV", "MYO", "LV")]
    assert metrics["mean_dice_structures"] == pytest.approx(sum(dice_all) / 12, abs=1e-5)

    for case in acdc.find_cases(str(data))[:1]:
        for frame in case.frames:
            source = nib.load(frame.image)
            pred = nib.load(out / f"patient001_frame{frame.frame:02d}_pred.nii.gz")
            assert np.allclose(pred.affine, source.affine) and pred.shape == source.shape
            values = np.asanyarray(pred.dataobj)
            assert values.dtype == np.uint8 and values.max() <= 3
    # a picture per patient: PNG tiles in an SVG, its title, a legend, a caption with the Dice per structure a row
    svg = ET.parse(out / "patient001.svg").getroot()
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    ed = next(r for r in rows if r["patient"] == "1" and r["phase"] == "ED")
    assert "patient001 (synthetic phantom): image | truth | prediction" in texts and {"RV", "MYO", "LV"} <= set(texts)
    assert any(t.startswith(f"ED (frame {ed['frame']}), slice ")  # the volume's Dice, not the slice's
               and f"; the volume's Dice RV {float(ed['dice_RV']):.3f}" in t for t in texts)
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}image")) % 3 == 0
    assert not list(out.glob("*.png"))

    with pytest.raises(SystemExit, match="--overwrite"):  # a finished evaluation is never overwritten silently
        ev.main(ev.parse_args(argv))


def test_project_errors_are_one_line(tmp_path):
    data = tmp_path / "data"
    phantom.write_phantom(str(data), patients=1, seed=0, size_range=(28, 32), frames_range=(3, 4), slices_range=(3, 3))
    truth = next(data.glob("training/patient001/*frame01_gt.nii.gz"))
    img = nib.load(truth)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj) + 5, img.affine), truth)  # labels outside 0..3
    torch.save({"kind": "segmentation", "model": unet.UNet(arch="resnet18").state_dict()}, tmp_path / "best.pt")
    argv = ["--checkpoint", str(tmp_path / "best.pt"), "--data", str(data), "--device", "cpu", "--workers", "1",
            "--min-size", "0"]
    with pytest.raises(SystemExit) as e:  # raised in a loader worker, still one line
        training.run_main(ev.main, ev.parse_args(argv))
    assert str(e.value.code).startswith(f"error: {truth}: label values [") and "\n" not in str(e.value.code)
    (tmp_path / "file").write_text("")
    for out, expected in [(tmp_path / "file", "a file is there"), (tmp_path / "file" / "sub", "is a file")]:
        with pytest.raises(SystemExit, match=f"error: --out {out}: .*{expected}"):
            ev.main(ev.parse_args(argv + ["--out", str(out)]))
    with pytest.raises(SystemExit, match=f"error: --out {tmp_path / 'x'}: no permission to write in {tmp_path}"):
        os_access = os.access
        try:  # tests may run as root, which may write anywhere
            os.access = lambda path, mode: False
            ev.main(ev.parse_args(argv + ["--out", str(tmp_path / "x")]))
        finally:
            os.access = os_access
    with pytest.raises(SystemExit, match="error: --data: .*no patientNNN folders"):
        ev.main(ev.parse_args(argv[:2] + ["--data", str(tmp_path), "--out", str(tmp_path / "y")]))


def failing_save(exception):
    """nibabel's save, cut short by a full disk or Ctrl-C after half a file"""
    def save(img, path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise exception
    return save


def test_a_full_disk_reaches_the_caller_and_ctrl_c_ends_in_one_line(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    phantom.write_phantom(str(data), patients=1, seed=0, size_range=(28, 32), frames_range=(3, 4), slices_range=(3, 3))
    torch.save({"kind": "segmentation", "model": unet.UNet(arch="resnet18").state_dict()}, tmp_path / "best.pt")
    out = tmp_path / "new" / "eval"
    args = ev.parse_args(["--checkpoint", str(tmp_path / "best.pt"), "--data", str(data), "--device", "cpu",
                          "--workers", "0", "--min-size", "0", "--out", str(out)])
    monkeypatch.setattr(nib, "save", failing_save(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(OSError) as e:  # evaluate.main lets it through: study.py stops on a full disk
        ev.main(args)
    assert re.fullmatch(f"{re.escape(str(out))}/patient001_frame\\d\\d_pred.nii.gz", e.value.filename)
    assert e.value.errno == errno.ENOSPC and os.listdir(out) == []  # the half file is gone

    monkeypatch.setattr(nib, "save", failing_save(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        training.run_main(ev.main, args)
    assert e.value.code == 130 and capsys.readouterr().err.splitlines()[-1] == "stopped: interrupted (Ctrl-C)"
    assert not (tmp_path / "new").exists()  # nor the folders it made and left empty


def test_flags_are_checked_at_parse_time(capsys):
    for flag, value, expected in [("--batch-size", "0", "expected an integer >= 1"),
                                  ("--min-size", "-1", "expected an integer >= 0"),
                                  ("--workers", "x", "expected an integer >= 0"),
                                  ("--norm", "1,0", "expected checkpoint, published, paper or MEAN,STD")]:
        with pytest.raises(SystemExit) as e:
            ev.parse_args(["--checkpoint", "c.pt", "--data", "d", flag, value])
        last = capsys.readouterr().err.splitlines()[-1]  # argparse: the usage, then one line
        assert e.value.code == 2 and flag in last and expected in last
    assert ev.parse_args(["--checkpoint", "c.pt", "--data", "d", "--norm", "10,20"]).norm == (10.0, 20.0)
    with pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert "(default: 32)" in text and "(default: checkpoint)" in text and "(default: off)" in text  # --resample
    assert 'that phantom.py wrote say "synthetic phantom".' in text  # the whole description, not its first line
