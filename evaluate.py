"""Scoring a fine-tuned U-Net against ACDC's labels, by two protocols.

- the paper's protocol: IoU per class on each 2D slice, averaged over slices (with background,
  as the paper reports it, and over the three structures alone);
- the ACDC challenge's protocol: Dice and Hausdorff distance per structure on whole 3D volumes,
  end diastole (ED) and end systole (ES) apart, plus the clinical indices (volumes, ejection
  fractions, myocardial mass) against the ground truth.

    python evaluate.py --checkpoint runs/seg/best.pt --data data/acdc-synth --split test

Writes into --out (default: eval-<split> beside the checkpoint): metrics.json, metrics.csv (one
row per patient and phase), patientNNN_frameFF_pred.nii.gz (labels on the source image's grid,
so ITK-SNAP or 3D Slicer overlays them) and patientNNN.png (image | truth | prediction).
Prediction is inference.py's, the numbers are metrics.py's.
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

import acdc
import files
import pictures
import training
from checkpoints import CheckpointError
from inference import load_model, predict_volume
from metrics import STRUCTURES, agreement, clinical_indices, mean_std, paper_iou_summary, score_volume, slice_iou


def case_png(rows):
    """rows of (image, truth, prediction (X, Y, Z) each, slice index) -> (3, H, W) uint8 picture;
    each row: image | truth overlay | prediction overlay, intensities windowed at the 1st/99th
    percentile of the volume. Slices are shown as the model sees them: X down, Y across."""
    tiles = []
    for image, truth, pred, z in rows:
        gray = pictures.grey(image)[:, :, z]
        tiles.append([gray.expand(3, -1, -1), pictures.overlay(gray, truth[:, :, z]),
                      pictures.overlay(gray, pred[:, :, z])])
    return pictures.montage(tiles)


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
        model, (*norm, norm_source) = load_model(args.checkpoint, device, trust=args.trust_checkpoint,
                                                 flag="--checkpoint")
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
            files.write_nifti(os.path.join(out, f"{name}_pred.nii.gz"), pred_cpu.numpy(), image)
            rows.append({"patient": case.patient, "frame": frame.frame, "phase": frame.phase,
                         "slices": pred.shape[2], **score_volume(pred, truth, spacing)})
            ious.append(slice_iou(pred.permute(2, 0, 1), truth.permute(2, 0, 1)).cpu())  # (Z, C)
            phases[frame.phase] = (pred, truth, spacing)
            tiles += [(torch.from_numpy(image.data), torch.from_numpy(label.data), pred_cpu, z)
                      for z in pictures.pick_slices(truth)]
        (ed_pred, ed_truth, ed_sp), (es_pred, es_truth, es_sp) = phases["ED"], phases["ES"]
        clinical.append((clinical_indices(ed_pred, es_pred, ed_sp, es_sp),
                         clinical_indices(ed_truth, es_truth, ed_sp, es_sp)))
        pictures.write_png(os.path.join(out, f"patient{case.patient:03d}.png"), case_png(tiles))

    # ---- summary; metrics.json last: its presence marks a finished evaluation
    metrics = {"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(args.data),
               "split": args.split, "cases": len(cases), "volumes": len(rows), **summarize(rows, ious, clinical),
               "device": str(device), "amp": amp, "min_size": args.min_size, "seconds": round(time.time() - t0, 1)}
    files.write_csv(os.path.join(out, "metrics.csv"), rows)
    files.write_json(os.path.join(out, "metrics.json"), metrics)
    print(table(metrics))
    return metrics


if __name__ == "__main__":
    main(parse_args())
