"""metrics.py: metric values on hand-made masks against hand-computed numbers and brute-force
references written out here."""
import itertools
import math

import numpy as np
import pytest
import torch

import metrics as ev


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
    assert c["LV_SV"] == pytest.approx(13.5) and c["RV_SV"] == pytest.approx(6.75)  # EDV - ESV
    assert math.isnan(ev.clinical_indices(es * 0, es, spacing, spacing)["LV_EF"])  # no ED volume: undefined


def test_ed_es_frames_from_the_lv_curve():
    # ED: the largest LV volume, ES: the smallest; frames count from 1, as in ACDC's Info.cfg
    assert ev.ed_es_frames([120.0, 118.0, 90.0, 55.0, 60.0, 100.0]) == (1, 4)
    assert ev.ed_es_frames(torch.tensor([50.0, 80.0, 150.0, 149.0])) == (3, 1)  # ED need not come first
    assert ev.ed_es_frames([70.0, 90.0, 90.0, 40.0, 40.0]) == (2, 4)  # ties: the first frame
    assert ev.ed_es_frames([5.0, 5.0]) == (1, 1) and ev.ed_es_frames([3.0]) == (1, 1)  # no change: one frame
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            ev.ed_es_frames(bad)


def test_agreement():
    a = ev.agreement([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert a["bias"] == pytest.approx(-1 / 3)
    assert a["std"] == pytest.approx(math.sqrt(1 / 3))  # sample std of the errors [0, 0, -1]
    assert a["corr"] == pytest.approx(np.corrcoef([1, 2, 3], [1, 2, 4])[0, 1])
    assert a["n"] == 3
    two = ev.agreement([1.0, 2.0], [1.5, 2.0])  # two points always lie on a line: no correlation below three
    assert math.isnan(two["corr"]) and two["bias"] == pytest.approx(-0.25) and two["n"] == 2


# -----------------------------------------------------------------------------
# prediction and model loading
