"""Metrics for cardiac segmentation (Dice, IoU, Hausdorff distance in mm, clinical indices) and the
evaluation script that scores a fine-tuned U-Net on ACDC in two ways:

- the paper's protocol: IoU per class on each 2D slice, averaged over slices (with background,
  as the paper reports it, and over the three structures alone);
- the ACDC challenge's protocol: Dice and Hausdorff distance per structure on whole 3D volumes,
  end diastole (ED) and end systole (ES) apart, plus the clinical indices (volumes, ejection
  fractions, myocardial mass) against the ground truth.

    python evaluate.py --checkpoint runs/seg/best.pt --data data/acdc-synth --split test

Writes into --out (default: eval-<split> beside the checkpoint): metrics.json, metrics.csv (one
row per patient and phase), patientNNN_frameFF_pred.nii.gz (labels on the source image's grid,
so ITK-SNAP or 3D Slicer overlays them) and patientNNN.png (image | truth | prediction).
The metric functions take torch tensors on any device; train_segment.py uses them for validation.
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import time

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import acdc
import unet
import training
from resnet import CheckpointError, read_checkpoint

STRUCTURES = {1: "RV", 2: "MYO", 3: "LV"}  # ACDC's label values
CLASS_NAMES = ["BG", "RV", "MYO", "LV"]
MYO_DENSITY = 1.05  # g/mL, the myocardial density ACDC uses for the mass
COLOURS = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.float32)  # BG RV MYO LV


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
    """(N slices, C) -> the paper's numbers: per-slice mean IoU (absent classes count as 1.0),
    mean and std over slices (np.std's population std, as the paper computed it); with background
    and over the structures alone; per-class means"""
    filled = ious.nan_to_num(1.0)
    with_bg, structures = filled.mean(1), filled[:, 1:].mean(1)
    return {"mean_iou_with_background": with_bg.mean().item(),
            "std_iou_with_background": with_bg.std(correction=0).item(),
            "mean_iou_structures": structures.mean().item(), "std_iou_structures": structures.std(correction=0).item(),
            "per_class_iou": {n: ious[:, c].nanmean().item() for c, n in enumerate(CLASS_NAMES[:ious.shape[1]])},
            "slices": len(ious)}


# -----------------------------------------------------------------------------
# clinical indices, as the ACDC challenge reports them

def volumes_ml(labels, spacing):
    """{"RV", "MYO", "LV": volume in mL}: voxel count x voxel volume (mm^3) / 1000"""
    labels = torch.as_tensor(labels)
    voxel_ml = math.prod(spacing) / 1000
    return {name: (labels == value).sum().item() * voxel_ml for value, name in STRUCTURES.items()}


def clinical_indices(ed_labels, es_labels, ed_spacing, es_spacing):
    """end-diastolic / end-systolic volumes (mL), ejection fractions (%), myocardial mass at ED (g)"""
    ed, es = volumes_ml(ed_labels, ed_spacing), volumes_ml(es_labels, es_spacing)
    out = {}
    for v in ("LV", "RV"):
        out[f"{v}_EDV"], out[f"{v}_ESV"] = ed[v], es[v]
        out[f"{v}_EF"] = (ed[v] - es[v]) / ed[v] * 100 if ed[v] > 0 else float("nan")
    out["MYO_mass"] = ed["MYO"] * MYO_DENSITY
    return out


def agreement(pred, truth):
    """predicted vs true values over patients: Pearson correlation, bias (mean of pred - truth)
    and the standard deviation of that error"""
    p, t = torch.tensor(pred, dtype=torch.float64), torch.tensor(truth, dtype=torch.float64)
    ok = p.isfinite() & t.isfinite()
    p, t = p[ok], t[ok]
    err = p - t
    corr = torch.corrcoef(torch.stack([p, t]))[0, 1].item() if len(p) > 1 else float("nan")
    return {"corr": corr, "bias": err.mean().item() if len(p) else float("nan"),
            "std": err.std().item() if len(p) > 1 else float("nan"), "n": len(p)}


def mean_std(values):
    """mean and sample std over the finite values; undefined ones (nan) are counted as missing"""
    v = torch.tensor(values, dtype=torch.float64)
    ok = v[v.isfinite()]
    return {"mean": ok.mean().item() if len(ok) else float("nan"),
            "std": ok.std().item() if len(ok) > 1 else float("nan"), "n": len(ok), "missing": len(v) - len(ok)}


# -----------------------------------------------------------------------------
# prediction: the paper's protocol for each slice, stacked back into the volume

@torch.inference_mode()
def predict_slices(model, images, norm=(acdc.MEAN, acdc.STD), autocast=contextlib.nullcontext, min_size=224):
    """(B, H, W) raw intensities -> (B, H, W) int64 labels, by the protocol the paper evaluated with:
    zero-padded at the bottom/right to a multiple of 32 and at least min_size (224, its training
    crop), then normalised (the paper padded the raw image first), logits cropped back"""
    x, size = unet.pad_to(images.float()[:, None], multiple=32, min_size=min_size)  # (B, 1, H', W')
    x = acdc.normalize(x, *norm)
    x = x.contiguous(memory_format=torch.channels_last)
    with autocast():
        logits = model(x)  # (B, C, H', W')
    return unet.crop_to(logits, size).argmax(1)  # (B, H, W)


def predict_volume(model, volume, device, norm=(acdc.MEAN, acdc.STD), autocast=contextlib.nullcontext,
                   batch_size=32, min_size=224):
    """(X, Y, Z) image volume (numpy or tensor, nibabel's axis order) -> (X, Y, Z) uint8 labels on
    `device`, predicted slice by slice ([:, :, z], as acdc.py hands slices to the model) in batches.
    The model must already be on `device` and in eval mode."""
    slices = torch.as_tensor(volume).to(device).permute(2, 0, 1)  # (Z, X, Y)
    labels = [predict_slices(model, slices[i:i + batch_size], norm, autocast, min_size)
              for i in range(0, len(slices), batch_size)]
    return torch.cat(labels).to(torch.uint8).permute(1, 2, 0)  # (X, Y, Z)


# -----------------------------------------------------------------------------
# the model: this project's best.pt / checkpoint.pt, or the paper's fine-tuned Lightning checkpoints

def normalisation_of(ckpt):
    """(mean, std) the checkpoint's model was trained with. This project stores them. The paper's
    code normalised with albumentations' Normalize, whose max_pixel_value (default 255) multiplies
    mean and std: its fine-tuned models saw (x - 255 * MEAN) / (255 * STD), and their BatchNorm
    statistics expect that input."""
    if ckpt.get("kind") == "segmentation":
        return ckpt.get("mean", acdc.MEAN), ckpt.get("std", acdc.STD)
    hyper = ckpt.get("hyper_parameters") or {}
    config = hyper.get("config", {}) if isinstance(hyper, dict) else {}
    scale = config.get("norm_max_pixel_value", 255.0) if isinstance(config, dict) else 255.0
    return acdc.MEAN * scale, acdc.STD * scale


def load_model(path, device, trust=False):
    """-> (UNet in eval mode on `device`, (mean, std) of its input normalisation); its encoder, input
    channels and classes are read from the weights"""
    ckpt = read_checkpoint(path, trust=trust)
    state = unet.load_segmentation(ckpt)
    config = unet.unet_args(state)
    if config["num_classes"] != len(CLASS_NAMES):
        raise CheckpointError(f"{path}: a U-Net with {config['num_classes']} classes; ACDC's are 4 (BG, RV, MYO, LV)")
    model = unet.UNet(**config)
    model.load_state_dict(state)
    model = model.to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    return model, normalisation_of(ckpt)


# -----------------------------------------------------------------------------
# outputs: atomic files, NIfTI masks, PNG overlays

def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    acdc.write_atomic(path, write)


def write_nifti(path, labels, source):
    """uint8 labels on the source volume's grid: its affine and header, so viewers overlay them"""
    img = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), source.affine, source.header.copy())
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)  # labels are stored as they are, never rescaled
    acdc.write_atomic(path, lambda tmp: nib.save(img, tmp))


def overlay(gray, labels, alpha=0.45):
    """(H, W) uint8-range gray, (H, W) labels -> (3, H, W) colours blended over the structures"""
    rgb = gray.expand(3, -1, -1)
    colour = COLOURS.to(labels.device)[labels.long()].permute(2, 0, 1)  # (3, H, W)
    return torch.where(labels > 0, (1 - alpha) * rgb + alpha * colour, rgb)


def case_png(rows):
    """rows of (image, truth, prediction (X, Y, Z) each, slice index) -> (3, H, W) uint8 picture;
    each row: image | truth overlay | prediction overlay, intensities windowed at the 1st/99th percentile.
    Slices are shown as the model sees them: X down, Y across."""
    tiles = []
    for image, truth, pred, z in rows:
        sample = image.flatten()[:: max(1, image.numel() // 1_000_000)].float()  # quantile has a size limit
        lo, hi = torch.quantile(sample, torch.tensor([0.01, 0.99]))
        gray = ((image[:, :, z].float() - lo) / (hi - lo).clamp(min=1e-6) * 255).clamp(0, 255)
        sep = torch.full((3, gray.shape[0], 4), 255.0)  # a white line between the columns
        tiles.append(torch.cat([gray.expand(3, -1, -1), sep, overlay(gray, truth[:, :, z]), sep,
                                overlay(gray, pred[:, :, z])], 2))
    width = max(t.shape[2] for t in tiles)
    tiles = [F.pad(t, (0, width - t.shape[2], 0, 4)) for t in tiles]  # 4 black rows between slices
    return torch.cat(tiles, 1).round().to(torch.uint8)


def pick_slices(labels, count=3):
    """basal, mid and apical slices: evenly spaced among the slices that hold a structure"""
    z = (labels.flatten(0, 1) > 0).any(0).nonzero().flatten().tolist() or list(range(labels.shape[2]))
    return sorted({z[round(i * (len(z) - 1) / max(1, count - 1))] for i in range(count)})


def write_csv(path, rows):
    """one row per patient and phase; an empty cell is a missing value (a Hausdorff distance with
    one mask empty)"""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if math.isfinite(v) else "") if isinstance(v, float) else v
                    for k, v in r.items()})
    write_text(path, buf.getvalue())


def finite_or_none(obj):
    """nan -> null, so metrics.json is strict JSON"""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def table(m):
    """the summary as plain aligned text"""
    p = m["paper_slice_iou"]
    lines = [f"split '{m['split']}': {m['cases']} patients, {m['volumes']} volumes",
             f"paper protocol (2D, {p['slices']} slices, mean +- std over slices):",
             f"  mean IoU with background {p['mean_iou_with_background']:.4f} +- {p['std_iou_with_background']:.4f}"
             f"   structures only {p['mean_iou_structures']:.4f} +- {p['std_iou_structures']:.4f}",
             "  per class: " + "  ".join(f"{k} {v:.4f}" for k, v in p["per_class_iou"].items()),
             "challenge protocol (3D volumes, mean +- std over patients):",
             f"  {'phase':<6}{'structure':<10}{'Dice':>18}{'HD (mm)':>18}{'HD95 (mm)':>18}"]
    for phase, per in m["challenge"].items():
        for s, v in per.items():
            cells = [f"{v[k]['mean']:.3f} +- {v[k]['std']:.3f}" for k in ("dice", "hd", "hd95")]
            missing = f"  (HD missing for {v['hd']['missing']})" if v["hd"]["missing"] else ""
            lines.append(f"  {phase:<6}{s:<10}{cells[0]:>18}{cells[1]:>18}{cells[2]:>18}{missing}")
    lines.append(f"  mean Dice of the three structures over ED and ES: {m['mean_dice_structures']:.4f}")
    lines += [f"clinical indices, prediction vs truth over {m['cases']} patients:",
              f"  {'index':<12}{'corr':>8}{'bias':>10}{'std':>10}"]
    lines += [f"  {k:<12}{v['corr']:>8.3f}{v['bias']:>10.2f}{v['std']:>10.2f}" for k, v in m["clinical"].items()]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the script

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="RUN/best.pt of train_segment.py, or a fine-tuned checkpoint of the paper")
    p.add_argument("--data", default="data/acdc-synth",
                   help="ACDC root (training/, testing/ or a folder holding them)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "testing"],
                   help="the paper's patient split (test: 1, 11, ..., 91), or ACDC's testing set (101-150)")
    p.add_argument("--out", default=None, help="output folder (default: eval-<split> beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace the results of a finished evaluation in --out")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 on a GPU that supports it, fp16 on other GPUs, off on CPU")
    p.add_argument("--batch-size", type=int, default=32, help="slices per forward pass")
    p.add_argument("--min-size", type=int, default=224,
                   help="pad slices to at least this size (the paper: 224, its training crop); "
                        "0: to a multiple of 32 only")
    p.add_argument("--workers", type=int, default=2, help="processes reading the next volumes while the model runs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of checkpoints that hold more than tensors (runs code from the file)")
    return p.parse_args(argv)


class CaseVolumes(torch.utils.data.Dataset):
    """-> (case, [(frame, image volume, label volume)]) for ED and ES, read by loader workers
    while the model works on the previous patient"""

    def __init__(self, cases):
        self.cases = cases

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        case, volumes = self.cases[i], []
        for f in case.frames:
            image, label = acdc.read_volume(f.image), acdc.read_label(f.label)
            if image.data.shape != label.data.shape:
                raise acdc.DatasetError(f"{f.label}: labels of shape {label.data.shape}, the image {image.data.shape}")
            volumes.append((f, image, label))
        return case, volumes


def as_is(item):  # the loader's collate_fn: volumes stay numpy arrays with their nibabel headers
    return item


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


def summarize(rows, ious, clinical):
    """the paper's 2D protocol over slices, the challenge's 3D one over patients, clinical indices"""
    per_phase = lambda phase, key: [r[key] for r in rows if r["phase"] == phase]
    dice_all = [r[f"dice_{s}"] for r in rows for s in STRUCTURES.values()]
    return {"paper_slice_iou": paper_iou_summary(torch.cat(ious)),
            "mean_dice_structures": sum(dice_all) / len(dice_all),  # RV, MYO, LV over every volume
            "challenge": {phase: {s: {m: mean_std(per_phase(phase, f"{m}_{s}")) for m in ("dice", "hd", "hd95")}
                                  for s in STRUCTURES.values()} for phase in ("ED", "ES")},
            "clinical": {k: agreement([p[k] for p, _ in clinical], [t[k] for _, t in clinical])
                         for k in clinical[0][0]}}


def main(args):
    t0 = time.time()
    # ---- set-up: device, output folder (a finished evaluation is never overwritten silently)
    device = training.setup(args.device).device
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), f"eval-{args.split}")
    if os.path.exists(os.path.join(out, "metrics.json")) and not args.overwrite:
        sys.exit(f"--out {out} holds a finished evaluation (metrics.json): pass --overwrite or choose another --out")

    # ---- data and model
    try:
        cases = acdc.find_cases(args.data, split=args.split)  # other splits' problems do not stop this one
        unlabelled = [c.path for c in cases if len(c.frames) < 2]
        if unlabelled:
            raise acdc.DatasetError(f"{unlabelled[0]}: no _gt label files for ED and ES ({len(unlabelled)} such "
                                    f"patients); ACDC's testing set came without labels before its 2020 re-release")
        model, norm = load_model(args.checkpoint, device, trust=args.trust_checkpoint)
    except (acdc.DatasetError, CheckpointError) as e:
        sys.exit(str(e))
    loader = torch.utils.data.DataLoader(CaseVolumes(cases), batch_size=None, collate_fn=as_is,
                                         num_workers=args.workers)
    net = torch.compile(model) if args.compile else model
    autocast, _, amp = training.autocast(device, args.amp)
    print(f"evaluating {len(cases)} patients of split '{args.split}' on {device}, amp {amp}, input normalised as "
          f"(x - {norm[0]:.6g}) / {norm[1]:.6g}; writing to {out}")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "metrics.json")):  # --overwrite: the old summary goes first, so an
        os.remove(os.path.join(out, "metrics.json"))        # interrupted run never passes for a finished one

    # ---- loop over patients: predict the ED and ES volumes, score them, write masks and a picture
    rows, ious, clinical = [], [], []
    for case, frames in tqdm(loader, desc="patients", unit="patient", disable=None):
        tiles, phases = [], {}
        for frame, image, label in frames:
            spacing = image.spacing  # mm along X, Y, Z
            pred = predict_volume(net, image.data, device, norm, autocast, args.batch_size, args.min_size)  # (X, Y, Z)
            truth = torch.from_numpy(label.data).to(device)
            name = f"patient{case.patient:03d}_frame{frame.frame:02d}"
            pred_cpu = pred.cpu()  # one copy back, for the NIfTI file and the picture
            write_nifti(os.path.join(out, f"{name}_pred.nii.gz"), pred_cpu.numpy(), image)
            rows.append({"patient": case.patient, "frame": frame.frame, "phase": frame.phase,
                         "slices": pred.shape[2], **score_volume(pred, truth, spacing)})
            ious.append(slice_iou(pred.permute(2, 0, 1), truth.permute(2, 0, 1)).cpu())  # (Z, C)
            phases[frame.phase] = (pred, truth, spacing)
            tiles += [(torch.from_numpy(image.data), torch.from_numpy(label.data), pred_cpu, z)
                      for z in pick_slices(truth)]
        (ed_pred, ed_truth, ed_sp), (es_pred, es_truth, es_sp) = phases["ED"], phases["ES"]
        clinical.append((clinical_indices(ed_pred, es_pred, ed_sp, es_sp),
                         clinical_indices(ed_truth, es_truth, ed_sp, es_sp)))
        picture = case_png(tiles)
        acdc.write_png(os.path.join(out, f"patient{case.patient:03d}.png"), picture)

    # ---- summary; metrics.json last: its presence marks a finished evaluation
    metrics = {"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(args.data),
               "split": args.split, "cases": len(cases), "volumes": len(rows), **summarize(rows, ious, clinical),
               "device": str(device), "amp": amp, "min_size": args.min_size, "seconds": round(time.time() - t0, 1)}
    write_csv(os.path.join(out, "metrics.csv"), rows)
    write_text(os.path.join(out, "metrics.json"), json.dumps(finite_or_none(metrics), indent=2) + "\n")
    print(table(metrics))
    return metrics


if __name__ == "__main__":
    main(parse_args())
