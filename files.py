"""Output files written atomically: text, JSON, CSV, NIfTI labels, torch objects; JSON-lines logs.

Every file goes to a temporary name in the same folder and is then renamed over the final one, so
a crash or a kill never leaves half a file under the final name, and a reader sees the old file or
the new one, never a mixture.
"""
import contextlib
import csv
import io
import json
import logging
import math
import os

import nibabel as nib
import numpy as np
import torch

MASK_MARK = b"labels predicted by predict.py or evaluate.py"  # in a mask's header: never taken for a scan
made = []  # the folders that makedirs created in this process: a failure removes those it left empty


def folder_problem(path):
    """why `path` cannot be an output folder, or None: a file is there, or the nearest folder that
    exists on the way to it cannot be written. Scripts check --out with it before any work."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "a file is there, not a folder"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to write in {parent}"
    return None


def process_gone(pid):
    """whether no process of this id runs on this host (another user's counts as running)"""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return False
    except (ProcessLookupError, OverflowError):  # (OverflowError: a pid beyond any process's)
        return True
    return False


def write_atomic(path, write):
    """write(temporary path), then rename: a crash never leaves half a file under the final name"""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp{os.getpid()}.{name}")  # keeps the extension: nibabel and numpy go by it
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk names no file, or the temporary one: name the file being written
        raise OSError(e.errno, e.strerror or str(e), path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def makedirs(path):
    """os.makedirs(path, exist_ok=True), remembering the folders it creates (see remove_empty_made)"""
    if not os.path.isdir(path):
        makedirs(os.path.dirname(os.path.abspath(path)))
        made.append(path)
        os.mkdir(path)


def remove_empty_made():
    """the folders makedirs created that are left empty (by a failure) go, the deepest first"""
    for folder in reversed(made):
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def save_atomic(obj, path):
    """torch.save, atomically (checkpoints, exported weights)"""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def append_jsonl(path, record):
    """one JSON line appended (log.jsonl)"""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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


def read_jsonl(path):
    """the records of a JSON-lines log (log.jsonl); a torn last line, what a kill or a full disk during
    an append leaves, is left out with a one-line notice"""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    try:
        return records + [json.loads(line) for line in lines[-1:]]
    except ValueError:
        print(f"notice: {path}: its last line is torn (an append cut short): left out")
        return records


@contextlib.contextmanager
def naming(path):
    """nibabel's header warnings (its 'nibabel.global' log) start with `path`: alone they name no file"""
    def name(record):
        record.msg, record.args = f"warning: {path}: {record.getMessage()}", ()
        return True
    logging.getLogger("nibabel.global").addFilter(name)
    try:
        yield
    finally:
        logging.getLogger("nibabel.global").removeFilter(name)


def write_nifti(path, labels, source):
    """uint8 labels on the source volume's grid: its format (NIfTI-1 or -2), affine and header (viewers
    overlay them), marked as predict.py's"""
    kind = nib.Nifti2Image if isinstance(source.header, nib.Nifti2Header) else nib.Nifti1Image
    with naming(path):
        img = kind(np.asarray(labels, dtype=np.uint8), source.affine, source.header.copy())
        img.set_data_dtype(np.uint8)
        img.header.set_slope_inter(1, 0)  # labels are stored as they are, never rescaled
        img.header["descrip"] = MASK_MARK
        write_atomic(path, lambda tmp: nib.save(img, tmp))


def is_mask(path):
    """whether a NIfTI file is a mask that write_nifti wrote (its mark in the header)"""
    try:
        return nib.load(path).header["descrip"].item() == MASK_MARK
    except Exception:  # not NIfTI, damaged: not a mask of ours
        return False
