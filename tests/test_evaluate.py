"""evaluate.py: metric values on hand-made masks against hand-computed numbers and brute-force
references written out here, and the evaluation script end to end on a tiny phantom."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

import evaluate as ev


# -----------------------------------------------------------------------------
# Dice and IoU

def test_dice_iou_known_values():
    truth = torch.zeros(8, 8, dtype=torch.bool)
    pred = torch.zeros(8, 8, dtype=torch.bool)
    truth[2:6, 2:6] = True  # 16 pixels
    pred[2:6, 3:7] = True  # 16 pixels, 12 shared
    assert ev.dice(pred, truth) == pytest.approx(2 * 12 / 32)
    assert ev.iou(pred, truth) == pytest.approx(12 / 20)
    empty = torch.zeros_like(truth)
    assert ev.dice(empty, empty) == 1.0 and ev.iou(empty, empty) == 1.0  # both empty: agreement
    assert ev.dice(pred, empty) == 0.0 and ev.iou(empty, truth) == 0.0


# -----------------------------------------------------------------------------
# Hausdorff distance

def brute_force_hausdorff(a, b, spacing):
    """medpy's definition written out with loops: border = voxels with a face neighbour outside the
    mask or the array; distances from each border voxel of one mask to the nearest of the other's"""
    def border(m):
        out = []
        for p in zip(*np.nonzero(m)):
            for axis, step in itertools.product(range(m.ndim), (-1, 1)):
                q = list(p)
                q[axis] += step
                if not (0 <= q[axis] < m.shape[axis]) or not m[tuple(q)]:
                    out.append(p)
                    break
        return out

    def directed(src, dst):
        return [min(math.sqrt(sum(((i - j) * s) ** 2 for i, j, s in zip(p, q, spacing))) for q in dst) for p in src]

    ab, ba = directed(border(a), border(b)), directed(border(b), border(a))
    return max(max(ab), max(ba)), float(np.percentile(ab + ba, 95))


def test_border_counts_array_edge_as_outside():
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[1:4, 1:4] = True
    assert ev.border(m).sum() == 8 and not ev.border(m)[2, 2]  # the centre has all 4 neighbours inside
    assert ev.border(torch.ones(2, 5, dtype=torch.bool)).all()  # every pixel touches the array's edge
    cube = torch.zeros(5, 5, 5, dtype=torch.bool)
    cube[1:4, 1:4, 1:4] = True
    assert ev.border(cube).sum() == 26  # 6-connectivity in 3D: only the centre is interior


def test_hausdorff_hand_computed_points_anisotropic():
    spacing = (2.0, 0.5)  # mm per axis
    a = torch.zeros(4, 4, dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)
    a[0, 0] = True
    b[0, 0] = b[3, 0] = True  # 3 rows (the coarse axis) away: 6 mm
    # a -> b: [0]; b -> a: [0, 6]; pooled [0, 0, 6]: 95th percentile at rank 1.9 -> 0.9 * 6
    assert ev.hausdorff(a, b, spacing) == pytest.approx(6.0)
    assert ev.hausdorff(a, b, spacing, percentile=95) == pytest.approx(5.4)
    b[3, 0], b[0, 3] = False, True  # 3 columns (the fine axis) away: 1.5 mm
    assert ev.hausdorff(b, a, spacing) == pytest.approx(1.5)


def test_hausdorff_boxes_offset_along_coarse_axis():
    spacing = (1.5, 1.5, 5.0)
    a = torch.zeros(6, 6, 8, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[1:4, 1:4, 1:3] = True  # slices 1, 2: two slices thick, so every voxel is on the border
    b[2:5, 1:4, 3:5] = True  # slices 3, 4 and one pixel along x
    # the farthest pairs: a's x=1 column on slice 1 to b's nearest voxel (x=2, slice 3):
    # sqrt(1.5^2 + 10^2), and b's x=4 column on slice 4 to a's (x=3, slice 2) likewise
    assert ev.hausdorff(a, b, spacing) == pytest.approx(math.hypot(1.5, 10.0))
    ref_hd, ref_hd95 = brute_force_hausdorff(a.numpy(), b.numpy(), spacing)
    assert ev.hausdorff(a, b, spacing) == pytest.approx(ref_hd)
    assert ev.hausdorff(a, b, spacing, percentile=95) == pytest.approx(ref_hd95)


@pytest.mark.parametrize("seed", range(4))
def test_hausdorff_matches_brute_force_on_random_masks(seed):
    g = torch.Generator().manual_seed(seed)
    spacing = (1.3, 0.7, 6.0)
    a = torch.rand(6, 7, 4, generator=g) > 0.5
    b = torch.rand(6, 7, 4, generator=g) > 0.6
    ref_hd, ref_hd95 = brute_force_hausdorff(a.numpy(), b.numpy(), spacing)
    assert ev.hausdorff(a, b, spacing) == pytest.approx(ref_hd)
    assert ev.hausdorff(a, b, spacing, percentile=95) == pytest.approx(ref_hd95)
    # small chunks give the same answer (the distance matrix is built in pieces)
    d = ev.surface_distances(a, b, spacing, chunk=7)
    assert torch.allclose(d, ev.surface_distances(a, b, spacing))


def test_hausdorff_empty_masks():
    empty = torch.zeros(4, 4, 3, dtype=torch.bool)
    full = empty.clone()
    full[1, 1, 1] = True
    assert ev.hausdorff(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(ev.hausdorff(full, empty, (1, 1, 1)))  # missing, never 0
    assert math.isnan(ev.hausdorff(empty, full, (1, 1, 1), percentile=95))
    with pytest.raises(ValueError):
        ev.hausdorff(full, full, (1, 1))  # one spacing value per axis


# -----------------------------------------------------------------------------
# confusion matrix and per-class IoU

def test_confusion_iou_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (3, 9, 11), generator=g)
    truth = torch.randint(0, 3, (3, 9, 11), generator=g)  # class 3 never true
    pred[pred == 3] = 0  # ... nor predicted: its IoU is undefined
    cm = ev.confusion(pred, truth, 4)
    assert cm.sum() == pred.numel() and cm[1, 2] == ((truth == 1) & (pred == 2)).sum()
    inter, union = ev.class_iou(pred, truth, 4)
    per_class = ev.iou_from_counts(inter, union)
    for c in range(3):
        assert per_class[c].item() == pytest.approx(ev.iou(pred == c, truth == c))
    assert math.isnan(per_class[3])
    # per slice: the same, one slice at a time
    per_slice = ev.slice_iou(pred, truth, 4)
    assert per_slice.shape == (3, 4)
    for i in range(3):
        for c in range(3):
            assert per_slice[i, c].item() == pytest.approx(ev.iou(pred[i] == c, truth[i] == c))
    assert per_slice[:, 3].isnan().all()


def test_paper_summary_counts_absent_class_as_one():
    ious = torch.tensor([[1.0, 0.5, float("nan"), 0.5],
                         [0.5, 0.5, 1.0, float("nan")]])
    s = ev.paper_iou_summary(ious)
    per_slice = torch.tensor([(1 + 0.5 + 1 + 0.5) / 4, (0.5 + 0.5 + 1 + 1) / 4])
    assert s["mean_iou_with_background"] == pytest.approx(per_slice.mean().item())
    assert s["std_iou_with_background"] == pytest.approx(per_slice.std().item())
    assert s["mean_iou_structures"] == pytest.approx(((2 / 3 + 2.5 / 3) / 2))
    assert s["per_class_iou"] == pytest.approx({"BG": 0.75, "RV": 0.5, "MYO": 1.0, "LV": 0.5})  # nan skipped


# -----------------------------------------------------------------------------
# clinical indices

def labels_with(counts, shape=(20, 20, 10)):
    """a label volume holding exactly counts[v] voxels of label v"""
    flat = torch.zeros(math.prod(shape), dtype=torch.uint8)
    start = 0
    for value, n in counts.items():
        flat[start:start + n] = value
        start += n
    return flat.view(shape)


def test_clinical_indices_from_voxel_counts():
    spacing = (1.5, 1.5, 10.0)  # 22.5 mm^3 = 0.0225 mL per voxel
    ed = labels_with({1: 600, 2: 800, 3: 1000})
    es = labels_with({1: 300, 2: 900, 3: 400})
    assert ev.volumes_ml(ed, spacing) == pytest.approx({"RV": 13.5, "MYO": 18.0, "LV": 22.5})
    c = ev.clinical_indices(ed, es, spacing, spacing)
    assert c["LV_EDV"] == pytest.approx(22.5) and c["LV_ESV"] == pytest.approx(9.0)
    assert c["LV_EF"] == pytest.approx(60.0) and c["RV_EF"] == pytest.approx(50.0)
    assert c["MYO_mass"] == pytest.approx(18.0 * 1.05)
    assert math.isnan(ev.clinical_indices(es * 0, es, spacing, spacing)["LV_EF"])  # no ED volume: undefined


def test_agreement():
    a = ev.agreement([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert a["bias"] == pytest.approx(-1 / 3)
    assert a["std"] == pytest.approx(math.sqrt(1 / 3))  # sample std of the errors [0, 0, -1]
    assert a["corr"] == pytest.approx(np.corrcoef([1, 2, 3], [1, 2, 4])[0, 1])
    assert a["n"] == 3


# -----------------------------------------------------------------------------
# prediction and model loading

class Threshold(torch.nn.Module):
    """a stand-in model: LV (3) wherever the normalised intensity is above 0, background elsewhere"""

    def forward(self, x):  # (B, 1, H, W) -> (B, 4, H, W)
        never = torch.full_like(x, -1e9)
        return torch.cat([-x, never, never, x], 1)


def test_predict_volume_keeps_orientation_and_crops_padding():
    import acdc
    volume = np.random.default_rng(0).uniform(0, 150, size=(40, 50, 3)).astype(np.float32)  # X, Y, Z
    pred = ev.predict_volume(Threshold(), volume, "cpu", batch_size=2)  # padded to 224 x 224, cropped back
    assert pred.shape == (40, 50, 3) and pred.dtype == torch.uint8
    expected = np.where(acdc.normalize(volume) > 0, 3, 0)
    assert np.array_equal(pred.numpy(), expected)


def test_load_model_reads_the_papers_lightning_checkpoint(tmp_path):
    import acdc
    import unet
    torch.manual_seed(0)
    model = unet.UNet(arch="resnet18").eval()
    # the paper's fine-tuned checkpoints: Lightning, the U-Net as `model.`, timm's encoder as `encoder.model.`,
    # no architecture field
    state = {"model." + k.replace("encoder.", "encoder.model.", 1): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "paper.ckpt")
    loaded, norm = ev.load_model(str(tmp_path / "paper.ckpt"), torch.device("cpu"))
    assert norm == (255 * acdc.MEAN, 255 * acdc.STD)  # albumentations' Normalize, max_pixel_value 255
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)  # loaded in channels_last: same values


# -----------------------------------------------------------------------------
# the script end to end, on a tiny phantom with an untrained U-Net

def test_main_end_to_end(tmp_path):
    import csv
    import nibabel as nib
    import torchvision
    import acdc
    import unet

    data = tmp_path / "data"
    # 11 patients: the test split holds patients 1 and 11
    acdc.write_phantom(str(data), patients=11, seed=0, size_range=(28, 32), frames_range=(3, 4), slices_range=(3, 4))
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
