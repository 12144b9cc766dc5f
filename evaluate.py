"""Scoring a fine-tuned U-Net against ACDC's labels, by two protocols.

- the paper's protocol: IoU per class on each 2D slice, averaged over slices (with background,
  as the paper reports it, and over the three structures alone);
- the ACDC challenge's protocol: Dice and Hausdorff distance per structure on whole 3D volumes,
  end diastole (ED) and end systole (ES) apart, plus the clinical indices (volumes, stroke volumes,
  ejection fractions, myocardial mass) against the ground truth.

    python evaluate.py --checkpoint runs/seg/best.pt --data data/acdc-synth --split test

Prediction is predict.py's (inference.predict_volume: the same padding, normalisation and flips),
the numbers are metrics.py's. Writes into --out (default: eval-<checkpoint file name>-<split> beside
the checkpoint): metrics.json (the summary, written last: it marks a finished evaluation),
metrics.csv (one row per patient and phase), patientNNN_frameFF_pred.nii.gz (labels on the source
image's grid, so ITK-SNAP or 3D Slicer overlays them) and patientNNN.svg (basal, mid and apical
slices at ED and ES: image, truth, prediction, with the Dice of each structure). Scores on data
that phantom.py wrote say "synthetic phantom".
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

import acdc
import distributed
import files
import inference
import normalisation
import pictures
import precision
import training
from metrics import (STRUCTURES, agreement, clinical_indices, mean_std, paper_iou_summary, score_volume,
                     slice_iou)


def case_svg(path, title, rows):
    """rows of (caption, image, truth, prediction (X, Y, Z) each, slice index) -> an SVG: each row
    image | truth overlay | prediction overlay under its caption, intensities windowed at the
    1st/99th percentile of the volume. Slices are shown as the model sees them: X down, Y across."""
    tiles, captions, windowed = [], [], {}
    for caption, image, truth, pred, z in rows:
        if id(image) not in windowed:  # one window per volume, computed once for its rows
            windowed[id(image)] = pictures.grey(image)
        gray = windowed[id(image)][:, :, z]
        tiles.append([gray.expand(3, -1, -1), pictures.overlay(gray, truth[:, :, z]),
                      pictures.overlay(gray, pred[:, :, z])])
        captions.append(caption)
    pictures.write_svg(path, [pictures.Tiles(tiles, title=title, captions=captions)])


def cell(value, spec):
    """a number for the table, or n/a where it is undefined (nan)"""
    return "n/a" if value != value else format(value, spec)


def table(m):
    """the summary as plain aligned text"""
    p = m["paper_slice_iou"]
    data = m["data"]["path"] + (" (synthetic phantom, not ACDC)" if m["data"]["synthetic_phantom"] else "")
    lines = [f"data: {data}",
             f"split '{m['split']}': {m['cases']} patients, {m['volumes']} volumes",
             f"paper protocol (2D, {p['slices']} slices, mean +- std over slices):",
             f"  mean IoU with background {p['mean_iou_with_background']:.4f} "
             f"+- {p['std_iou_with_background']:.4f}"
             f"   structures only {p['mean_iou_structures']:.4f} +- {p['std_iou_structures']:.4f}",
             "  per class: " + "  ".join(f"{k} {v:.4f}" for k, v in p["per_class_iou"].items()),
             "challenge protocol (3D volumes, mean +- std over patients):",
             f"  {'phase':<6}{'structure':<10}{'Dice':>18}{'HD (mm)':>18}{'HD95 (mm)':>18}"]
    for phase, per in m["challenge"].items():
        for s, v in per.items():
            cells = [f"{cell(v[k]['mean'], '.3f')} +- {cell(v[k]['std'], '.3f')}"
                     for k in ("dice", "hd", "hd95")]
            missing = f"  (HD missing for {v['hd']['missing']})" if v["hd"]["missing"] else ""
            lines.append(f"  {phase:<6}{s:<10}{cells[0]:>18}{cells[1]:>18}{cells[2]:>18}{missing}")
    lines.append(f"  mean Dice of the three structures over ED and ES: {m['mean_dice_structures']:.4f}")
    lines += [f"clinical indices, prediction vs truth over {m['cases']} patients (corr n/a below 3):",
              f"  {'index':<12}{'corr':>8}{'bias':>10}{'std':>10}"]
    lines += [f"  {k:<12}{cell(v['corr'], '.3f'):>8}{cell(v['bias'], '.2f'):>10}{cell(v['std'], '.2f'):>10}"
              for k, v in m["clinical"].items()]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the script

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="RUN/best.pt of train_segment.py, or a fine-tuned checkpoint of the paper")
    p.add_argument("--data", help="ACDC root (training/, testing/ or a folder holding them); required")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "testing"],
                   help="the paper's patient split (test: 1, 11, ..., 91), or ACDC's testing set (101-150)")
    p.add_argument("--out", default=None,
                   help="output folder (by default eval-<checkpoint file name>-<split> beside the "
                        "checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of a finished evaluation in --out")
    training.add_device_args(p, amp="off", tf32="off")  # IEEE fp32, as the paper scored
    inference.add_args(p)
    p.add_argument("--outputs", default="all", choices=["all", "metrics"],
                   help="all: masks and pictures too; metrics: metrics.json and metrics.csv only (the study "
                        "runner's choice, for hundreds of runs)")
    args = p.parse_args(argv)
    if args.data is None:
        p.error(training.NO_DATA)
    return args


class CaseVolumes(torch.utils.data.Dataset):
    """-> (case, [(frame, image volume, label volume)] for ED and ES, or the problem in words), read by
    loader workers while the model works on the previous patient. A problem travels as a message: an
    exception raised in a worker would reach the user wrapped in the worker's traceback."""

    def __init__(self, cases, norm):
        self.cases, self.norm = cases, norm

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, i):
        case, volumes = self.cases[i], []
        try:
            for f in case.frames:
                image = inference.checked(f.image, acdc.read_volume(f.image), self.norm)
                label = acdc.read_label(f.label)
                if image.data.shape != label.data.shape:
                    raise acdc.DatasetError(f"{f.label}: labels of shape {label.data.shape}, "
                                            f"the image {f.image} {image.data.shape}")
                volumes.append((f, image, label))
        except acdc.DatasetError as e:
            return case, str(e)
        return case, volumes


def as_is(item):  # the loader's collate_fn: volumes stay numpy arrays with their nibabel headers
    return item


def summarize(rows, ious, clinical):
    """the paper's 2D protocol over slices, the challenge's 3D one over patients, clinical indices"""
    per_phase = lambda phase, key: [r[key] for r in rows if r["phase"] == phase]
    dice_all = [r[f"dice_{s}"] for r in rows for s in STRUCTURES.values()]
    return {"paper_slice_iou": paper_iou_summary(torch.cat(ious)),
            "mean_dice_structures": sum(dice_all) / len(dice_all),  # RV, MYO, LV over every volume
            "challenge": {phase: {s: {m: mean_std(per_phase(phase, f"{m}_{s}"))
                                      for m in ("dice", "hd", "hd95")}
                                  for s in STRUCTURES.values()} for phase in ("ED", "ES")},
            "clinical": {k: agreement([p[k] for p, _ in clinical], [t[k] for _, t in clinical])
                         for k in clinical[0][0]}}


def main(args):
    t0 = time.time()
    # ---- output folder, checked before any work (a finished evaluation is never overwritten silently)
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    beside = os.path.dirname(os.path.abspath(args.checkpoint))
    out = args.out or os.path.join(beside, f"eval-{stem}-{args.split}")
    if problem := files.folder_problem(out):
        sys.exit(f"error: --out {out}: {problem}")
    if os.path.exists(os.path.join(out, "metrics.json")) and not args.overwrite:
        sys.exit(f"error: --out {out} holds a finished evaluation (metrics.json): pass --overwrite or choose "
                 f"another --out")
    device = distributed.setup(args.device).device
    autocast, _, amp = precision.autocast(device, args.amp, args.tf32)  # before the model

    # ---- data and model
    print(f"data: {acdc.describe(args.data)}")
    phantom = " (synthetic phantom)" if acdc.is_phantom(args.data) else ""
    try:
        cases = acdc.find_cases(args.data, split=args.split)  # other splits' problems do not stop this one
    except acdc.DatasetError as e:
        sys.exit(f"error: --data: {e}")
    unlabelled = [c.path for c in cases if len(c.frames) < 2]
    if unlabelled:
        sys.exit(f"error: --data: {unlabelled[0]}: no _gt label files for ED and ES ({len(unlabelled)} such "
                 f"patients); ACDC's testing set came without labels before its 2020 re-release: "
                 f"segment it with predict.py")
    model, from_checkpoint = inference.load_model(args.checkpoint, device, trust=args.trust_checkpoint,
                                                  flag="--checkpoint")
    norm = normalisation.for_inference(args.norm, from_checkpoint)
    loader = torch.utils.data.DataLoader(CaseVolumes(cases, norm), batch_size=None, collate_fn=as_is,
                                         num_workers=args.workers)
    net = torch.compile(model) if args.compile else model
    print(f"evaluating {len(cases)} patients of split '{args.split}' on {device}, amp {amp}, "
          f"tta {'on' if args.tta else 'off'}; input normalised as (x - {norm[0]:.6g}) / {norm[1]:.6g}, "
          f"{norm[2]}; writing to {out}")
    files.makedirs(out)
    if os.path.exists(os.path.join(out, "metrics.json")):  # --overwrite: the old summary goes first, so an
        os.remove(os.path.join(out, "metrics.json"))        # interrupted run never passes for a finished one

    # ---- loop over patients: predict the ED and ES volumes, score them, write masks and a picture
    rows, ious, clinical, per_volume = [], [], [], []
    for case, frames in tqdm(loader, desc="patients", unit="patient", disable=None):
        if isinstance(frames, str):
            raise acdc.DatasetError(frames)
        tiles, phases = [], {}
        for frame, image, label in frames:
            spacing = image.spacing  # mm along X, Y, Z
            seen = inference.model_spacing(spacing, model.train_spacing[0], args.resample)
            pred = inference.predict_volume(net, image.data, device, norm, autocast, args.batch_size,
                                            args.min_size, args.tta, spacing, seen)  # (X, Y, Z) uint8
            truth = torch.from_numpy(label.data).to(device)
            row = {"patient": case.patient, "frame": frame.frame, "phase": frame.phase,
                   "slices": pred.shape[2], **score_volume(pred, truth, spacing)}
            rows.append(row)
            per_volume.append({"patient": case.patient, "frame": frame.frame, "spacing_mm": list(spacing),
                               "model_spacing_mm": list(seen)})
            ious.append(slice_iou(pred.permute(2, 0, 1), truth.permute(2, 0, 1)).cpu())  # (Z, C)
            phases[frame.phase] = (pred, truth, spacing)
            if args.outputs == "all":
                pred_cpu = pred.cpu()  # one copy back, for the NIfTI file and the picture
                name = f"patient{case.patient:03d}_frame{frame.frame:02d}"
                files.write_nifti(os.path.join(out, f"{name}_pred.nii.gz"), pred_cpu.numpy(), image)
                dice = ", ".join(f"{s} {row[f'dice_{s}']:.3f}" for s in STRUCTURES.values())
                volume, labels = torch.from_numpy(image.data), torch.from_numpy(label.data)
                tiles += [(f"{frame.phase} (frame {frame.frame}), slice {z + 1} of {pred.shape[2]}; "
                           f"the volume's Dice {dice}", volume, labels, pred_cpu, z)
                          for z in pictures.pick_slices(truth)]
        (ed_pred, ed_truth, ed_sp), (es_pred, es_truth, es_sp) = phases["ED"], phases["ES"]
        clinical.append((clinical_indices(ed_pred, es_pred, ed_sp, es_sp),
                         clinical_indices(ed_truth, es_truth, ed_sp, es_sp)))
        if args.outputs == "all":
            case_svg(os.path.join(out, f"patient{case.patient:03d}.svg"),
                     f"patient{case.patient:03d}{phantom}: image | truth | prediction", tiles)

    # ---- summary; metrics.json last: its presence marks a finished evaluation
    metrics = {"checkpoint": os.path.abspath(args.checkpoint),
               "data": {"path": os.path.abspath(args.data), "synthetic_phantom": bool(phantom)},
               "split": args.split, "cases": len(cases), "volumes": len(rows),
               **summarize(rows, ious, clinical),
               "normalisation": {"mean": norm[0], "std": norm[1], "source": norm[2]}, "tta": args.tta,
               "device": str(device), "amp": amp, "precision": precision.name(device, amp),
               "min_size": args.min_size, "resample": args.resample, "per_volume": per_volume,
               "seconds": round(time.time() - t0, 1)}
    files.write_csv(os.path.join(out, "metrics.csv"), rows)
    files.write_json(os.path.join(out, "metrics.json"), metrics)
    print(table(metrics))
    return metrics


if __name__ == "__main__":
    training.run_main(main, parse_args())
