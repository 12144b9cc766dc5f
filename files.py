"""Output files written atomically: text, JSON, CSV, NIfTI labels.

Every file goes to a temporary name in the same folder and is then renamed over the final one, so
a crash or a kill never leaves half a file under the final name, and a reader sees the old file or
the new one, never a mixture.
"""
import csv
import io
import json
import math
import os
import sys
import tempfile

import nibabel as nib
import numpy as np


def check_folder(path, flag):
    """make sure `path` is a folder this process can write into (creating it), before any work is
    done: a clear one-line exit naming the flag, not a PermissionError on a temporary file later"""
    if os.path.exists(path) and not os.path.isdir(path):
        sys.exit(f"{flag} {path}: a file, not a folder: choose a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        sys.exit(f"{flag} {path}: cannot write there ({e.strerror or type(e).__name__}): choose another folder")


def write_atomic(path, write):
    """write(temporary path), then rename: a crash never leaves half a file under the final name"""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{os.getpid()}.{name}")  # keeps the extension: nibabel and numpy go by it
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def finite_or_none(obj):
    """nan and inf -> None (null), so JSON files are strict JSON"""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_json(path, obj):
    write_text(path, json.dumps(finite_or_none(obj), indent=2, default=str) + "\n")


def write_csv(path, rows, fields=None):
    """one row a dict; floats with 6 significant digits; an empty cell is a missing value (nan)"""
    fields = fields or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fields, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if math.isfinite(v) else "") if isinstance(v, float) else v
                    for k, v in r.items()})
    write_text(path, buf.getvalue())


def write_nifti(path, labels, source):
    """uint8 labels on the source volume's grid: its affine and header, so viewers overlay them"""
    img = nib.Nifti1Image(np.asarray(labels, dtype=np.uint8), source.affine, source.header.copy())
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1, 0)  # labels are stored as they are, never rescaled
    write_atomic(path, lambda tmp: nib.save(img, tmp))
