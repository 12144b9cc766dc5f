"""ACDC cardiac MRI on disk: cases, volumes, the paper's split, slice datasets, and a phantom.

ACDC (Bernard et al. 2018) as downloaded, under training/ and testing/ (or database/training, ...):
    patient001/Info.cfg                       ED: 1, ES: 12, Group: DCM, Height, NbFrame, Weight
    patient001/patient001_4d.nii.gz           the cine, X x Y x Z x T
    patient001/patient001_frame01.nii.gz      the ED frame, X x Y x Z; _gt: its labels
Labels: 0 background, 1 RV, 2 MYO, 3 LV. A 2D slice is volume[:, :, z]; items hold it as (H, W) =
(X, Y), so slices stacked on a last axis give back a volume that the file's affine places.

    python acdc.py synth data/acdc-synth --patients 20   # a phantom in this layout, and a look at it: montage.png
    python acdc.py check DIR                            # integrity check before training
"""
import argparse
import glob
import hashlib
import os
import pathlib
import struct
import sys
import tempfile
import zlib
from collections import Counter, namedtuple
from contextlib import suppress

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

# mean and std of the raw intensities of ACDC's labelled train volumes (the paper's DATASET_MEAN/STD; its code
# applied them through albumentations, which scales both by 255: see evaluate.normalisation_of). Pretraining,
# fine-tuning and evaluation here all use (x - MEAN) / STD, so a fine-tuned encoder sees what it was pretrained on
MEAN, STD = 67.27297657740893, 84.6606962344396


class DatasetError(Exception):
    """a problem with the data on disk; the message names the file"""


def normalize(x, mean=MEAN, std=STD):
    return (x - mean) / std


def split_of(patient_id):
    """the paper's split: test 1, 11, ..., 91; val 2, 12, ..., 92; train the other 80; ACDC's testing set 101..150"""
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
    """{patient id: folder} of a split (see select) under root, root/training, root/testing or root/database/..."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such folder")
    found = {}
    for sub in ("", "training", "testing", "database/training", "database/testing"):
        for path in sorted(glob.glob(os.path.join(glob.escape(root), sub, "patient*"))):
            if os.path.basename(path)[7:].isdigit() and os.path.isdir(path):
                found.setdefault(int(os.path.basename(path)[7:]), path)
    if not found:
        raise DatasetError(f"{root}: no patientNNN folders here nor in training/, testing/, database/: not the ACDC root?")
    return {patient: path for patient, path in sorted(found.items()) if split == "all" or split_of(patient) == split}


def find_cases(root, problems=None, split="all"):
    """-> [Case] of a split ("all", or see split_of), leaving out what is broken. Each problem goes to
    the list `problems` if given (the check lists them all in one pass), else raises DatasetError."""
    cases, found = [], [] if problems is None else problems
    for patient, folder in patient_folders(root, split).items():
        base, cfg = os.path.join(folder, os.path.basename(folder)), os.path.join(folder, "Info.cfg")
        info = read_info(cfg) if os.path.isfile(cfg) else None
        if info is None or not all(isinstance(info.get(key), int) for key in ("ED", "ES")):
            found.append(f"{cfg}: " + ("missing" if info is None else "no `ED: <frame>` and `ES: <frame>` lines"))
            continue
        frames = []
        for phase in ("ED", "ES"):
            stem = f"{base}_frame{info[phase]:02d}"
            image, label = _nifti(stem), _nifti(stem + "_gt")
            if not image:
                found.append(f"{stem}.nii.gz: missing (the {phase} frame {info[phase]} of Info.cfg)")
            elif not label and patient <= 100:  # testing/ (101-150) came without labels before the 2020 re-release
                found.append(f"{stem}_gt.nii.gz: missing (the labels of the {phase} frame)")
            elif not label:
                continue
            else:
                frames.append(Frame(patient, info[phase], phase, image, label))
        cases.append(Case(patient, folder, info, info["ED"], info["ES"], frames, _nifti(base + "_4d")))
    if problems is None and found:
        raise DatasetError(found[0] + (f" (and {len(found) - 1} more: python acdc.py check {root})" if found[1:] else ""))
    return cases if found else select(cases, split, root)


def select(cases, split, root=""):  # the cases of a split: "all", or one that split_of names
    chosen = [c for c in cases if split == "all" or split_of(c.patient) == split]
    if not chosen:
        raise DatasetError(f"{root}: no patient of split {split!r} (all; train, val, test: ids 1..100; testing: 101..150)")
    return chosen


def read_volume(path, dtype=np.float32, ndim=3):
    """-> Volume. Reads every voxel: nibabel reads only the header at load, so a truncated file
    would otherwise fail mid-training. dtype None keeps the stored type (after any scaling)."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel, gzip, zlib and mmap each raise their own kind
        raise DatasetError(f"{path}: truncated or corrupt? ({type(e).__name__}: {' '.join(str(e).split())})") from e
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
        raise DatasetError(f"{path}: label values {np.unique(volume.data[bad])[:5].tolist()} outside 0..3 (0, RV, MYO, LV)")
    return volume._replace(data=volume.data.astype(np.uint8))


# -----------------------------------------------------------------------------
# datasets: raw 2D slices at their own size (augmentation runs batched on the training device), from
# a cache of decoded volumes: one .npy a volume, memory-mapped, keyed by the source's path, size and mtime

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


def default_cache_dir(root):  # <root>/.cache where it can be written, else ~/.cache/acdc-slices (a read-only dataset)
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
    base = os.path.basename(path).split(".nii")[0] + "-" + hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:8]
    out = os.path.join(cache_dir, f"{base}-{stat.st_size}-{stat.st_mtime_ns}-v1.npy")  # v1: the cached form
    if os.path.exists(out):
        return out
    data = read_label(path).data if kind == "label" else read_volume(path, None, 4 if kind == "cine" else 3).data
    if data.dtype.kind == "f" or data.itemsize > 2:  # float32; integers of 1 or 2 bytes stay (half the disk or less)
        data = data.astype(np.float32)
    data = np.ascontiguousarray(data.swapaxes(0, 1).T)  # (X, Y, Z[, T]) -> ([T,] Z, X, Y)
    os.makedirs(cache_dir, exist_ok=True)
    for old in set(glob.glob(os.path.join(cache_dir, glob.escape(base) + "-*.npy"))) - {out}:
        with suppress(FileNotFoundError):  # an earlier version's entry, unless another rank removed it first
            os.remove(old)
    write_atomic(out, lambda tmp: np.save(tmp, data))  # another rank, or a run after a crash, never sees half a file
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
    """every slice of every ED and ES frame of the split's patients. Item: {"image": (H, W) float32 raw
    intensities, "label": (H, W) int64, "patient", "frame", "phase", "slice"}; .volumes: each frame, its cache files"""

    def __init__(self, root, split="train", cache_dir=None):
        frames = [f for case in find_cases(root, split=split) for f in case.frames]
        cache_dir, self._maps, self.volumes, index = cache_dir or default_cache_dir(root), {}, [], []
        for f in tqdm(frames, desc=f"labelled frames ({split})", disable=None, leave=False):
            image, label = cached(f.image, "image", cache_dir), cached(f.label, "label", cache_dir)
            shape, label_shape = np.load(image, mmap_mode="r").shape, np.load(label, mmap_mode="r").shape
            if shape != label_shape:  # (Z, X, Y) here
                raise DatasetError(f"{f.label}: labels of shape (Z, X, Y) {label_shape} but the image {f.image} is {shape}")
            index += [(len(self.volumes), z) for z in range(shape[0])]
            self.volumes.append(dict(f._asdict(), cache=(image, label)))
        self.index = np.array(index, dtype=np.int64).reshape(-1, 2)  # (slices, [volume, z])

    def __getitem__(self, i):
        v, z = self.index[i]
        vol = self.volumes[v]
        image, label = (self._map(path)[z] for path in vol["cache"])
        return {"image": torch.from_numpy(image.astype(np.float32)), "label": torch.from_numpy(label.astype(np.int64)),
                "patient": vol["patient"], "frame": vol["frame"], "phase": vol["phase"], "slice": int(z)}


class UnlabelledSlices(_Slices):
    """every slice of every cine frame of the split's patients (the paper pretrained on the train
    patients' cine). Item: {"image": (H, W) float32 raw intensities, "patient", "frame", "slice"}"""

    def __init__(self, root, split="train", cache_dir=None):
        cases = find_cases(root, split=split)
        cache_dir, self._maps, self.volumes, index = cache_dir or default_cache_dir(root), {}, [], []
        for case in tqdm(cases, desc=f"cine ({split})", disable=None, leave=False):
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
        return {"image": torch.from_numpy(self._map(vol["cache"])[t, z].astype(np.float32)),
                "patient": vol["patient"], "frame": int(t) + 1, "slice": int(z)}


class LabelFraction(torch.utils.data.Subset):
    """a seeded random fraction of a dataset's slices, repeated back to the full length as the paper
    did, so that an epoch is the same number of steps whatever the fraction"""

    def __init__(self, dataset, fraction, seed=0):
        n = len(dataset)
        self.chosen = np.sort(np.random.default_rng(seed).permutation(n)[:max(1, round(fraction * n))])
        super().__init__(dataset, self.chosen[np.arange(n) % len(self.chosen)].tolist())  # item i: chosen[i % k]


def collate_slices(items):
    """slices of different sizes -> one batch, zero-padded at the bottom and right to the largest;
    "size" (B, 2) keeps each true (h, w) so the augmentation can crop inside the real image"""
    sizes = torch.tensor([item["image"].shape for item in items], dtype=torch.int64)
    h, w = sizes.max(0).values.tolist()
    stack = lambda key, dtype: torch.stack([F.pad(item[key].to(dtype), (0, w - iw, 0, h - ih))  # padding is background
                                            for item, (ih, iw) in zip(items, sizes.tolist())])
    batch = {"image": stack("image", torch.float32)[:, None], "size": sizes}  # (B, 1, h, w)
    if "label" in items[0]:
        batch["label"] = stack("label", torch.uint8)  # (B, h, w); 1 byte, not 8, through pinned memory and the copy
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
                problems.append(f"{f.label}: shape {label.data.shape} but its image {f.image} is {image.data.shape}")
            if image:
                images.append((*image.data.shape, *image.spacing))
            if label:
                voxels += np.bincount(label.data.ravel(), minlength=4)
        if case.cine is None:
            problems.append(f"{case.path}: no cine file {os.path.basename(case.path)}_4d.nii.gz")
        elif cine := attempt(read_volume, case.cine, dtype=None, ndim=4):
            cines.append(cine.data.shape)

    splits = ", ".join(f"{s} {n}" for s, n in sorted(Counter(split_of(c.patient) for c in cases).items()))
    log(f"{root}: {len(cases)} patients ({splits}); {len(images)} labelled frames, {sum(i[2] for i in images)} slices; "
        f"{sum(c[3] for c in cines)} cine frames, {sum(c[2] * c[3] for c in cines)} slices")
    if images:
        lo, hi = np.min(images, 0), np.max(images, 0)
        log("size " + ", ".join(f"{a} {lo[i]:.0f}..{hi[i]:.0f}" for i, a in enumerate("XYZ")) + "; spacing (mm) "
            + ", ".join(f"{a} {lo[i + 3]:.2f}..{hi[i + 3]:.2f}" for i, a in enumerate("XYZ")))
    log("label voxels: " + ", ".join(f"{k} {n}" for k, n in zip(("0 background", "1 RV", "2 MYO", "3 LV"), voxels)))
    return problems


# -----------------------------------------------------------------------------
# synthetic phantom: short-axis cine MRI in the ACDC layout, from a seed

# ACDC's five groups, as changes to a normal heart: LV size, wall thickness, contraction, RV size
GROUPS = {"NOR": (1, 1, 1, 1), "MINF": (1.1, 0.9, 0.55, 1), "DCM": (1.3, 0.8, 0.35, 1), "HCM": (0.85, 1.5, 1.1, 1),
          "RV": (1, 1, 0.9, 1.4)}


def _texture(rng, shape, width):  # smooth texture of unit std: white noise blurred by a Gaussian `width` pixels wide
    kx, ky = np.fft.fftfreq(shape[-2])[:, None], np.fft.rfftfreq(shape[-1])[None]
    blur = np.exp(-2 * (np.pi * width) ** 2 * (kx ** 2 + ky ** 2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * blur, s=shape[-2:])
    return (field / field.std()).astype(np.float32)


def _phantom_patient(rng, size_range, frames_range, slices_range):
    """-> cine (T, Z, X, Y) float32, labels of ED and ES (2, Z, X, Y) uint8, ES index, spacing, group"""
    group = str(rng.choice(list(GROUPS)))  # the group sets how the heart differs from a normal one
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
        wave = 1 + wobble * np.cos(2 * angle + rng.uniform(0, 7)) + wobble / 2 * np.cos(3 * angle + rng.uniform(0, 7))
        return (1 - np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) / wave) * min(ax, ay)

    # the torso, the same in every frame: fat under the skin, muscle, lungs, spine, aorta, liver near the apex
    tex = 0.7 * _texture(rng, (Z, X, Y), 4 / px) + 0.5 * _texture(rng, (Z, X, Y), 1.5 / px)  # grain of ~4 and ~1.5 mm
    patches = _texture(rng, (1, X, Y), 8 / px)[0]
    (bx, by), ax, ay, fat = rng.normal([8, 0], 6), rng.uniform(100, 125), rng.uniform(140, 175), rng.uniform(8, 20)
    hx, hy = rng.normal(-8, 5), rng.normal(12, 6)  # heart centre: anterior, to the patient's left
    bg = lerp(0, 180 * (1 + 0.12 * tex), soft(blob(bx, by, ax, ay, 0.04)))
    bg = lerp(bg, 60 * (1 + 0.18 * tex), soft(blob(bx, by, ax - fat, ay - fat, 0.05)))
    for side in (-1, 1):
        lung = blob(hx + 25, hy + side * rng.uniform(55, 70), rng.uniform(45, 60), rng.uniform(30, 40), 0.1)
        bg = lerp(bg, 12 * (1 + 0.4 * tex), soft(lung))
    sx, sy = bx + ax - rng.uniform(35, 45), by + rng.normal(0, 5)
    bg = lerp(bg, 100 * (1 + 0.1 * tex), soft(blob(sx, sy, 16, 14, 0.05)))  # vertebra
    bg = lerp(bg, 250, soft(blob(sx - 18, sy + rng.uniform(18, 28), 11, 11)))  # descending aorta
    liver = rng.uniform(60, 80) * np.sqrt(np.clip(((np.arange(Z) + 0.5) / Z - 0.45) / 0.55, 1e-4, 1))
    liver_at = (hx + rng.uniform(20, 35), hy - rng.uniform(55, 75))

    # the heart: LV pool in a myocardial ring, RV crescent against the septum, contracting from ED to ES
    r0, wall = rng.uniform(20, 27) * lv_size, rng.uniform(7, 10) * wall_size
    squeeze = min(0.4, rng.uniform(0.25, 0.33) * contract)  # the fraction of the LV radius lost at ES
    rv_off, rv_ab = rng.uniform(0.4, 0.5), rv_size * np.array([rng.uniform(0.85, 1.0), rng.uniform(1.3, 1.5)])
    rv_dir = np.arctan2(-0.9, -0.45) + rng.normal(0, 0.3)  # the RV lies anterior, to the patient's right
    shape = (rng.uniform(0, 0.08), rng.uniform(0, 7), rng.uniform(0, 0.04))  # an LV not quite round
    tilt, pap_r, gain = rng.normal(0, 5, 2), rng.uniform(2, 3), np.exp(rng.uniform(np.log(0.4), np.log(2.4)))
    t = np.arange(T, dtype=np.float32)  # contraction c: 0 at ED, 1 at ES, relaxing back towards 0; (T, 1, 1)
    c = (0.5 - 0.5 * np.cos(np.pi * np.where(t <= es, t / es, (T - t) / (T - es))))[:, None, None]
    ramp, dome = rng.normal(0, 0.2 / 150, 2), rng.uniform(0, 0.3 / 150 ** 2)  # a smooth bias field: coil sensitivity
    bias = gain * np.exp(ramp[0] * x + ramp[1] * y - dome * (x * x + y * y))
    sigma = rng.uniform(0.02, 0.045) * 260 * gain  # noise relative to the blood pool

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
        pap = [np.hypot(dx - 0.62 * r_endo * np.cos(a), dy - 0.62 * r_endo * np.sin(a)) for a in (rv_dir + 2.4, rv_dir - 2.4)]
        sd_pap = pap_r * np.clip(r_endo / 12 - 0.5, 0, 1) - np.minimum(*pap)  # papillary muscles: labelled LV, as in ACDC
        blood, myo, endo, epi = 260 * (1 + 0.05 * tex[z]), 65 * (1 + 0.12 * tex[z]), soft(sd_endo), soft(sd_epi)
        img = lerp(bg[z], 55 * (1 + 0.12 * tex[z]), soft(blob(*liver_at, liver[z], 1.2 * liver[z], 0.05)))
        img = lerp(img, 160 * (1 + 0.1 * tex[z]), soft(np.maximum(sd_epi, sd_rv + 2.5) + 4) * soft(4 * patches))  # fat
        img = lerp(img, myo, np.maximum(soft(sd_rv + 2.5), epi))  # myocardium; the thin RV free wall (unlabelled)
        img = lerp(img, 0.92 * blood, soft(sd_rv) * (1 - epi))
        img = lerp(img, blood, endo)
        img = lerp(img, 0.5 * blood, endo * soft(sd_pap)) * bias
        noise = rng.standard_normal((2,) + img.shape, dtype=np.float32) * sigma
        cine[:, z] = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # the magnitude of a complex signal: Rician
        labels[:, z] = np.select([sd_endo[[0, es]] > 0, sd_epi[[0, es]] > 0, sd_rv[[0, es]] > 0], [3, 2, 1], 0)
    return cine, labels, es, (px, px, dz), group


def write_phantom(root, patients=20, seed=0, size_range=(150, 300), frames_range=(12, 30), slices_range=(6, 12)):
    """root/training/patientNNN/... for ids 1..patients (ids over 100 under testing/, as in ACDC); the same
    files for the same seed. A patient depends on (seed, id) only: a smaller phantom is a prefix of a larger one."""
    for patient in tqdm(range(1, patients + 1), desc="phantom", unit="patient", disable=None):
        rng = np.random.default_rng([seed, patient])
        cine, labels, es, spacing, group = _phantom_patient(rng, size_range, frames_range, slices_range)
        name = f"patient{patient:03d}"
        folder = os.path.join(root, "training" if patient <= 100 else "testing", name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "Info.cfg"), "w") as f:
            f.write(f"ED: 1\nES: {es + 1}\nGroup: {group}\nHeight: {rng.uniform(150, 195):.1f}\n"
                    f"NbFrame: {len(cine)}\nWeight: {rng.uniform(50, 110):.1f}\n")
        # both storage types occur in the wild; int16 is the common one
        cine = np.round(cine).clip(0, 32767).astype(np.int16) if rng.random() < 0.75 else cine
        files = {"4d": cine, **{f"frame{t + 1:02d}": cine[t] for t in (0, es)},
                 **{f"frame{t + 1:02d}_gt": label for t, label in zip((0, es), labels)}}
        for stem, data in files.items():  # ([T,] Z, X, Y) -> the file's (X, Y, Z[, T]); the spacing on the diagonal
            image = nib.Nifti1Image(data.T.swapaxes(0, 1), np.diag([*spacing, 1.0]))
            image.header.set_xyzt_units("mm", "sec")
            write_atomic(os.path.join(folder, f"{name}_{stem}.nii.gz"), lambda tmp: nib.save(image, tmp))


def write_png(path, image):
    """(3, H, W) uint8 tensor -> an RGB PNG, written by hand with zlib (torchvision's encoder is deprecated)"""
    h, w = image.shape[1:]
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), image.permute(1, 2, 0).reshape(h, 3 * w)], 1)  # filter 0
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">2I5B", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes())) + chunk(b"IEND", b""))
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(png))


def write_montage(root, path, patients=3, tile=160):
    """a PNG, a row a patient: ED slices from base to apex and a mid ES slice, each beside its labels"""
    colours = torch.tensor([[0, 0, 0], [230, 60, 60], [60, 210, 60], [60, 120, 255]]).float()  # -, RV, MYO, LV
    rows = []
    for case in find_cases(root)[:patients]:
        tiles = []
        for f in case.frames:
            image, label = (torch.from_numpy(volume.data) for volume in (read_volume(f.image), read_label(f.label)))
            Z = image.shape[2]
            for z in ((0, Z // 2, Z - 2) if f.phase == "ED" else (Z // 2,)):
                x, lab = image[:, :, z], label[:, :, z].long()
                gray = (x / x.flatten().quantile(0.995).clamp(min=1e-6)).clamp(0, 1).expand(3, -1, -1) * 255
                overlay = torch.where(lab > 0, 0.55 * gray + 0.45 * colours[lab].permute(2, 0, 1), gray)
                side = max(x.shape)  # padded to a square, then tile x tile
                both = F.pad(torch.stack([gray, overlay]), (0, side - x.shape[1], 0, side - x.shape[0]))
                tiles += list(F.interpolate(both, size=(tile, tile), mode="nearest"))
        rows.append(torch.cat(tiles, 2))
    write_png(path, torch.cat(rows, 1).round().to(torch.uint8))


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
    args = parser.parse_args(argv)

    if args.command == "synth":
        write_phantom(args.out, args.patients, args.seed)
        write_montage(args.out, os.path.join(args.out, "montage.png"))
        print(f"wrote {args.patients} patients under {args.out}; a look at them: {args.out}/montage.png")
        return 0
    problems = check_dataset(args.root, log=print)
    print(f"{len(problems)} problem(s):\n  " + "\n  ".join(problems) if problems else "no problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
