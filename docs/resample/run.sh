#!/bin/sh
# The resampling measurement (README, "Segment your own scans", Geometry): Dice on the phantom's test
# patients (1 and 11) resampled to 0.7 mm in-plane, about twice as fine as the 1.2-1.9 mm the model is
# trained on, evaluated without (--resample off, the paper's protocol) and with resampling (on; auto
# does the same here, 0.7 mm being far outside the training range). The model is the quickstart's,
# trained on the phantom at its own spacing. About 10 minutes on 2 CPU cores. From the repository root:
#     sh docs/resample/run.sh            (OUT=folder to choose where; default runs/resample)
# Results: $OUT/eval-off/metrics.json and $OUT/eval-on/metrics.json ("mean_dice_structures", and
# "per_volume" with spacing_mm and model_spacing_mm); the last lines print both mean Dice.
set -eu
OUT=${OUT:-runs/resample}

# 1. the phantom (20 patients, 1.2-1.9 mm in-plane), and a copy whose ED/ES images and labels are
#    resampled to 0.7 mm in-plane (images bilinear, labels nearest; the affine scaled to match)
python phantom.py "$OUT/phantom" --patients 20 --seed 0 --overwrite
python - "$OUT/phantom" "$OUT/fine" <<'PY'
import glob, os, shutil, sys

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

src, dst, mm = sys.argv[1], sys.argv[2], 0.7
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
for path in sorted(glob.glob(os.path.join(dst, "training", "patient*", "patient*_frame[0-9][0-9]*.nii.gz"))):
    img = nib.load(path)
    sx, sy = (float(s) for s in img.header.get_zooms()[:2])
    data = torch.from_numpy(np.asanyarray(img.dataobj).astype(np.float32)).permute(2, 0, 1)[:, None]  # (Z, 1, X, Y)
    size = (round(data.shape[2] * sx / mm), round(data.shape[3] * sy / mm))
    label = path.endswith("_gt.nii.gz")
    fine = F.interpolate(data, size=size, mode="nearest-exact" if label else "bilinear")
    fine = fine[:, 0].permute(1, 2, 0).numpy().astype(np.uint8 if label else np.float32)  # (X, Y, Z)
    nib.save(nib.Nifti1Image(fine, img.affine @ np.diag([mm / sx, mm / sy, 1.0, 1.0])), path)
print(f"{dst}: ED and ES frames resampled to {mm} mm in-plane")
PY

# 2. a small model trained on the phantom at its own spacing (the quickstart's recipe, best.pt stores
#    the training spacing range)
python train_segment.py --data "$OUT/phantom" --out "$OUT/model" --arch resnet18 --size 128 --batch-size 16 \
    --epochs 8 --warmup-epochs 1 --lr 2e-3 --loss ce+dice --crop-scale 0.25 1 --resume auto

# 3. the fine scans evaluated without and with resampling
for r in off on; do
    python evaluate.py --checkpoint "$OUT/model/best.pt" --data "$OUT/fine" --split test --resample $r \
        --out "$OUT/eval-$r" --overwrite
done
for r in off on; do
    python -c "import json, sys; m = json.load(open(sys.argv[1])); print('--resample', sys.argv[2], 'mean Dice',
        round(m['mean_dice_structures'], 4), 'model spacing', m['per_volume'][0]['model_spacing_mm'])" \
        "$OUT/eval-$r/metrics.json" $r
done
