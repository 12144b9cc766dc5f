"""The 2D slice datasets that training reads, from the slice cache of decoded ACDC volumes.

    train = LabelledSlices(root, "train")                  # every slice of the ED and ES frames, with labels
    subset = LabelFraction(train, 0.01, seed=13)           # the paper's label fraction: 15 slices x 100
    cine = UnlabelledSlices(root, "train")                 # every slice of every cine frame, for BYOL
    loader = make_loader(subset, batch_size, env, workers, seed)  # this rank's shard, epoch by epoch

Items are raw intensities at the slice's own size (augmentation runs batched on the training
device); a slice is volume[:, :, z], held as (H, W) = (X, Y). Each volume is decoded once into
acdc.py's slice cache (a memory-mapped .npy, checksummed); workers map it, nothing is decoded per item.
"""
import itertools
import math
import os
import signal
import warnings

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from acdc import DatasetError, cached, default_cache_dir, find_cases


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
            spacing = tuple(float(s) for s in nib.load(f.image).header.get_zooms()[:3])  # the header only
            self.volumes.append(dict(f._asdict(), cache=(image, label), spacing=spacing))
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


def spacing_range(volumes):
    """{"in_plane": [lo, hi], "between_slices": [lo, hi]} in mm over LabelledSlices.volumes: the
    geometry a model trained on them knows (predict.py warns about scans far outside it)"""
    spacings = np.array([v["spacing"] for v in volumes])  # (volumes, 3): x, y, z
    return {"in_plane": [float(spacings[:, :2].min()), float(spacings[:, :2].max())],
            "between_slices": [float(spacings[:, 2].min()), float(spacings[:, 2].max())]}


# -----------------------------------------------------------------------------
# the loader: this rank's shard of each epoch, its workers kept across epochs

def default_workers(requested):
    if requested >= 0:
        return requested
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(8, (os.cpu_count() or 1) // per_node))


class SkipDoneSampler(torch.utils.data.Sampler):
    """this rank's shard of one epoch (DistributedSampler: the order depends on seed and epoch
    only), minus the samples of the batches done before a resume (set_epoch's skip)"""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch, skip=0):
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler) - self.skip


def ignore_stop_signals(worker_id):
    """a loader worker ignores SIGINT and SIGTERM: Ctrl-C and Slurm signal the whole process group, and
    the training decides when to stop; its workers end with the loader, or when their parent is gone"""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset, batch_size, env, workers, seed):
    """built once: the workers persist across epochs (the sampler runs in this process, so
    loader.sampler.set_epoch(epoch, skip) before each epoch reaches them); they ignore stop signals"""
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True)
    workers = default_workers(workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=SkipDoneSampler(sampler), num_workers=workers,
        collate_fn=collate_slices, drop_last=True, pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals)
