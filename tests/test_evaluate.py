"""evaluate.py: the evaluation script end to end on a tiny phantom, with an untrained U-Net."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torchvision

import acdc
import evaluate as ev
import phantom
import unet


# -----------------------------------------------------------------------------
# the script end to end, on a tiny phantom with an untrained U-Net

def test_main_end_to_end(tmp_path):

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
    ev.main(ev.parse_args(argv))

    out = run / "eval-test"  # the default: beside the checkpoint
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["cases"] == 2 and metrics["volumes"] == 4
    assert set(metrics["paper_slice_iou"]["per_class_iou"]) == {"BG", "RV", "MYO", "LV"}
    assert 0 <= metrics["paper_slice_iou"]["mean_iou_with_background"] <= 1
    for phase in ("ED", "ES"):
        for s in ("RV", "MYO", "LV"):
            assert set(metrics["challenge"][phase][s]) == {"dice", "hd", "hd95"}
    assert set(metrics["clinical"]) == {"LV_EDV", "LV_ESV", "LV_EF", "RV_EDV", "RV_ESV", "RV_EF", "MYO_mass"}

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
    for patient in (1, 11):
        picture = torchvision.io.read_image(str(out / f"patient{patient:03d}.png"))
        assert picture.shape[0] == 3 and picture.shape[1] > 0

    with pytest.raises(SystemExit, match="--overwrite"):  # a finished evaluation is never overwritten silently
        ev.main(ev.parse_args(argv))
