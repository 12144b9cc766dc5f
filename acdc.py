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
import glob
import hashlib
import math
import os
import sys
import tempfile
import warnings
from collections import Counter, namedtuple
from contextlib import suppress

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import files

# mean and std of the raw intensities of ACDC's labelled train volumes (the paper's DATASET_MEAN/STD;
# its code applied them through albumentations, which scales both by 255: see
# checkpoints.normalisation_of). Pretraining, fine-tuning and evaluation here all use
# (x - MEAN) / STD, so a fine-tuned encoder sees what it was pretrained on
MEAN, STD = 67.27297657740893, 84.6606962344396


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


def normalize(x, mean=MEAN, std=STD):
    return (x - mean) / std


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


def patient_folders(root, split="all"):
    """{patient id: folder} of a split (see select) under root, root/training, root/testing or
    root/database/..."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such folder")
    found = {}
    for sub in ("", "training", "testing", "database/training", "database/testing"):
        for path in sorted(glob.glob(os.path.join(glob.escape(root), sub, "patient*"))):
            if os.path.basename(path)[7:].isdigit() and os.path.isdir(path):
                found.setdefault(int(os.path.basename(path)[7:]), path)
    if not found:
        raise DatasetError(f"{root}: no patientNNN folders here nor in training/, testing/, database/: "
                           f"not the ACDC root?")
    return {patient: path for patient, path in sorted(found.items())
            if split == "all" or split_of(patient) == split}


def find_cases(root, problems=None, split="all"):
    """-> [Case] of a split ("all", or see split_of), leaving out what is broken. Each problem goes to
    the list `problems` if given (the check lists them all in one pass), else raises DatasetError."""
    cases, found = [], [] if problems is None else problems
    for patient, folder in patient_folders(root, split).items():
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
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel, gzip, zlib and mmap each raise their own kind
        reason = " ".join(str(e).split())
        raise DatasetError(f"{path}: truncated or corrupt? ({type(e).__name__}: {reason})") from e
    if data.ndim != ndim:
        raise DatasetError(f"{path}: a {data.ndim}D volume of shape {data.shape}, expected {ndim}D")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DatasetError(f"{path}: {np.count_nonzero(~np.isfinite(data))} NaN or infinite voxels")
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
# datasets: raw 2D slices at their own size (augmentation runs batched on the training device), from
# a cache of decoded volumes: one .npy a volume, memory-mapped, keyed by the source's path, size and mtime

def default_cache_dir(root):
    """<root>/.cache where it can be written, else ~/.cache/acdc-slices (a read-only dataset)"""
    folder = os.path.join(root, ".cache")
    with suppress(OSError):
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return folder
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "acdc-slices")


def cached(path, kind, cache_dir):
    """-> a .npy holding the volume slice-major: (Z, X, Y) for kind "image" and "label", (T, Z, X, Y)
    for "cine", so a slice is one contiguous read. Decodes (and checks) on a miss only."""
    stat = os.stat(path)
    where = hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:8]
    base = os.path.basename(path).split(".nii")[0] + "-" + where
    out = os.path.join(cache_dir, f"{base}-{stat.st_size}-{stat.st_mtime_ns}-v1.npy")  # v1: the cached form
    if os.path.exists(out):
        return out
    if kind == "label":
        data = read_label(path).data
    else:
        data = read_volume(path, None, 4 if kind == "cine" else 3).data
    # float32; integers of 1 or 2 bytes stay (half the disk or less)
    if data.dtype.kind == "f" or data.itemsize > 2:
        data = data.astype(np.float32)
    data = np.ascontiguousarray(data.swapaxes(0, 1).T)  # (X, Y, Z[, T]) -> ([T,] Z, X, Y)
    os.makedirs(cache_dir, exist_ok=True)
    for old in set(glob.glob(os.path.join(cache_dir, glob.escape(base) + "-*.npy"))) - {out}:
        with suppress(FileNotFoundError):  # an earlier version's entry, unless another rank removed it first
            os.remove(old)
    # another rank, or a run after a crash, never sees half a file
    files.write_atomic(out, lambda tmp: np.save(tmp, data))
    return out


class _Slices(torch.utils.data.Dataset):
    """slices of cached volumes. Each worker opens its own memory maps on first use: nothing is
    decoded in __getitem__, and pickling a dataset to a worker sends paths, not arrays."""

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def _map(self, path):
        if path not in self._maps:
            self._maps[path] = np.load(path, mmap_mode="r")
        return self._maps[path]

    def __len__(self):
        return len(self.index)


class LabelledSlices(_Slices):
    """every slice of every ED and ES frame of the split's patients. Item: {"image": (H, W) float32
    raw intensities, "label": (H, W) int64, "patient", "frame", "phase", "slice"};
    .volumes: each frame, its cache files"""

    def __init__(self, root, split="train", cache_dir=None):
        frames = [f for case in find_cases(root, split=split) for f in case.frames]
        cache_dir, self._maps, self.volumes, index = cache_dir or default_cache_dir(root), {}, [], []
        for f in tqdm(frames, desc=f"labelled frames ({split})", disable=None, leave=False):
            image, label = cached(f.image, "image", cache_dir), cached(f.label, "label", cache_dir)
            shape, label_shape = np.load(image, mmap_mode="r").shape, np.load(label, mmap_mode="r").shape
            if shape != label_shape:  # (Z, X, Y) here
                raise DatasetError(f"{f.label}: labels of shape (Z, X, Y) {label_shape} "
                                   f"but the image {f.image} is {shape}")
            index += [(len(self.volumes), z) for z in range(shape[0])]
            self.volumes.append(dict(f._asdict(), cache=(image, label)))
        self.index = np.array(index, dtype=np.int64).reshape(-1, 2)  # (slices, [volume, z])

    def __getitem__(self, i):
        v, z = self.index[i]
        vol = self.volumes[v]
        image, label = (self._map(path)[z] for path in vol["cache"])
        return {"image": torch.from_numpy(image.astype(np.float32)),
                "label": torch.from_numpy(label.astype(np.int64)),
                "patient": vol["patient"], "frame": vol["frame"], "phase": vol["phase"], "slice": int(z)}


class UnlabelledSlices(_Slices):
    """every slice of every cine frame of the split's patients (the paper pretrained on the train
    patients' cine). Item: {"image": (H, W) float32 raw intensities, "patient", "frame", "slice"}.
    paper_inputs=True reads what the paper's pretraining read: every image file, the ED and ES frame
    files too (their slices then appear twice), and each intensity as its astype(np.uint16).astype(np.uint8)
    left it: the integer part modulo 256 (256 -> 0, 300 -> 44; a negative value as an integer: -1 -> 255)."""

    def __init__(self, root, split="train", cache_dir=None, paper_inputs=False):
        cases = find_cases(root, split=split)
        cache_dir, self._maps, self.volumes, index = cache_dir or default_cache_dir(root), {}, [], []
        self.paper_inputs = paper_inputs
        for case in tqdm(cases, desc=f"cine ({split})", disable=None, leave=False):
            if case.cine is None:
                raise DatasetError(f"{case.path}: no cine file {os.path.basename(case.path)}_4d.nii.gz")
            path = cached(case.cine, "cine", cache_dir)
            frames, slices = np.load(path, mmap_mode="r").shape[:2]
            index += [(len(self.volumes), t, z) for t in range(frames) for z in range(slices)]
            self.volumes.append(dict(patient=case.patient, cine=case.cine, cache=path))
            for f in case.frames if paper_inputs else []:  # the ED and ES frame files: (Z, X, Y)
                path = cached(f.image, "image", cache_dir)
                slices = np.load(path, mmap_mode="r").shape[0]
                index += [(len(self.volumes), f.frame - 1, z) for z in range(slices)]
                self.volumes.append(dict(patient=case.patient, image=f.image, cache=path))
        self.index = np.array(index, dtype=np.int64).reshape(-1, 3)  # (slices, [volume, t, z])

    def __getitem__(self, i):
        v, t, z = self.index[i]
        vol = self.volumes[v]
        data = self._map(vol["cache"])  # (T, Z, X, Y) a cine, (Z, X, Y) a frame file
        image = (data[t, z] if data.ndim == 4 else data[z]).astype(np.float32)
        image = np.mod(np.trunc(image), 256) if self.paper_inputs else image  # float32 0..255: uint8 values
        return {"image": torch.from_numpy(image), "patient": vol["patient"], "frame": int(t) + 1,
                "slice": int(z)}


def label_fraction_plan(n, fraction):
    """-> (k, repeats), the paper's rule: k = round(n * fraction) slices (np.around, half to even)
    listed int(1 / fraction) times an epoch (0.001 of 1,498: 1 x 1,000 items; 0.005: 7 x 200). Bounded
    where the paper never went, at least 1 slice and at most ceil(n / k) repeats: same for its ten."""
    k = int(np.around(n * fraction))
    if k == 0:
        warnings.warn(f"label fraction {fraction:g} of {n} slices rounds to none: training on 1 slice "
                      f"(the smallest fraction that gives one is just above 0.5 / {n} = {0.5 / n:.3g})",
                      stacklevel=2)
    return max(1, k), min(int(1 / fraction), math.ceil(n / max(1, k)))


class LabelFraction(torch.utils.data.Subset):
    """the paper's label fraction: k slices drawn with the seed, repeated (label_fraction_plan).
    .chosen: the k distinct indices, sorted; .repeats: how often each appears in an epoch"""

    def __init__(self, dataset, fraction, seed=0):
        n = len(dataset)
        k, self.repeats = label_fraction_plan(n, fraction)
        # the paper's np.random.choice(n, k, replace=False) right after pl.seed_everything(seed). It listed
        # slices by patient, frame file name and slice, as we do where ED has the lower frame number: a
        # seed should pick the slices it picked for that seed
        self.chosen = np.sort(np.random.RandomState(seed).choice(n, k, replace=False))
        super().__init__(dataset, np.tile(self.chosen, self.repeats).tolist())


def collate_slices(items):
    """slices of different sizes -> one batch, zero-padded at the bottom and right to the largest;
    "size" (B, 2) keeps each true (h, w) so the augmentation can crop inside the real image"""
    sizes = torch.tensor([item["image"].shape for item in items], dtype=torch.int64)
    h, w = sizes.max(0).values.tolist()
    def stack(key, dtype):  # the padding is background
        return torch.stack([F.pad(item[key].to(dtype), (0, w - iw, 0, h - ih))
                            for item, (ih, iw) in zip(items, sizes.tolist())])
    batch = {"image": stack("image", torch.float32)[:, None], "size": sizes}  # (B, 1, h, w)
    if "label" in items[0]:
        # (B, h, w); 1 byte, not 8, through pinned memory and the copy
        batch["label"] = stack("label", torch.uint8)
    return {**batch, **{key: [item[key] for item in items] for key in items[0] if key not in batch}}


def intensity_stats(root, cache_dir=None):
    """(mean, std) of the raw intensities of the labelled train slices, for data unlike ACDC"""
    dataset = LabelledSlices(root, "train", cache_dir)
    n, total, total_sq = np.sum([(x.size, x.sum(dtype=np.float64), np.square(x, dtype=np.float64).sum())
                                 for x in (dataset._map(vol["cache"][0]) for vol in dataset.volumes)], 0)
    return float(total / n), float(np.sqrt(total_sq / n - (total / n) ** 2))


# -----------------------------------------------------------------------------
# integrity check: every voxel of every file, every problem in one pass

def check_dataset(root, log=None):
    """-> [problem], one line each, naming the file; log (e.g. print) receives a summary"""
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
    return problems


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="ACDC data: check a dataset before training")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check",
                       help="read every voxel; print counts, sizes, spacings, labels and each problem")
    p.add_argument("root", help="ACDC root: training/, testing/, or a folder holding them")
    args = parser.parse_args(argv)
    problems = check_dataset(args.root, log=print)
    print(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems) if problems else "no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
