"""Metrics of cardiac segmentation, as pure functions on tensors (any device).

Dice, IoU, Hausdorff distance in mm, per-class IoU from confusion counts, the paper's per-slice
summary, volumes and clinical indices, the agreement of predicted with true indices.

    dice(pred == 3, truth == 3)                          # boolean masks, 2D or 3D
    hausdorff(pred == 3, truth == 3, spacing=(1.5, 1.5, 10), percentile=95)   # mm, ACDC's HD95
    paper_iou_summary(slice_iou(pred, truth))            # (Z, H, W) label maps -> the paper's numbers

The Hausdorff distance follows medpy (which the ACDC challenge used); the paper's IoU protocol is
per 2D slice, with the background class: in a slice's mean IoU a class absent from both prediction
and truth counts as 1.0; the per-class figures leave those slices out.
"""
import math

import torch
import torch.nn.functional as F

STRUCTURES = {1: "RV", 2: "MYO", 3: "LV"}  # ACDC's label values
CLASS_NAMES = ["BG", "RV", "MYO", "LV"]
MYO_DENSITY = 1.05  # g/mL, the myocardial density ACDC uses for the mass


# -----------------------------------------------------------------------------
# overlap: Dice and IoU (boolean masks of any shape; both empty counts as perfect agreement)

def dice(pred, truth):
    pred, truth = pred.bool(), truth.bool()
    total = pred.sum() + truth.sum()
    if total == 0:
        return 1.0
    return (2 * (pred & truth).sum().double() / total).item()


def iou(pred, truth):
    pred, truth = pred.bool(), truth.bool()
    union = (pred | truth).sum()
    if union == 0:
        return 1.0
    return ((pred & truth).sum().double() / union).item()


# -----------------------------------------------------------------------------
# Hausdorff distance, defined as the ACDC challenge computed it (medpy.metric.binary.hd / hd95)

def border(mask):
    """voxels of the mask with at least one face neighbour (4 in 2D, 6 in 3D) outside it; outside
    the array counts as outside (scipy's binary_erosion with border_value=0, as medpy uses it)"""
    m = mask.bool()
    padded = F.pad(m.to(torch.uint8), (1, 1) * m.dim()).bool()  # (..., n+2, ...) False all around
    interior = m.clone()
    for axis in range(m.dim()):
        for start in (0, 2):  # the neighbour before and after along this axis
            index = [slice(1, -1)] * m.dim()
            index[axis] = slice(start, start + m.shape[axis])
            interior &= padded[tuple(index)]
    return m & ~interior


def surface_distances(a, b, spacing, chunk=1 << 22):
    """(N_a,) distance in mm from each border voxel of a to the nearest border voxel of b (medpy's
    directed distances: a distance transform of b's border read at a's border)"""
    scale = torch.tensor(spacing, dtype=torch.float64, device=a.device)
    pa = border(a).nonzero().double() * scale  # (N_a, ndim) voxel centres in mm
    pb = border(b).nonzero().double() * scale  # (N_b, ndim)
    rows = max(1, chunk // len(pb))  # at most `chunk` distances (rows, N_b) in memory at once
    return torch.cat([torch.cdist(pa[i:i + rows], pb, compute_mode="donot_use_mm_for_euclid_dist").amin(1)
                      for i in range(0, len(pa), rows)])


def hausdorff(pred, truth, spacing, percentile=100):
    """Hausdorff distance in mm (percentile=100, medpy's hd) or its percentile over the directed
    distances of both directions pooled (95: medpy's hd95). Both masks empty -> 0.0; exactly one
    empty -> nan (undefined: report it as missing, never as 0)."""
    pred, truth = pred.bool(), truth.bool()
    if len(spacing) != pred.dim():
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.dim()}D mask")
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("nan")
    d = torch.cat([surface_distances(pred, truth, spacing), surface_distances(truth, pred, spacing)])
    # the max of the pooled distances is the max of the two directed maxima (hd); quantile
    # interpolates linearly between order statistics as numpy.percentile does (hd95)
    return (d.max() if percentile == 100 else torch.quantile(d, percentile / 100)).item()


# -----------------------------------------------------------------------------
# per-class IoU from a confusion matrix (the torchvision reference scripts' bincount)

def confusion(pred, truth, num_classes):
    """(C, C) int64 counts, rows the true class, columns the predicted one; summable over batches
    and ranks (all-reduce) before IoU is computed"""
    truth, pred = truth.flatten().long(), pred.flatten().long()
    keep = (truth >= 0) & (truth < num_classes)  # e.g. -1: padding, not counted
    # one bin per (truth, prediction) pair and a spare one for what is not counted; index_add_
    # rather than bincount or boolean indexing, which would wait for the GPU to size their output
    index = torch.where(keep, num_classes * truth + pred, num_classes ** 2)
    counts = torch.zeros(num_classes ** 2 + 1, dtype=torch.long, device=truth.device)
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[:-1].reshape(num_classes, num_classes)


def class_iou(pred, truth, num_classes=4):
    """-> (intersection (C,), union (C,)) int64 pixel counts per class; sum them over slices and
    ranks, then iou_from_counts gives the dataset's per-class IoU"""
    cm = confusion(pred, truth, num_classes)
    intersection = cm.diag()
    return intersection, cm.sum(0) + cm.sum(1) - intersection


def iou_from_counts(intersection, union):
    """(C,) IoU; nan for a class absent from both prediction and truth"""
    return torch.where(union > 0, intersection.double() / union.clamp(min=1), torch.nan)


def slice_iou(pred, truth, num_classes=4):
    """(B, H, W) label maps -> (B, C) IoU per slice and class; nan where the class is absent from
    both the slice's prediction and truth (the paper's protocol counts that as 1.0 in the slice mean)"""
    b, c = pred.shape[0], num_classes
    index = c * truth.flatten(1).long() + pred.flatten(1).long()  # (B, H*W) cell of each pixel
    index = index + c * c * torch.arange(b, device=pred.device)[:, None]  # one confusion matrix per slice
    cm = torch.bincount(index.flatten(), minlength=b * c * c).view(b, c, c)  # (B, C true, C predicted)
    intersection = cm.diagonal(dim1=1, dim2=2)
    return iou_from_counts(intersection, cm.sum(1) + cm.sum(2) - intersection)


def paper_iou_summary(ious):
    """(N slices, C) -> the paper's numbers: per-slice mean IoU (a class absent from both counts as
    1.0), mean and std over slices (np.std's population std, as the paper computed it); with
    background and over the structures alone; per-class means over the slices where the class
    occurs in the prediction or the truth (absent ones ignored, not 1.0)"""
    filled = ious.nan_to_num(1.0)
    with_bg, structures = filled.mean(1), filled[:, 1:].mean(1)
    return {"mean_iou_with_background": with_bg.mean().item(),
            "std_iou_with_background": with_bg.std(correction=0).item(),
            "mean_iou_structures": structures.mean().item(),
            "std_iou_structures": structures.std(correction=0).item(),
            "per_class_iou": {n: ious[:, c].nanmean().item()
                              for c, n in enumerate(CLASS_NAMES[:ious.shape[1]])},
            "slices": len(ious)}


# -----------------------------------------------------------------------------
# clinical indices, as the ACDC challenge reports them

def volumes_ml(labels, spacing):
    """{"RV", "MYO", "LV": volume in mL}: voxel count x voxel volume (mm^3) / 1000"""
    labels = torch.as_tensor(labels)
    voxel_ml = math.prod(spacing) / 1000
    return {name: (labels == value).sum().item() * voxel_ml for value, name in STRUCTURES.items()}


def indices_of_volumes(ed, es):
    """volumes_ml of the ED and ES frames -> end-diastolic / end-systolic volumes (mL), stroke volume
    (EDV - ESV, mL), ejection fraction (SV / EDV, %) of LV and RV, myocardial mass at ED (g)"""
    out = {}
    for v in ("LV", "RV"):
        out[f"{v}_EDV"], out[f"{v}_ESV"], out[f"{v}_SV"] = ed[v], es[v], ed[v] - es[v]
        out[f"{v}_EF"] = (ed[v] - es[v]) / ed[v] * 100 if ed[v] > 0 else float("nan")
    out["MYO_mass"] = ed["MYO"] * MYO_DENSITY
    return out


# Ejection fractions a beating heart gives: ACDC's pathology groups (Bernard et al. 2018, IEEE TMI 37(11)) reach
# from LV or RV EF below 40 % (dilated, infarcted, abnormal RV) to LV EF above 55 % (hypertrophic); outside
# 10-90 % a value more likely tells of a segmentation that failed, or of a scan that is no short-axis cine
EF_RANGE = (10, 90)


def implausible(ed, indices):
    """volumes_ml at ED and their indices_of_volumes -> [warning]: a structure empty at ED (its EF undefined),
    an ejection fraction outside EF_RANGE"""
    lo, hi = EF_RANGE
    found = [f"no {s} predicted at ED" for s in STRUCTURES.values() if ed[s] == 0]
    return found + [f"{v} EF {indices[f'{v}_EF']:.1f} % lies outside the {lo}-{hi} % of a beating heart"
                    for v in ("LV", "RV") if ed[v] > 0 and not lo <= indices[f"{v}_EF"] <= hi]


def clinical_indices(ed_labels, es_labels, ed_spacing, es_spacing):
    """label volumes of ED and ES -> indices_of_volumes"""
    return indices_of_volumes(volumes_ml(ed_labels, ed_spacing), volumes_ml(es_labels, es_spacing))


def ed_es_frames(lv_volumes):
    """LV volume per frame of a cine -> (ED, ES) frames counted from 1, as ACDC's Info.cfg counts them:
    end diastole is the frame of largest LV volume, end systole that of the smallest (the first one
    on a tie). A cine whose LV never changes gives the same frame twice."""
    v = torch.as_tensor(lv_volumes, dtype=torch.float64)
    if v.dim() != 1 or len(v) == 0 or not v.isfinite().all():
        raise ValueError(f"ed_es_frames needs a 1D curve of finite volumes, got {v.tolist()}")
    # argmax/argmin of a float64 CPU tensor return the first extreme on a tie
    return int(v.argmax()) + 1, int(v.argmin()) + 1


def agreement(pred, truth):
    """predicted vs true values over patients: Pearson correlation (nan, undefined, below three
    patients: two points always lie on a line), bias (mean of pred - truth) and the standard
    deviation of that error"""
    p, t = torch.tensor(pred, dtype=torch.float64), torch.tensor(truth, dtype=torch.float64)
    ok = p.isfinite() & t.isfinite()
    p, t = p[ok], t[ok]
    err = p - t
    corr = torch.corrcoef(torch.stack([p, t]))[0, 1].item() if len(p) > 2 else float("nan")
    return {"corr": corr, "bias": err.mean().item() if len(p) else float("nan"),
            "std": err.std().item() if len(p) > 1 else float("nan"), "n": len(p)}


def mean_std(values):
    """mean and sample std over the finite values; undefined ones (nan) are counted as missing"""
    v = torch.tensor(values, dtype=torch.float64)
    ok = v[v.isfinite()]
    return {"mean": ok.mean().item() if len(ok) else float("nan"),
            "std": ok.std().item() if len(ok) > 1 else float("nan"),
            "n": len(ok), "missing": len(v) - len(ok)}


def score_volume(pred, truth, spacing):
    """the challenge's numbers for one 3D volume: Dice, HD and HD95 per structure, volumes"""
    row = {}
    for value, s in STRUCTURES.items():
        p, t = pred == value, truth == value
        row.update({f"dice_{s}": dice(p, t), f"hd_{s}": hausdorff(p, t, spacing),
                    f"hd95_{s}": hausdorff(p, t, spacing, percentile=95)})
    row.update({f"vol_pred_{s}": v for s, v in volumes_ml(pred, spacing).items()})
    row.update({f"vol_true_{s}": v for s, v in volumes_ml(truth, spacing).items()})
    return row
