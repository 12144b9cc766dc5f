"""ACDC cardiac MRI on disk: cases, volumes, the paper's split, slice datasets, and a phantom.

ACDC (Bernard et al. 2018) as its users download it, under training/ and testing/ (the 2020
re-release: database/training, database/testing):
    patient001/Info.cfg                       ED: 1, ES: 12, Group: DCM, Height, NbFrame, Weight
    patient001/patient001_4d.nii.gz           the cine, X x Y x Z x T
    patient001/patient001_frame01.nii.gz      the ED frame, X x Y x Z; _gt: its labels
Labels: 0 background, 1 RV, 2 MYO, 3 LV. A 2D slice is volume[:, :, z]; items hold it as (H, W) =
(X, Y), so predictions stacked on a last axis give back a volume that the file's affine places.

    python acdc.py synth data/acdc-synth --patients 20   # a phantom in this layout, + montage.png
    python acdc.py check DIR                            # integrity check before training
    python acdc.py montage DIR out.png                  # a few slices with their labels
"""
import argparse
import glob
import hashlib
import os
import re
import sys
import tempfile
from collections import Counter, namedtuple
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# the normalisation the published models were trained with (raw intensities of the ACDC train
# slices); pretraining and fine-tuning both use it, so a fine-tuned encoder sees what it was taught on
MEAN, STD = 67.27297657740893, 84.6606962344396
CLASSES = ("background", "RV", "MYO", "LV")
SPLITS = ("train", "val", "test", "testing", "all")
CACHE_VERSION = 1  # part of every cache key: bump it when the cached form changes


class DatasetError(Exception):
    """a problem with the data on disk; the message names the file"""


def normalize(x, mean=MEAN, std=STD):
    return (x - mean) / std


def split_of(patient_id):
    """the paper's split: test 1, 11, ..., 91; val 2, 12, ..., 92; train the other 80 of 1..100;
    ACDC's own testing set (101..150) is a split of its own"""
    if patient_id > 100:
        return "testing"
    return {1: "test", 2: "val"}.get(patient_id % 10, "train")


# -----------------------------------------------------------------------------
# finding cases

Case = namedtuple("Case", "patient path info ed es frames cine")  # cine: path of the 4D file or None
Frame = namedtuple("Frame", "patient frame phase image label")   # frame numbers count from 1, as the files do
Volume = namedtuple("Volume", "data spacing affine header")      # spacing: mm per axis


def read_info(path):
    """Info.cfg: `key: value` lines; numbers become int or float, unknown keys are kept"""
    info = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.partition(":")
            if sep:
                value = value.strip()
                for cast in (int, float):
                    try:
                        value = cast(value)
                        break
                    except ValueError:
                        pass
                info[key.strip()] = value
    return info


def _nifti(folder, stem):
    """the file stem.nii.gz or stem.nii (both occur), or None"""
    for ext in (".nii.gz", ".nii"):
        if os.path.isfile(path := os.path.join(folder, stem + ext)):
            return path
    return None


def patient_folders(root):
    """{patient id: folder} under root, root/training, root/testing or root/database/..."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such folder")
    found = {}
    for sub in ("", "training", "testing", "database/training", "database/testing"):
        folder = os.path.join(root, sub)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if (m := re.fullmatch(r"patient(\d+)", name)) and os.path.isdir(os.path.join(folder, name)):
                found.setdefault(int(m[1]), os.path.join(folder, name))
    if not found:
        raise DatasetError(f"{root}: no patientNNN folders here nor in training/, testing/ or "
                           f"database/ - is this the ACDC root?")
    return dict(sorted(found.items()))


def find_cases(root, problems=None):
    """-> [Case]. Raises DatasetError at the first problem, or, given a list, appends each
    problem to it and leaves out what is broken (the check lists them all in one pass)"""
    cases = []
    for patient, folder in patient_folders(root).items():
        name, cfg = os.path.basename(folder), os.path.join(folder, "Info.cfg")
        try:
            if not os.path.isfile(cfg):
                raise DatasetError(f"{cfg}: missing (it names the ED and ES frames)")
            info = read_info(cfg)
            if not all(isinstance(info.get(k), int) for k in ("ED", "ES")):
                raise DatasetError(f"{cfg}: no `ED: <frame>` and `ES: <frame>` lines")
        except (DatasetError, OSError, UnicodeDecodeError) as e:
            if problems is None:
                raise DatasetError(str(e)) from e
            problems.append(str(e))
            continue
        frames = []
        for phase in ("ED", "ES"):
            stem = f"{name}_frame{info[phase]:02d}"
            image, label = _nifti(folder, stem), _nifti(folder, stem + "_gt")
            if image and label:
                frames.append(Frame(patient, info[phase], phase, image, label))
                continue
            error = (f"{os.path.join(folder, stem)}.nii.gz: missing ({phase} frame {info[phase]} of Info.cfg)"
                     if not image else f"{os.path.join(folder, stem)}_gt.nii.gz: missing (labels of the {phase} frame)")
            if problems is None:
                raise DatasetError(error)
            problems.append(error)
        cases.append(Case(patient, folder, info, info["ED"], info["ES"], frames, _nifti(folder, f"{name}_4d")))
    return cases


def select(cases, split, root=""):
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    chosen = [c for c in cases if split == "all" or split_of(c.patient) == split]
    if not chosen:
        raise DatasetError(f"{root}: no patients of split {split!r} (ids: train/val/test 1..100, testing 101..150)")
    return chosen


# -----------------------------------------------------------------------------
# reading volumes

def read_volume(path, dtype=np.float32, ndim=3):
    """-> Volume. Reads every voxel: nibabel reads only the header at load, so a truncated file
    would otherwise fail mid-training. dtype None keeps the stored type (after any scaling)."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel, gzip, zlib and mmap each raise their own kind
        raise DatasetError(f"{path}: unreadable, truncated or corrupt ({type(e).__name__}: {e})") from e
    while data.ndim > ndim and data.shape[-1] == 1:  # some writers add trailing axes of size 1
        data = data[..., 0]
    if data.ndim != ndim:
        raise DatasetError(f"{path}: a {data.ndim}D volume of shape {data.shape}, expected {ndim}D")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise DatasetError(f"{path}: {np.count_nonzero(~np.isfinite(data))} NaN or infinite voxels")
    spacing = tuple(float(s) for s in img.header.get_zooms()[:ndim])
    return Volume(data if dtype is None else data.astype(dtype, copy=False), spacing, img.affine, img.header)


def read_label(path):
    """a label volume as uint8, its values checked: casting first would hide a 256 or a 1.5"""
    volume = read_volume(path, dtype=None)
    data = volume.data
    bad = (data < 0) | (data > 3) | (data != np.round(data))
    if bad.any():
        raise DatasetError(f"{path}: label values {np.unique(data[bad])[:5].tolist()} outside 0..3 "
                           f"(0 background, 1 RV, 2 MYO, 3 LV)")
    return volume._replace(data=data.astype(np.uint8))


# -----------------------------------------------------------------------------
# the slice cache: one .npy per volume, memory-mapped, keyed by the source's path, size and mtime

def default_cache_dir(root):
    """<root>/.cache where it can be written, else ~/.cache/acdc-slices (a read-only dataset)"""
    folder = os.path.join(root, ".cache")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return folder
    except OSError:
        return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "acdc-slices")


def cached(path, kind, cache_dir):
    """-> the .npy holding the volume at path slice-major: (Z, X, Y) for "image" and "label",
    (T, Z, X, Y) for "cine", so a slice is one contiguous read. Decodes and checks on a miss only."""
    stat = os.stat(path)
    base = os.path.basename(path).split(".nii")[0] + "-" + hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:8]
    out = os.path.join(cache_dir, f"{base}-{stat.st_size}-{stat.st_mtime_ns}-v{CACHE_VERSION}.npy")
    if os.path.exists(out):
        return out
    if kind == "label":
        data = read_label(path).data
    else:
        data = read_volume(path, dtype=None, ndim=4 if kind == "cine" else 3).data
        # int16 where the values allow (half the disk of float32), float32 otherwise
        small = data.dtype.kind in "iu" and data.size and -32768 <= data.min() and data.max() <= 32767
        data = data.astype(np.int16 if small else np.float32, copy=False)
    data = np.ascontiguousarray(data.transpose(*range(data.ndim - 1, 1, -1), 0, 1))  # (X, Y, Z[, T]) -> ([T,] Z, X, Y)
    os.makedirs(cache_dir, exist_ok=True)
    for old in glob.glob(os.path.join(cache_dir, glob.escape(base) + "-*.npy")):
        if old != out:
            os.remove(old)  # the entry of an earlier version of this file
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    try:  # atomic: a reader (another rank, a crashed run) never sees half a file
        with os.fdopen(fd, "wb") as f:
            np.save(f, data)
        os.replace(tmp, out)
    except BaseException:
        os.remove(tmp)
        raise
    return out


# -----------------------------------------------------------------------------
# datasets: raw 2D slices at their own size (augmentation runs batched on the training device)

class _Slices(torch.utils.data.Dataset):
    """slices of cached volumes. Each worker opens its own memory maps on first use, so nothing is
    decoded in __getitem__ and pickling a dataset to a worker sends paths, not arrays."""

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def _map(self, path):
        if path not in self._maps:
            self._maps[path] = np.load(path, mmap_mode="r")
        return self._maps[path]

    def __len__(self):
        return len(self.index)


class LabelledSlices(_Slices):
    """every slice of every ED and ES frame of the split's patients; item: {"image": (H, W) float32
    raw intensities, "label": (H, W) int64, "patient", "frame", "phase", "slice"}"""

    def __init__(self, root, split="train", cache_dir=None):
        cache_dir, self._maps = cache_dir or default_cache_dir(root), {}
        frames = [f for c in select(find_cases(root), split, root) for f in c.frames]
        self.volumes, index = [], []  # volumes: what evaluation needs to write a volume back
        for f in tqdm(frames, desc=f"labelled frames ({split})", disable=None, leave=False):
            image, label = cached(f.image, "image", cache_dir), cached(f.label, "label", cache_dir)
            shape, label_shape = np.load(image, mmap_mode="r").shape, np.load(label, mmap_mode="r").shape
            if shape != label_shape:
                raise DatasetError(f"{f.label}: labels of shape {label_shape[1:] + label_shape[:1]} "
                                   f"but the image {f.image} is {shape[1:] + shape[:1]}")
            header = nib.load(f.image).header  # the header alone: cheap
            index += [(len(self.volumes), z) for z in range(shape[0])]
            self.volumes.append(dict(f._asdict(), spacing=tuple(float(s) for s in header.get_zooms()[:3]),
                                     affine=header.get_best_affine(), shape=shape[1:] + shape[:1],
                                     cache=(image, label)))
        self.index = np.array(index, dtype=np.int64).reshape(-1, 2)  # (slices, [volume, z])

    def __getitem__(self, i):
        v, z = self.index[i]
        vol = self.volumes[v]
        image, label = (self._map(p)[z] for p in vol["cache"])
        return {"image": torch.from_numpy(image.astype(np.float32)), "label": torch.from_numpy(label.astype(np.int64)),
                "patient": vol["patient"], "frame": vol["frame"], "phase": vol["phase"], "slice": int(z)}


class UnlabelledSlices(_Slices):
    """every slice of every cine frame of the split's patients (the paper pretrained on the train
    patients' cine); item: {"image": (H, W) float32 raw intensities, "patient", "frame", "slice"}"""

    def __init__(self, root, split="train", cache_dir=None):
        cache_dir, self._maps = cache_dir or default_cache_dir(root), {}
        self.volumes, index = [], []
        for case in tqdm(select(find_cases(root), split, root), desc=f"cine ({split})", disable=None, leave=False):
            if case.cine is None:
                raise DatasetError(f"{case.path}: no cine file {os.path.basename(case.path)}_4d.nii.gz")
            path = cached(case.cine, "cine", cache_dir)
            frames, slices = np.load(path, mmap_mode="r").shape[:2]
            index += [(len(self.volumes), t, z) for t in range(frames) for z in range(slices)]
            self.volumes.append(dict(patient=case.patient, cine=case.cine, cache=path))
        self.index = np.array(index, dtype=np.int64).reshape(-1, 3)  # (slices, [volume, t, z])

    def __getitem__(self, i):
        v, t, z = self.index[i]
        vol = self.volumes[v]
        image = self._map(vol["cache"])[t, z]
        return {"image": torch.from_numpy(image.astype(np.float32)), "patient": vol["patient"],
                "frame": int(t) + 1, "slice": int(z)}


class LabelFraction(torch.utils.data.Dataset):
    """a seeded random fraction of a dataset's slices, repeated back to the full length, as the
    paper did, so that an epoch is the same number of steps whatever the fraction"""

    def __init__(self, dataset, fraction, seed=0):
        if not 0 < fraction <= 1:
            raise ValueError(f"label fraction {fraction}: expected 0 < fraction <= 1")
        self.dataset, n = dataset, len(dataset)
        k = max(1, round(fraction * n))
        self.chosen = np.sort(np.random.default_rng(seed).permutation(n)[:k])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[int(self.chosen[i % len(self.chosen)])]


def collate_slices(items):
    """slices of different sizes -> one batch, zero-padded at the bottom and right to the largest;
    "size" (B, 2) keeps the true (h, w) so the augmentation can crop inside the real image"""
    sizes = torch.tensor([item["image"].shape for item in items], dtype=torch.int64)
    h, w = sizes.max(0).values.tolist()
    batch = {"image": torch.zeros(len(items), 1, h, w), "size": sizes}
    if "label" in items[0]:
        batch["label"] = torch.zeros(len(items), h, w, dtype=torch.int64)  # padding is background
    for b, item in enumerate(items):
        ih, iw = item["image"].shape
        batch["image"][b, 0, :ih, :iw] = item["image"]
        if "label" in batch:
            batch["label"][b, :ih, :iw] = item["label"]
    batch.update({k: [item[k] for item in items] for k in items[0] if k not in batch})
    return batch


def intensity_stats(root, cache_dir=None):
    """(mean, std) of the raw intensities of the labelled train slices, for data unlike ACDC"""
    dataset, total, total_sq, count = LabelledSlices(root, "train", cache_dir), 0.0, 0.0, 0
    for vol in dataset.volumes:
        x = dataset._map(vol["cache"][0]).astype(np.float64)
        total, total_sq, count = total + x.sum(), total_sq + (x * x).sum(), count + x.size
    mean = total / count
    return mean, float(np.sqrt(total_sq / count - mean * mean))


# -----------------------------------------------------------------------------
# integrity check: every voxel of every file, every problem in one pass

def check_dataset(root, log=None):
    """-> [problem], one line each naming the file; log (e.g. print) receives a summary"""
    log, problems = log or (lambda line: None), []
    try:
        cases = find_cases(root, problems)
    except DatasetError as e:
        return [str(e)]
    sizes, spacings, dtypes, labels, stats = [], [], Counter(), np.zeros(4, np.int64), np.zeros(3)
    slices = cine_frames = cine_slices = 0

    def attempt(read, path, **kw):
        try:
            return read(path, **kw)
        except DatasetError as e:
            problems.append(str(e))

    for case in tqdm(cases, desc="reading every voxel", unit="patient", disable=None):
        for f in case.frames:
            image, label = attempt(read_volume, f.image, dtype=None), attempt(read_label, f.label)
            if image is not None and label is not None and image.data.shape != label.data.shape:
                problems.append(f"{f.label}: labels of shape {label.data.shape} but the image {f.image} is {image.data.shape}")
            if image is not None:
                sizes.append(image.data.shape), spacings.append(image.spacing)
                dtypes[str(image.data.dtype)] += 1
                slices += image.data.shape[2]
                x = image.data.astype(np.float64)
                stats += (x.size, x.sum(), (x * x).sum())
            if label is not None:
                labels += np.bincount(label.data.ravel(), minlength=4)
        if case.cine is None:
            problems.append(f"{case.path}: no cine file {os.path.basename(case.path)}_4d.nii.gz")
        elif (cine := attempt(read_volume, case.cine, dtype=None, ndim=4)) is not None:
            cine_frames, cine_slices = cine_frames + cine.data.shape[3], cine_slices + cine.data.shape[2] * cine.data.shape[3]

    splits = Counter(split_of(c.patient) for c in cases)
    log(f"{root}: {len(cases)} patients ({', '.join(f'{s} {n}' for s, n in sorted(splits.items()))}), "
        f"{len(sizes)} labelled frames with {slices} slices, {cine_frames} cine frames with {cine_slices} slices")
    if sizes:
        lo, hi = np.min(sizes, 0), np.max(sizes, 0)
        log(f"image size X {lo[0]}..{hi[0]}, Y {lo[1]}..{hi[1]}, slices {lo[2]}..{hi[2]}; stored as "
            + ", ".join(f"{t} ({n})" for t, n in dtypes.items()))
        lo, hi = np.min(spacings, 0), np.max(spacings, 0)
        log("spacing (mm) " + ", ".join(f"{a} {lo[i]:.2f}..{hi[i]:.2f}" for i, a in enumerate("XYZ")))
        mean = stats[1] / stats[0]
        log(f"raw intensity mean {mean:.1f}, std {np.sqrt(stats[2] / stats[0] - mean ** 2):.1f} "
            f"(the published normalisation: {MEAN:.1f}, {STD:.1f})")
    log("label voxels: " + ", ".join(f"{v} {name} {n}" for v, (name, n) in enumerate(zip(CLASSES, labels))))
    return problems


# -----------------------------------------------------------------------------
# synthetic phantom: short-axis cine MRI in the ACDC layout, from a seed

GROUPS = {  # ACDC's five groups as changes to a normal heart: LV size, wall, contraction, RV size
    "NOR": (1.0, 1.0, 1.0, 1.0), "MINF": (1.1, 0.9, 0.55, 1.0), "DCM": (1.3, 0.8, 0.35, 1.0),
    "HCM": (0.85, 1.5, 1.1, 1.0), "RV": (1.0, 1.0, 0.9, 1.45)}


def _texture(rng, shape, width):
    """smooth random texture, unit std: white noise blurred by a Gaussian `width` pixels wide (via FFT)"""
    kx, ky = np.fft.fftfreq(shape[-2])[:, None], np.fft.rfftfreq(shape[-1])[None]
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * np.exp(-2 * (np.pi * width) ** 2 * (kx ** 2 + ky ** 2)), s=shape[-2:])
    return (field / field.std()).astype(np.float32)


def _phantom_patient(rng, size_range, frames_range, slices_range):
    """-> cine (T, Z, X, Y) float32, labels of ED and ES (2, Z, X, Y) uint8, ES index, spacing, group"""
    group = str(rng.choice(list(GROUPS)))
    lv_size, wall_size, contract, rv_size = GROUPS[group]
    px, dz = rng.uniform(1.2, 1.9), rng.uniform(5, 10)  # in-plane and between-slice spacing, mm
    Y = int(np.clip(round(rng.uniform(290, 400) / px), *size_range))  # a field of view of 30-40 cm where it fits
    X = int(np.clip(round(Y * rng.uniform(0.75, 1)), *size_range))
    Z, T = rng.integers(slices_range[0], slices_range[1] + 1), rng.integers(frames_range[0], frames_range[1] + 1)
    es = int(round(T * rng.uniform(0.3, 0.42)))  # ED is the first frame, as in ACDC
    soft = lambda sd: np.clip(0.5 + sd / (1.2 * px), 0, 1)  # partial volume over ~1 pixel; label = soft > 0.5
    lerp = lambda a, b, m: a + (b - a) * m
    x = ((np.arange(X, dtype=np.float32) - X / 2) * px)[:, None]  # mm from the image centre, (X, 1)
    y = ((np.arange(Y, dtype=np.float32) - Y / 2) * px)[None, :]  # (1, Y)

    def blob(cx, cy, ax, ay, wobble=0.0):  # signed distance (mm, > 0 inside) to an ellipse with a wavy outline
        angle = np.arctan2(y - cy, x - cx)
        r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) / (1 + wobble * np.cos(2 * angle + rng.uniform(0, 7)) + wobble / 2 * np.cos(3 * angle + rng.uniform(0, 7)))
        return (1 - r) * min(ax, ay)

    # the torso, the same in every frame: fat under the skin, muscle, lungs, spine, aorta, liver near the apex
    tex = 0.7 * _texture(rng, (Z, X, Y), 4 / px) + 0.5 * _texture(rng, (Z, X, Y), 1.5 / px)  # tissue grain, ~4 and ~1.5 mm
    patches = _texture(rng, (1, X, Y), 8 / px)[0]
    bx, by, ax, ay = rng.normal(8, 6), rng.normal(0, 6), rng.uniform(100, 125), rng.uniform(140, 175)
    hx, hy = rng.normal(-8, 5), rng.normal(12, 6)  # heart centre: anterior, to the patient's left
    bg = lerp(0, 180 * (1 + 0.12 * tex), soft(blob(bx, by, ax, ay, 0.04)))
    fat = rng.uniform(8, 20)
    bg = lerp(bg, 60 * (1 + 0.18 * tex), soft(blob(bx, by, ax - fat, ay - fat, 0.05)))
    for side in (-1, 1):
        bg = lerp(bg, 12 * (1 + 0.4 * tex), soft(blob(hx + 25, hy + side * rng.uniform(55, 70), rng.uniform(45, 60), rng.uniform(30, 40), 0.1)))
    sx, sy = bx + ax - rng.uniform(35, 45), by + rng.normal(0, 5)
    bg = lerp(bg, 100 * (1 + 0.1 * tex), soft(blob(sx, sy, 16, 14, 0.05)))  # vertebra
    bg = lerp(bg, 250, soft(blob(sx - 18, sy + rng.uniform(18, 28), 11, 11)))  # descending aorta
    liver = rng.uniform(60, 80) * np.sqrt(np.clip(((np.arange(Z) + 0.5) / Z - 0.45) / 0.55, 1e-4, 1))
    liver_at = (hx + rng.uniform(20, 35), hy - rng.uniform(55, 75))

    # the heart's shape: LV pool in a myocardial ring, RV crescent against the septum, contracting
    r0, wall = rng.uniform(20, 27) * lv_size, rng.uniform(7, 10) * wall_size
    squeeze = min(0.4, rng.uniform(0.25, 0.33) * contract)  # endocardial radius lost at ES
    rv_off, rv_ab = rng.uniform(0.4, 0.5), rv_size * np.array([rng.uniform(0.85, 1.0), rng.uniform(1.3, 1.5)])
    rv_dir = np.arctan2(-0.9, -0.45) + rng.normal(0, 0.3)  # the RV lies anterior, to the patient's right
    shape = (rng.uniform(0, 0.08), rng.uniform(0, 7), rng.uniform(0, 0.04))  # an LV not quite round
    tilt, pap_r, gain = rng.normal(0, 5, 2), rng.uniform(2, 3), np.exp(rng.uniform(np.log(0.4), np.log(2.4)))
    phase = np.arange(T) / es  # contraction c: 0 at ED, 1 at ES, relaxing back to 0
    c = np.where(phase <= 1, 0.5 - 0.5 * np.cos(np.pi * phase), 0.5 + 0.5 * np.cos(np.pi * (np.arange(T) - es) / (T - es)))
    c = c.astype(np.float32)[:, None, None]  # (T, 1, 1)
    bias = gain * np.exp(rng.normal(0, 0.2) * x / 150 + rng.normal(0, 0.2) * y / 150 - rng.uniform(0, 0.3) * (x ** 2 + y ** 2) / 150 ** 2)
    sigma = rng.uniform(0.02, 0.045) * 260 * gain  # noise level relative to the blood pool

    cine, labels = np.empty((T, Z, X, Y), np.float32), np.empty((2, Z, X, Y), np.uint8)
    for z in range(Z):
        p = (z + 0.5) / Z  # 0 at the base, 1 at the apex
        s_lv, s_rv = np.sqrt(max(1 - p ** 2.2, 0.02)), np.sqrt(max(1 - (p / 0.85) ** 2, 0))  # the RV vanishes first
        dx, dy = x - hx - tilt[0] * p, y - hy - tilt[1] * p  # the long axis is not quite perpendicular to the slices
        theta = np.arctan2(dy, dx)
        rho = np.sqrt(dx ** 2 + dy ** 2) / (1 + shape[0] * np.cos(2 * (theta - shape[1])) + shape[2] * np.cos(3 * theta))
        u, v = dx * np.cos(rv_dir) + dy * np.sin(rv_dir), -dx * np.sin(rv_dir) + dy * np.cos(rv_dir)
        r_endo = r0 * s_lv * (1 - squeeze * c)  # (T, 1, 1)
        r_epi = np.sqrt(r_endo ** 2 + (r0 * s_lv + wall) ** 2 - (r0 * s_lv) ** 2)  # the wall keeps its area: thicker at ES
        rv_a, rv_b = (r0 + wall) * s_rv * (1 - 0.2 * c) * rv_ab[:, None, None, None] + 1e-3
        q = np.sqrt(((u - rv_off * (r0 * s_lv + wall)) / rv_a) ** 2 + (v / rv_b) ** 2)
        sd_endo, sd_epi, sd_rv = r_endo - rho, r_epi - rho, (1 - q) * np.minimum(rv_a, rv_b)  # signed distances, mm
        pap = [(dx - 0.62 * r_endo * np.cos(a)) ** 2 + (dy - 0.62 * r_endo * np.sin(a)) ** 2 for a in (rv_dir + 2.4, rv_dir - 2.4)]
        sd_pap = pap_r * np.clip(r_endo / 12 - 0.5, 0, 1) - np.sqrt(np.minimum(*pap))  # papillary muscles: labelled LV
        blood, myo = 260 * (1 + 0.05 * tex[z]), 65 * (1 + 0.12 * tex[z])
        img = lerp(bg[z], 55 * (1 + 0.12 * tex[z]), soft(blob(*liver_at, liver[z], 1.2 * liver[z], 0.05)))
        img = lerp(img, 160 * (1 + 0.1 * tex[z]), soft(np.maximum(sd_epi, sd_rv + 2.5) + 4) * soft(4 * patches))  # pericardial fat
        img = lerp(img, myo, soft(sd_rv + 2.5) * (1 - soft(sd_epi)))  # the thin RV free wall, unlabelled as in ACDC
        img = lerp(img, myo, soft(sd_epi))
        img = lerp(img, 0.92 * blood, soft(sd_rv) * (1 - soft(sd_epi)))
        img = lerp(img, blood, soft(sd_endo))
        img = lerp(img, 0.5 * blood, soft(sd_endo) * soft(sd_pap)) * bias
        noise = rng.standard_normal((2,) + img.shape, dtype=np.float32) * sigma
        cine[:, z] = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # the magnitude of a complex signal: Rician
        labels[:, z] = np.select([sd_endo > 0, sd_epi > 0, sd_rv > 0], [3, 2, 1], 0)[[0, es]]
    return cine, labels, es, (px, px, dz), group


def write_phantom(root, patients=20, seed=0, size_range=(150, 300), frames_range=(12, 30), slices_range=(6, 12), workers=None):
    """root/training/patientNNN/... for ids 1..patients, the same files for the same seed; a patient
    depends on (seed, id) only, so a smaller phantom is a prefix of a larger one"""
    jobs = [(root, seed, patient, size_range, frames_range, slices_range) for patient in range(1, patients + 1)]
    workers = min(workers or os.cpu_count() or 1, 4, patients)  # each worker holds one patient (<~1 GB)
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        done = pool.map(_write_patient, jobs) if pool else map(_write_patient, jobs)
        for _ in tqdm(done, total=patients, desc="phantom", unit="patient", disable=None):
            pass


def _write_patient(job):
    root, seed, patient, size_range, frames_range, slices_range = job
    rng = np.random.default_rng([seed, patient])
    cine, labels, es, spacing, group = _phantom_patient(rng, size_range, frames_range, slices_range)
    folder, name = os.path.join(root, "training", f"patient{patient:03d}"), f"patient{patient:03d}"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "Info.cfg"), "w") as f:
        f.write(f"ED: 1\nES: {es + 1}\nGroup: {group}\nHeight: {rng.uniform(150, 195):.1f}\n"
                f"NbFrame: {len(cine)}\nWeight: {rng.uniform(50, 110):.1f}\n")
    # both storage types occur in the wild; int16 is the common one
    cine = np.round(cine).clip(0, 32767).astype(np.int16) if rng.random() < 0.75 else cine
    affine = np.diag([*spacing, 1.0])  # spacing on the diagonal, as ACDC's files have it

    def save(data, stem):  # data ([T,] Z, X, Y) -> the file's (X, Y, Z[, T])
        image = nib.Nifti1Image(data.transpose(*range(data.ndim - 2, data.ndim), *range(data.ndim - 3, -1, -1)), affine)
        image.header.set_xyzt_units("mm", "sec")
        nib.save(image, os.path.join(folder, f"{name}_{stem}.nii.gz"))

    save(cine, "4d")
    for t, label in zip((0, es), labels):
        save(cine[t], f"frame{t + 1:02d}")
        save(label, f"frame{t + 1:02d}_gt")


def write_montage(root, path, patients=3):
    """a PNG: for a few patients, ED slices from base to apex and a mid ES slice, each beside its labels"""
    colours = torch.tensor([[0, 0, 0], [230, 60, 60], [60, 210, 60], [60, 120, 255]], dtype=torch.float32)
    rows = []
    for case in find_cases(root)[:patients]:
        tiles = []
        for f in case.frames:
            image, label = read_volume(f.image), read_label(f.label)
            Z = image.data.shape[2]
            for z in ((0, Z // 2, Z - 2) if f.phase == "ED" else (Z // 2,)):
                x = torch.from_numpy(image.data[:, :, z].copy())
                gray = (x / x.flatten().quantile(0.995)).clamp(0, 1)[None].expand(3, -1, -1) * 255
                lab = torch.from_numpy(label.data[:, :, z].astype(np.int64))
                overlay = torch.where(lab[None] > 0, 0.55 * gray + 0.45 * colours[lab].permute(2, 0, 1), gray)
                for tile in (gray, overlay):  # pad to a square, then 160 x 160
                    side = max(tile.shape[1:])
                    tile = F.pad(tile, (0, side - tile.shape[2], 0, side - tile.shape[1]))
                    tiles.append(F.interpolate(tile[None], size=(160, 160), mode="nearest")[0])
        rows.append(torch.cat(tiles, 2))
    from torchvision.io import write_png  # only the montage needs torchvision
    width = max(r.shape[2] for r in rows)
    write_png(torch.cat([F.pad(r, (0, width - r.shape[2])) for r in rows], 1).round().to(torch.uint8), path)


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    parser = argparse.ArgumentParser(description="ACDC data: write a phantom, check a dataset, look at it")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write a synthetic phantom in the ACDC layout (and OUT/montage.png)")
    p.add_argument("out", help="folder to write: OUT/training/patientNNN/...")
    p.add_argument("--patients", type=int, default=20, help="number of patients, ids 001..N")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same data")
    p = sub.add_parser("check", help="read every voxel; print counts, sizes, spacings, labels and each problem")
    p.add_argument("root", help="ACDC root: training/, testing/, or a folder holding them")
    p = sub.add_parser("montage", help="write a PNG of a few slices with their label overlays")
    p.add_argument("root", help="ACDC root: training/, testing/, or a folder holding them")
    p.add_argument("png", help="the PNG to write")
    p.add_argument("--patients", type=int, default=3, help="rows: the first N patients")
    args = parser.parse_args(argv)

    if args.command == "synth":
        write_phantom(args.out, args.patients, args.seed)
        write_montage(args.out, os.path.join(args.out, "montage.png"))
        print(f"wrote {args.patients} patients to {args.out}/training and a look at them: {args.out}/montage.png")
    elif args.command == "montage":
        write_montage(args.root, args.png, args.patients)
    else:
        problems = check_dataset(args.root, log=print)
        print(f"{len(problems)} problem(s)" + "".join(f"\n  {p}" for p in problems) if problems else "no problems found")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
