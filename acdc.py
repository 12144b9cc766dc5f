"""The ACDC cardiac MRI dataset on disk: cases, volumes, the paper's split, slice datasets, the check.

ACDC (Bernard et al. 2018) as downloaded, under training/ and testing/ (or database/training, ...):
    patient001/Info.cfg                       ED: 1, ES: 12, Group: DCM, Height, NbFrame, Weight
    patient001/patient001_4d.nii.gz           the cine, X x Y x Z x T
    patient001/patient001_frame01.nii.gz      the ED frame, X x Y x Z; _gt: its labels
Labels: 0 background, 1 RV, 2 MYO, 3 LV. A 2D slice is volume[:, :, z]; items hold it as (H, W) =
(X, Y), so slices stacked on a last axis give back a volume that the file's affine places.

    python acdc.py check DIR        # integrity check before training: every voxel, every problem

phantom.py writes a synthetic dataset in this layout.
"""
import argparse
import errno
import glob
import json
import hashlib
import os
import sys
import tempfile
import zlib
from collections import Counter, namedtuple
from contextlib import suppress

import nibabel as nib
import numpy as np
from tqdm import tqdm

import files

class DatasetError(Exception):
    """a problem with the data on disk; the message names the file"""


PHANTOM_MARKER = "phantom.json"  # phantom.py writes it into the root of every phantom


def is_phantom(root):
    """whether `root` (or the folder above it, for root/training) is a synthetic phantom"""
    return any(os.path.isfile(os.path.join(folder, PHANTOM_MARKER))
               for folder in (root, os.path.dirname(os.path.abspath(root))))


def describe(root):
    """'ROOT (a synthetic phantom)' or 'ROOT': how scripts name the data they read"""
    return os.path.abspath(root) + (" (synthetic phantom, not ACDC)" if is_phantom(root) else "")


def split_of(patient_id):
    """the paper's split: test 1, 11, ..., 91; val 2, 12, ..., 92; train the other 80;
    ACDC's testing set 101..150"""
    return "testing" if patient_id > 100 else {1: "test", 2: "val"}.get(patient_id % 10, "train")


# -----------------------------------------------------------------------------
# finding cases and reading volumes

Case = namedtuple("Case", "patient path info ed es frames cine")  # cine: the 4D file, or None
Frame = namedtuple("Frame", "patient frame phase image label")   # frames count from 1, as the file names do
Volume = namedtuple("Volume", "data spacing affine header")      # spacing: mm per axis


def read_info(path):  # Info.cfg: `key: value` lines; numbers become int or float, unknown keys are kept
    with open(path, errors="replace") as f:
        info = {key.strip(): value.strip() for key, sep, value in (line.partition(":") for line in f) if sep}
    for key, value in info.items():
        with suppress(ValueError):  # Group: DCM stays a string
            info[key] = int(value) if value.lstrip("+-").isdigit() else float(value)
    return info


def _nifti(stem):  # stem.nii.gz or stem.nii (both occur), or None
    return next((stem + ext for ext in (".nii.gz", ".nii") if os.path.isfile(stem + ext)), None)


def patient_folders(root, split="all", problems=None):
    """{patient id: folder} of a split (see select) under root, root/training, root/testing or
    root/database/...; a patientNNN entry that is not a readable folder (a dangling or looping
    symbolic link, a file) is a problem: it goes to the list `problems`, else raises DatasetError"""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such folder")
    found = {}
    for sub in ("", "training", "testing", "database/training", "database/testing"):
        for path in sorted(glob.glob(os.path.join(glob.escape(root), sub, "patient*"))):
            if not os.path.basename(path)[7:].isdigit():
                continue
            if not os.path.isdir(path):
                broken = unreadable_entry(path)
                if problems is None:
                    raise DatasetError(broken)
                problems.append(broken)
                continue
            found.setdefault(int(os.path.basename(path)[7:]), path)
    if not found:
        raise DatasetError(f"{root}: no patientNNN folders here nor in training/, testing/, database/: "
                           f"not the ACDC root?")
    return {patient: path for patient, path in sorted(found.items())
            if split == "all" or split_of(patient) == split}


def unreadable_entry(path):
    """why a patientNNN entry is not a folder, in one line"""
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{path}: a symbolic link loop, not a patient folder"
        return f"{path}: a symbolic link to {os.readlink(path)}, which does not exist"
    return f"{path}: not a folder"


def fingerprint(root):
    """a short hash of the dataset's content as file names and sizes per patient; not of its path, so
    a copy on a cluster's local scratch has the same fingerprint (resume compares them)"""
    digest = hashlib.sha1()
    for patient, folder in patient_folders(root).items():
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                digest.update(f"{patient}/{name}:{os.path.getsize(path)}\n".encode())
    return digest.hexdigest()[:16]


def find_cases(root, problems=None, split="all"):
    """-> [Case] of a split ("all", or see split_of), leaving out what is broken. Each problem goes to
    the list `problems` if given (the check lists them all in one pass), else raises DatasetError."""
    cases, found = [], [] if problems is None else problems
    for patient, folder in patient_folders(root, split, found).items():
        base, cfg = os.path.join(folder, os.path.basename(folder)), os.path.join(folder, "Info.cfg")
        info = read_info(cfg) if os.path.isfile(cfg) else None
        if info is None or not all(isinstance(info.get(key), int) for key in ("ED", "ES")):
            found.append(f"{cfg}: " + ("missing" if info is None
                                       else "no `ED: <frame>` and `ES: <frame>` lines"))
            continue
        frames = []
        for phase in ("ED", "ES"):
            stem = f"{base}_frame{info[phase]:02d}"
            image, label = _nifti(stem), _nifti(stem + "_gt")
            if not image:
                found.append(f"{stem}.nii.gz: missing (the {phase} frame {info[phase]} of Info.cfg)")
            # testing/ (101-150) came without labels before the 2020 re-release
            elif not label and patient <= 100:
                found.append(f"{stem}_gt.nii.gz: missing (the labels of the {phase} frame)")
            elif not label:
                continue
            else:
                frames.append(Frame(patient, info[phase], phase, image, label))
        cases.append(Case(patient, folder, info, info["ED"], info["ES"], frames, _nifti(base + "_4d")))
    if problems is None and found:
        more = f" (and {len(found) - 1} more: python acdc.py check {root})" if found[1:] else ""
        raise DatasetError(found[0] + more)
    return cases if found else select(cases, split, root)


def select(cases, split, root=""):  # the cases of a split: "all", or one that split_of names
    chosen = [c for c in cases if split == "all" or split_of(c.patient) == split]
    if not chosen:
        raise DatasetError(f"{root}: no patient of split {split!r} "
                           f"(all; train, val, test: ids 1..100; testing: 101..150)")
    return chosen


def read_volume(path, dtype=np.float32, ndim=3):
    """-> Volume. Reads every voxel: nibabel reads only the header at load, so a truncated file
    would otherwise fail mid-training. dtype None keeps the stored type (after any scaling)."""
    try:
        with files.naming(path):  # nibabel's header warnings say which file
            img = nib.load(path)
            data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel, gzip, zlib and mmap each raise their own kind
        reason = " ".join(str(e).split())
        raise DatasetError(f"{path}: truncated or corrupt? ({type(e).__name__}: {reason})") from e
    if data.ndim != ndim:
        raise DatasetError(f"{path}: a {data.ndim}D volume of shape {data.shape}, expected {ndim}D")
    if data.dtype.kind == "f" and not (np.abs(data) <= np.finfo(np.float32).max).all():  # NaN, inf, 1e300 fail
        raise DatasetError(f"{path}: NaN or infinite voxels, or values beyond float32's range")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:ndim])
    return Volume(data if dtype is None else data.astype(dtype, copy=False), spacing, img.affine, img.header)


def read_label(path):  # a label volume as uint8, its values checked first: a cast would hide a 256 or a 1.5
    volume = read_volume(path, dtype=None)
    bad = (volume.data < 0) | (volume.data > 3) | (volume.data != np.round(volume.data))
    if bad.any():
        values = np.unique(volume.data[bad])[:5].tolist()
        raise DatasetError(f"{path}: label values {values} outside 0..3 (0, RV, MYO, LV)")
    return volume._replace(data=volume.data.astype(np.uint8))


# -----------------------------------------------------------------------------
# the slice cache: decoded volumes, one .npy a volume, memory-mapped, keyed by the source's path,
# size and mtime, each with a checksum written beside it (.json) and verified whenever it is used

def default_cache_dir(root):
    """<root>/.cache where it can be written, else ~/.cache/acdc-slices (a read-only dataset)"""
    folder = os.path.join(root, ".cache")
    with suppress(OSError):
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return folder
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "acdc-slices")


def cache_entry(path, cache_dir):
    """-> (the .npy this source file is cached in, the prefix of all its entries, old or new)"""
    stat = os.stat(path)
    where = hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:8]
    base = os.path.basename(path).split(".nii")[0] + "-" + where
    # v2: the cached form (slice-major .npy with a checksum beside it)
    return os.path.join(cache_dir, f"{base}-{stat.st_size}-{stat.st_mtime_ns}-v2.npy"), base


def crc32_of(path, chunk=1 << 24):
    with open(path, "rb") as f:
        crc = 0
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def cache_problem(entry):
    """why a cache entry cannot be used (missing or wrong checksum, truncated, changed, not a plain
    array), or None"""
    try:
        with open(entry[:-4] + ".json") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return "has no checksum beside it"
    if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("crc32"), int)):
        return "has no readable checksum beside it"
    try:
        size = os.path.getsize(entry)
        if size != meta["bytes"]:
            return f"is {size} bytes, {meta['bytes']} when written (truncated?)"
        if crc32_of(entry) != meta["crc32"]:
            return "does not match its checksum (changed after it was written)"
        np.load(entry, mmap_mode="r")  # never with pickles allowed: an array of objects is refused here
    except FileNotFoundError:  # another process replaced it just now
        return "vanished while it was read"
    except ValueError as e:
        return f"is not an array of numbers ({e})"
    return None


def cached(path, kind, cache_dir):
    """-> a .npy holding the volume slice-major: (Z, X, Y) for kind "image" and "label", (T, Z, X, Y)
    for "cine", so a slice is one contiguous read. Decodes (and checks) on a miss only; an entry
    that fails its checksum is rebuilt, with a notice (crc32 reads a few GB/s: cheap)."""
    out, base = cache_entry(path, cache_dir)
    if os.path.exists(out):
        problem = cache_problem(out)
        if problem is None:
            return out
        tqdm.write(f"notice: the cache entry {out} {problem}: rebuilding it from {path}")
    if kind == "label":
        data = read_label(path).data
    else:
        data = read_volume(path, None, 4 if kind == "cine" else 3).data
    # float32; integers of 1 or 2 bytes stay (half the disk or less)
    if data.dtype.kind == "f" or data.itemsize > 2:
        data = data.astype(np.float32)
    data = np.ascontiguousarray(data.swapaxes(0, 1).T)  # (X, Y, Z[, T]) -> ([T,] Z, X, Y)
    os.makedirs(cache_dir, exist_ok=True)
    for old in set(glob.glob(os.path.join(cache_dir, glob.escape(base) + "-*"))) - {out, out[:-4] + ".json"}:
        # an earlier entry of this file, unless another process removed it first
        with suppress(FileNotFoundError):
            os.remove(old)

    def write(tmp):  # the checksum first, then the entry under its name: an entry always has one
        np.save(tmp, data)
        files.write_json(out[:-4] + ".json",
                         {"source": path, "bytes": os.path.getsize(tmp), "crc32": crc32_of(tmp)})
    # another process, or a run after a crash, never sees half a file
    files.write_atomic(out, write)
    return out


# -----------------------------------------------------------------------------
# integrity check: every voxel of every file, every problem in one pass

def check_dataset(root, log=None, cache_dir=None):
    """-> [problem], one line each, naming the file; log (e.g. print) receives a summary. The slice
    cache that training would use (cache_dir, or the default) is verified against its checksums."""
    problems, log = [], log or (lambda line: None)

    def attempt(read, *args, **kw):  # note the problem and go on
        try:
            return read(*args, **kw)
        except DatasetError as e:
            problems.append(str(e))

    if (cases := attempt(find_cases, root, problems)) is None:  # no dataset there at all
        return problems
    images, voxels, cines = [], np.zeros(4, np.int64), []  # images: (X, Y, Z, spacing x, y, z)
    for case in tqdm(cases, desc="reading every voxel", unit="patient", disable=None):
        for f in case.frames:
            image, label = attempt(read_volume, f.image, dtype=None), attempt(read_label, f.label)
            if image and label and image.data.shape != label.data.shape:
                problems.append(f"{f.label}: shape {label.data.shape} "
                                f"but its image {f.image} is {image.data.shape}")
            if image:
                images.append((*image.data.shape, *image.spacing))
            if label:
                voxels += np.bincount(label.data.ravel(), minlength=4)
        if case.cine is None:
            problems.append(f"{case.path}: no cine file {os.path.basename(case.path)}_4d.nii.gz")
        elif cine := attempt(read_volume, case.cine, dtype=None, ndim=4):
            cines.append(cine.data.shape)
    cache_dir = cache_dir or default_cache_dir(root)
    sources = [p for case in cases
               for p in [case.cine] + [v for f in case.frames for v in (f.image, f.label)] if p]
    entries = [(src, cache_entry(src, cache_dir)[0]) for src in sources]
    entries = [(src, entry) for src, entry in entries if os.path.exists(entry)]
    for src, entry in entries:
        if problem := cache_problem(entry):
            problems.append(f"{entry}: the cache entry of {src} {problem}; the next run rebuilds it")

    splits = ", ".join(f"{s} {n}" for s, n in sorted(Counter(split_of(c.patient) for c in cases).items()))
    log(f"{root}: {len(cases)} patients ({splits}); "
        f"{len(images)} labelled frames, {sum(i[2] for i in images)} slices; "
        f"{sum(c[3] for c in cines)} cine frames, {sum(c[2] * c[3] for c in cines)} slices")
    if images:
        lo, hi = np.min(images, 0), np.max(images, 0)
        log("size " + ", ".join(f"{a} {lo[i]:.0f}..{hi[i]:.0f}" for i, a in enumerate("XYZ"))
            + "; spacing (mm) "
            + ", ".join(f"{a} {lo[i + 3]:.2f}..{hi[i + 3]:.2f}" for i, a in enumerate("XYZ")))
    names = ("0 background", "1 RV", "2 MYO", "3 LV")
    log("label voxels: " + ", ".join(f"{k} {n}" for k, n in zip(names, voxels)))
    log(f"slice cache {cache_dir}: {len(entries)} entries of this dataset verified against their checksums")
    return problems


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="ACDC data: check a dataset before training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check",
                       help="read every voxel; print counts, sizes, spacings, labels and each problem")
    p.add_argument("root", help="ACDC root: training/, testing/, or a folder holding them")
    p.add_argument("--cache", default=None, help="the slice cache to verify (default: the one training uses)")
    args = parser.parse_args(argv)
    problems = check_dataset(args.root, log=print, cache_dir=args.cache)
    print(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems) if problems else "no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
