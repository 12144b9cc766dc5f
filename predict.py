"""Segmenting new scans with a fine-tuned U-Net: masks, volumes, clinical indices, pictures.

    python predict.py --checkpoint runs/seg/best.pt -i scans/ patient001_4d.nii.gz -o predictions

INPUT: any mix of NIfTI files (.nii, .nii.gz) holding a 3D short-axis stack (X, Y, Z) or a 4D cine (X, Y, Z, T),
and folders searched for them recursively, links followed (an ACDC root is one); label files (*_gt.nii*) and masks
predict.py wrote are skipped. The model segments the slices [:, :, z], as it was trained: the stack must run along
the third axis, at a pixel size near the training data's (ACDC: 1.37-1.68 mm), or --resample auto resamples it.

Writes into OUT (a folder holding files only with --overwrite, which replaces only predict.py's files):
  <path relative to its input folder>/X_pred.nii.gz
                  uint8 labels (0 background, 1 RV, 2 MYO, 3 LV) on the source grid, with its affine
                  and header (descrip: predict.py's mark); a cine gives a 4D label file
  volumes.csv     a row per volume, per frame of a cine: file, frame (from 1; empty for a 3D file),
                  spacing_x, spacing_y, spacing_z (mm), slices, RV_ml, MYO_ml, LV_ml
  indices.csv     a row per cine and per ACDC patient folder (none: no file, summary.json says why): case,
                  ed_frame, es_frame, ed_es_source (Info.cfg beside the file, else the frames of largest
                  and smallest predicted LV volume), LV and RV EDV, ESV, SV (mL), EF (%), MYO_mass_g (ED, 1.05 g/mL)
  X_volumes.svg   per cine: LV and RV volume over the cardiac cycle, ED and ES marked
  X_slices.svg    per 3D file, cine or ACDC case: basal, mid and apical slices (each image, then the
                  prediction over it), a row for the volume or for ED and ES, the ejection fractions
  summary.json    the model, its input normalisation and where it came from, the device, every file
                  segmented (with its warnings) or refused (with the reason), the outputs; written last

A file that cannot be segmented (not NIfTI, damaged, 2 or 5 dimensions, NaN, beyond float32) is refused
in one line that names it; the others are still segmented, and the exit status is then 1.
"""
import argparse
import json
import os
import sys
import time

import nibabel as nib
import numpy as np
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
from metrics import ed_es_frames, implausible, indices_of_volumes, volumes_ml

VOLUME_FIELDS = ["file", "frame", "spacing_x", "spacing_y", "spacing_z", "slices", "RV_ml", "MYO_ml", "LV_ml"]
INDEX_FIELDS = ["case", "ed_frame", "es_frame", "ed_es_source", "LV_EDV", "LV_ESV", "LV_SV", "LV_EF",
                "RV_EDV", "RV_ESV", "RV_SV", "RV_EF", "MYO_mass_g"]
COLOUR = dict(pictures.LEGEND)  # RV red, LV blue: the overlays' colours


# -----------------------------------------------------------------------------
# finding and reading the scans

def stem_of(path):
    """'a/b_4d.nii.gz' -> 'a/b_4d'"""
    return path[:-len(".nii.gz")] if path.lower().endswith(".nii.gz") else path[:-len(".nii")]


def is_nifti(path):
    return path.lower().endswith((".nii", ".nii.gz"))


def is_label(path):
    return stem_of(os.path.basename(path)).lower().endswith("_gt") or files.is_mask(path)


def find_scans(inputs, out):
    """-> ([(path, path relative to its input folder)], [(path, why refused)], label files skipped):
    files given, and those found under folders given (hidden folders and OUT left out, links followed once each)"""
    found, refused, skipped = [], [], 0
    for given in inputs:
        if os.path.isdir(given):
            walked = {os.path.realpath(out)}
            for folder, subfolders, names in os.walk(given, followlinks=True):
                walked.add(os.path.realpath(folder))
                subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                                       and os.path.realpath(os.path.join(folder, d)) not in walked)
                for name in sorted(n for n in names if is_nifti(n) and not n.startswith(".")):
                    path = os.path.join(folder, name)
                    if is_label(path):
                        skipped += 1
                    else:
                        found.append((path, os.path.relpath(path, given)))
        elif not os.path.exists(given):
            refused.append((given, "not found"))
        elif not is_nifti(given):
            refused.append((given, "not a NIfTI file (expected .nii or .nii.gz)"))
        elif is_label(given):
            refused.append((given, "a label file (*_gt) or a predicted mask: give the image it labels"))
        else:
            found.append((given, os.path.basename(given)))
    # a file given twice (itself and inside a folder) is segmented once; two files never share an output
    kept, seen, outputs = [], set(), {}
    for path, rel in found:
        if os.path.realpath(path) in seen:
            continue
        if stem_of(rel) in outputs:
            refused.append((path, f"its output {stem_of(rel)}_pred.nii.gz would replace that of "
                                  f"{outputs[stem_of(rel)]}: segment it into another --out"))
            continue
        seen.add(os.path.realpath(path))
        outputs[stem_of(rel)] = path
        kept.append((path, rel))
    return kept, refused, skipped


def read_scan(path):
    """-> acdc.Volume of a 3D volume or a 4D cine; acdc.DatasetError naming the file and the reason"""
    try:
        with files.naming(path):  # nibabel's header warnings say which file
            shape = nib.load(path).shape
    except Exception as e:  # nibabel's ImageFileError, gzip's and others: not a NIfTI file we can read
        raise acdc.DatasetError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: "
                                f"{' '.join(str(e).split())})") from e
    if len(shape) not in (3, 4):
        raise acdc.DatasetError(f"{path}: {len(shape)}D, shape {shape}; expected a 3D volume (X, Y, Z) "
                                f"or a 4D cine (X, Y, Z, T)")
    return acdc.read_volume(path, ndim=len(shape))


class Scans(torch.utils.data.Dataset):
    """-> the Volume of each path, or the reason it cannot be read (a message: an exception raised in
    a loader worker would reach the user wrapped in the worker's traceback)"""

    def __init__(self, paths, norm):
        self.paths, self.norm = paths, norm

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return inference.checked(self.paths[i], read_scan(self.paths[i]), self.norm)
        except acdc.DatasetError as e:
            return str(e)


def as_is(item):  # the loader's collate_fn: a volume stays a numpy array with its nibabel header
    return item


def info_frames(path):
    """(ED, ES) of the Info.cfg beside `path` (an ACDC patient folder), or None"""
    cfg = os.path.join(os.path.dirname(path), "Info.cfg")
    info = acdc.read_info(cfg) if os.path.isfile(cfg) else {}
    return (info["ED"], info["ES"]) if all(isinstance(info.get(k), int) for k in ("ED", "ES")) else None


def frame_pairs(scans):
    """{path: "ED" or "ES"} of the ED and ES frame files of ACDC patient folders that hold no cine
    (Info.cfg, patientNNN_frameFF.nii.gz): such a folder is a case of its own"""
    by_folder = {}
    for path, _ in scans:
        by_folder.setdefault(os.path.dirname(path), []).append(path)
    pairs = {}
    for folder, paths in by_folder.items():
        frames = info_frames(os.path.join(folder, "Info.cfg"))
        if frames is None or any(stem_of(p).endswith("_4d") for p in paths):
            continue
        named = {phase: [p for p in paths if stem_of(p).endswith(f"_frame{f:02d}")]
                 for phase, f in zip(("ED", "ES"), frames)}
        if all(len(v) == 1 for v in named.values()):
            pairs.update({named[phase][0]: phase for phase in named})
    return pairs


def refuse_foreign(out, scans):
    """-> the names outputs may take in OUT; exits (1) if one is a file neither marked nor listed as predict.py's"""
    try:
        with open(os.path.join(out, "summary.json")) as f:
            ours = {"summary.json", *json.load(f)["outputs"]}
    except (OSError, ValueError, KeyError, TypeError):  # none, or not predict.py's
        ours = set()
    planned = [(name, "all inputs (the tables)") for name in ("volumes.csv", "indices.csv", "summary.json")]
    planned += [(stem_of(rel) + end, path) for path, rel in scans for end in ("_pred.nii.gz", "_volumes.svg",
                                                                             "_slices.svg")]
    planned += [(os.path.join(os.path.dirname(rel), os.path.basename(os.path.dirname(path))) + "_slices.svg", path)
                for path, rel in scans]  # the picture of an ACDC folder's ED and ES
    for name, source in planned:
        path = os.path.join(out, name)
        if os.path.lexists(path) and name not in ours and not files.is_mask(path):
            sys.exit(f"error: {path}: not written by predict.py (no mark, not in summary.json), and the output "
                     f"of {source} would replace it: move it or choose another --out")
    return [name for name, _ in planned]


def phantom_input(path):
    """whether `path` lies inside a phantom that phantom.py wrote (its marker in a folder above)"""
    folder = os.path.abspath(path)
    while True:
        if os.path.isfile(os.path.join(folder, acdc.PHANTOM_MARKER)):
            return True
        if os.path.dirname(folder) == folder:
            return False
        folder = os.path.dirname(folder)


# -----------------------------------------------------------------------------
# a case: ED and ES, clinical indices, pictures

def choose_ed_es(lv, path, warn):
    """LV volume per frame of a cine -> (ED, ES, where they came from), frames from 1"""
    given = info_frames(path)
    if given and all(1 <= f <= len(lv) for f in given):
        return (*given, "Info.cfg")
    if given:
        warn(f"Info.cfg names ED {given[0]}, ES {given[1]} but the cine has {len(lv)} frames: "
             f"choosing them from the predicted LV volume")
    return (*ed_es_frames(lv), "predicted LV volume (largest, smallest)")


def measure(labels, spacing, rel):
    """(X, Y, Z[, T]) labels -> (volumes_ml of each frame, their rows of volumes.csv)"""
    cine = labels.dim() == 4
    volumes = [volumes_ml(v, spacing) for v in (labels.unbind(3) if cine else [labels])]
    rows = [{"file": rel, "frame": t + 1 if cine else "", **dict(zip(VOLUME_FIELDS[2:5], spacing)),
             "slices": labels.shape[2], **{f"{s}_ml": v[s] for s in ("RV", "MYO", "LV")}}
            for t, v in enumerate(volumes)]
    return volumes, rows


def case_name(path, rel):
    """an ACDC patient folder's path relative to the input (its own name when it is the input), else
    the cine's"""
    if info_frames(path) is None:
        return stem_of(rel)
    return os.path.dirname(rel) or os.path.basename(os.path.dirname(os.path.abspath(path)))


def case_row(case, ed, es, source, ed_volumes, es_volumes, warn):
    indices = indices_of_volumes(ed_volumes, es_volumes)
    warn(*implausible(ed_volumes, indices))  # a failed segmentation, or no short-axis cine
    indices["MYO_mass_g"] = indices.pop("MYO_mass")
    return {"case": case, "ed_frame": ed, "es_frame": es, "ed_es_source": source, **indices}


def slices_svg(path, title, rows, case=None):
    """X_slices.svg: rows of (caption, image, labels); a case's ejection fractions under the title"""
    ef = f"ejection fraction: LV {pictures.percent(case['LV_EF'])}, RV {pictures.percent(case['RV_EF'])}" \
        if case else ""
    pictures.write_svg(path, [pictures.slice_tiles(title, rows, ef)])


def volumes_svg(path, case, volumes, ed, es, phantom):
    frames = list(range(1, len(volumes) + 1))
    title = f"{case}: volumes over the cardiac cycle{' (synthetic phantom)' if phantom else ''}"
    width = max(400, 12 * len(frames), 8 * len(title) - 90)  # room for the title
    chart = pictures.Chart(title, "frame", "volume (mL)", plot_width=width)
    for s in ("LV", "RV"):
        chart.line(frames, [v[s] for v in volumes], s, colour=COLOUR[s])
    chart.mark(ed, f"ED {ed}").mark(es, f"ES {es}", colour="#b00000")
    pictures.write_svg(path, [chart])


# -----------------------------------------------------------------------------
# the script

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a segmentation checkpoint: RUN/best.pt of train_segment.py, or a fine-tuned one of "
                        "the paper")
    p.add_argument("-i", "--input", nargs="+", required=True, metavar="INPUT",
                   help="NIfTI files (.nii, .nii.gz; 3D or 4D) and folders searched for them (e.g. an ACDC "
                        "root)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out folder holding files, replacing only predict.py's own outputs")
    training.add_device_args(p, amp="off", tf32="off")  # IEEE fp32, as the paper scored
    inference.add_args(p, resample="auto")
    return p.parse_args(argv)


def main(args):
    t0 = time.time()
    # ---- output folder, checked before any work (its results are never overwritten silently)
    out = args.out
    if problem := files.folder_problem(out):
        sys.exit(f"error: -o/--out {out}: {problem}")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        held = "a finished prediction, summary.json" if os.path.exists(os.path.join(out, "summary.json")) \
            else f"{len(os.listdir(out))} entries"
        sys.exit(f"error: -o/--out {out} is not empty ({held}): pass --overwrite to write over its results, "
                 f"or choose another --out")

    # ---- inputs
    scans, refused, skipped = find_scans(args.input, out)
    phantom = {given: phantom_input(given) for given in args.input if os.path.exists(given)}
    for given, synthetic in phantom.items():
        print(f"input: {os.path.abspath(given)}{' (synthetic phantom, not ACDC)' if synthetic else ''}")
    for path, reason in refused:
        print(f"refused: {path}: {reason}", file=sys.stderr)
    if not scans:
        sys.exit(f"error: -i/--input: no NIfTI scan (.nii, .nii.gz) found in {' '.join(args.input)}")
    pairs = frame_pairs(scans)
    outputs = refuse_foreign(out, scans)

    # ---- model
    device = distributed.setup(args.device).device
    autocast, _, amp = precision.autocast(device, args.amp, args.tf32)  # before the model
    model, from_checkpoint = inference.load_model(args.checkpoint, device, args.trust_checkpoint, "--checkpoint")
    trained, spacing_source = model.train_spacing
    norm = normalisation.for_inference(args.norm, from_checkpoint)
    net = torch.compile(model) if args.compile else model
    print(f"segmenting {len(scans)} files ({skipped} label files skipped) on {device}, amp {amp}, "
          f"tta {'on' if args.tta else 'off'}; input normalised as (x - {norm[0]:.6g}) / {norm[1]:.6g}, "
          f"{norm[2]}; trained on in-plane spacing {trained['in_plane'][0]:g}-{trained['in_plane'][1]:g} mm, "
          f"{spacing_source}; writing to {out}")
    files.makedirs(out)
    output = lambda stem, suffix: os.path.join(out, stem + suffix)  # noqa: E731
    if os.path.exists(os.path.join(out, "summary.json")):  # --overwrite: the old summary goes first, so an
        os.remove(os.path.join(out, "summary.json"))        # interrupted run never passes for a finished one

    # ---- loop over files: predict, write the mask, measure; a cine (or an ED/ES pair) is a case
    loader = torch.utils.data.DataLoader(Scans([p for p, _ in scans], norm), batch_size=None,
                                         collate_fn=as_is, num_workers=args.workers)
    volume_rows, case_rows, done, pending = [], [], [], {}
    bar = tqdm(zip(scans, loader), total=len(scans), desc="scans", unit="file", disable=None)
    for (path, rel), scan in bar:
        if isinstance(scan, str):
            refused.append((path, scan.removeprefix(f"{path}: ")))
            tqdm.write(f"refused: {scan}", file=sys.stderr)
            continue
        warnings = []

        def warn(*messages):
            for message in messages:
                warnings.append(message)
                tqdm.write(f"warning: {path}: {message}", file=sys.stderr)
        spacing = scan.spacing[:3]
        seen = inference.model_spacing(spacing, trained, args.resample)
        warn(*inference.geometry_warnings(spacing, trained, seen))
        labels = inference.predict_volume(net, scan.data, device, norm, autocast, args.batch_size,
                                          args.min_size, args.tta, spacing, seen)  # (X, Y, Z[, T]) uint8
        stem = stem_of(rel)
        files.makedirs(os.path.dirname(os.path.join(out, stem)))
        files.write_nifti(output(stem, "_pred.nii.gz"), labels.cpu().numpy(), scan)
        volumes, rows = measure(labels, spacing, rel)
        volume_rows += rows
        done.append({"file": path, "output": stem + "_pred.nii.gz", "shape": list(labels.shape),
                     "spacing_mm": list(spacing), "model_spacing_mm": list(seen), "warnings": warnings})

        folder, case = os.path.dirname(path), case_name(path, rel)
        if labels.dim() == 4:  # a cine
            ed, es, source = choose_ed_es([v["LV"] for v in volumes], path, warn)
            case_rows.append(case_row(case, ed, es, source, volumes[ed - 1], volumes[es - 1], warn))
            volumes_svg(output(stem, "_volumes.svg"), case, volumes, ed, es, phantom_input(path))
            image = torch.from_numpy(np.asarray(scan.data))
            slices_svg(output(stem, "_slices.svg"), rel, [(f"{phase}, frame {t}", image[..., t - 1],
                                                           labels[..., t - 1].cpu()) for phase, t in
                                                          (("ED", ed), ("ES", es))], case_rows[-1])
        elif path in pairs:  # an ACDC folder without a cine: its ED and ES files make the case
            pending.setdefault(folder, {})[pairs[path]] = (torch.from_numpy(scan.data), labels.cpu(),
                                                           volumes[0])
            if len(pending[folder]) == 2:
                pair, frames = pending.pop(folder), dict(zip(("ED", "ES"), info_frames(path)))
                case_rows.append(case_row(case, *frames.values(), "Info.cfg", pair["ED"][2], pair["ES"][2], warn))
                svg = output(os.path.join(os.path.dirname(stem), os.path.basename(folder)), "_slices.svg")
                slices_svg(svg, case, [(f"{p}, frame {t}", *pair[p][:2]) for p, t in frames.items()], case_rows[-1])
        else:  # a 3D volume of its own
            slices_svg(output(stem, "_slices.svg"), rel, [("3D volume", torch.from_numpy(scan.data), labels.cpu())])

    # ---- tables, then summary.json last: its presence marks a finished prediction
    files.write_csv(os.path.join(out, "volumes.csv"), volume_rows, VOLUME_FIELDS)
    if case_rows:  # none: summary.json says why
        files.write_csv(os.path.join(out, "indices.csv"), case_rows, INDEX_FIELDS)
    summary = {"checkpoint": os.path.abspath(args.checkpoint),
               "model": {"arch": model.arch, "classes": ["background", "RV", "MYO", "LV"]},
               "normalisation": {"mean": norm[0], "std": norm[1], "source": norm[2]},
               "train_spacing_mm": {**trained, "source": spacing_source},
               "device": str(device), "device_name": training.device_name(device), "amp": amp,
               "precision": precision.name(device, amp), "tta": args.tta, "resample": args.resample,
               "min_size": args.min_size, "batch_size": args.batch_size,
               "inputs": [{"path": os.path.abspath(g), "synthetic_phantom": phantom.get(g, False)}
                          for g in args.input],
               "synthetic_phantom": any(phantom.values()),
               "outputs": [n for n in outputs if os.path.exists(os.path.join(out, n))],  # --overwrite replaces them
               "segmented": done, "refused": [{"file": p, "reason": r} for p, r in refused],
               "label_files_skipped": skipped, "cases": case_rows, "seconds": round(time.time() - t0, 1),
               "indices": "indices.csv" if case_rows else "none: no cine, no ACDC folder's ED and ES among the inputs"}
    files.write_json(os.path.join(out, "summary.json"), summary)
    for r in case_rows:
        print(f"{r['case']}: ED frame {r['ed_frame']}, ES frame {r['es_frame']} ({r['ed_es_source']}); "
              f"LV EDV {r['LV_EDV']:.1f} mL, ESV {r['LV_ESV']:.1f} mL, EF {pictures.percent(r['LV_EF'])}; "
              f"RV EDV {r['RV_EDV']:.1f} mL, EF {pictures.percent(r['RV_EF'])}; myocardium {r['MYO_mass_g']:.1f} g")
    note = " (synthetic phantom, not ACDC)" if summary["synthetic_phantom"] else ""
    print(f"segmented {len(done)} files{note}, {len(case_rows)} cases: masks, pictures, volumes.csv, "
          f"{'indices.csv, ' if case_rows else ''}summary.json in {out}")
    if refused:
        sys.exit(f"error: {len(refused)} file(s) refused, the first: {refused[0][0]}: {refused[0][1]} "
                 f"(all in summary.json)")
    return summary


if __name__ == "__main__":
    training.run_main(main, parse_args())
