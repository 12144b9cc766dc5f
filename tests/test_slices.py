"""slices.py: the slice datasets, the paper's label fractions, the collate function, the loader's sampler.
Everything runs on a tiny phantom (the real data cannot be downloaded)."""
import nibabel as nib
import numpy as np
import pytest
import torch

import acdc
import normalisation  # noqa: E402
import slices
from test_acdc import one_patient


def test_labelled_slices(phantom):
    dataset = slices.LabelledSlices(phantom, "train")
    frames = [f for case in acdc.find_cases(phantom, split="train") for f in case.frames]
    assert len(dataset) == sum(nib.load(f.image).shape[2] for f in frames)
    item = dataset[len(dataset) - 1]
    assert set(item) == {"image", "label", "patient", "frame", "phase", "slice"}
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    f = frames[-1]
    assert (item["patient"], item["frame"], item["phase"]) == (f.patient, f.frame, f.phase)
    z = item["slice"]
    assert np.array_equal(item["image"].numpy(), acdc.read_volume(f.image).data[:, :, z])
    assert np.array_equal(item["label"].numpy(), acdc.read_label(f.label).data[:, :, z])
    assert dataset.volumes[-1]["image"] == f.image
    assert {dataset[i]["patient"] for i in range(len(dataset))} == {3, 4, 5}
    assert {slices.LabelledSlices(phantom, "test")[0]["patient"]} == {1}


def test_unlabelled_slices(phantom):
    dataset = slices.UnlabelledSlices(phantom, "val")
    cine = acdc.read_volume(acdc.find_cases(phantom, split="val")[0].cine, ndim=4).data  # (X, Y, Z, T)
    assert len(dataset) == cine.shape[2] * cine.shape[3]
    item = dataset[len(dataset) - 1]
    assert set(item) == {"image", "patient", "frame", "slice"}
    assert (item["patient"], item["frame"], item["slice"]) == (2, cine.shape[3], cine.shape[2] - 1)
    assert np.array_equal(item["image"].numpy(), cine[:, :, -1, -1])


def test_unlabelled_slices_as_the_papers_pretraining_read_them(phantom, tmp_path):
    root, _ = one_patient(phantom, tmp_path)
    case = acdc.find_cases(root)[0]
    cine = acdc.read_volume(case.cine, dtype=None, ndim=4)
    data = np.zeros(cine.data.shape, np.int16)
    data[0, :6, 0, 0] = [0, 255, 256, 300, 1000, -1]                   # slice z 0 of frame 1, its first row
    nib.save(nib.Nifti1Image(data, cine.affine), case.cine)
    plain, paper = (slices.UnlabelledSlices(root, "train", paper_inputs=p) for p in (False, True))
    assert plain[0]["image"][0, :6].tolist() == [0, 255, 256, 300, 1000, -1]
    # astype(np.uint16).astype(np.uint8): modulo 256, and -1 as the integer 65535
    assert paper[0]["image"][0, :6].tolist() == [0, 255, 0, 44, 232, 255]
    # the ED and ES frame files are read too: their slices appear twice
    assert len(paper) == len(plain) + sum(nib.load(f.image).shape[2] for f in case.frames)
    ed = paper[len(plain)]
    assert (ed["frame"], ed["slice"]) == (case.ed, 0)
    assert np.array_equal(ed["image"].numpy(), acdc.read_volume(case.frames[0].image).data[:, :, 0] % 256)


def test_label_fraction(phantom):
    dataset = slices.LabelledSlices(phantom, "train")
    a, b, c = (slices.LabelFraction(dataset, 0.25, seed) for seed in (0, 0, 1))
    k, repeats = slices.label_fraction_plan(len(dataset), 0.25)
    assert len(a.chosen) == k == round(0.25 * len(dataset)) and len(a) == k * repeats == k * a.repeats
    assert np.array_equal(a.chosen, b.chosen) and not np.array_equal(a.chosen, c.chosen)
    seen = {(a[i]["patient"], a[i]["frame"], a[i]["slice"]) for i in range(len(a))}
    assert len(seen) == len(a.chosen)


def test_label_fraction_draws_as_the_paper():
    # the paper: pl.seed_everything(seed) (numpy's global seed), then np.random.choice(n, k, replace=False)
    for seed in (0, 13, 42):
        np.random.seed(seed)
        expected = np.random.choice(1498, 15, replace=False)
        assert np.array_equal(slices.LabelFraction(range(1498), 0.01, seed).chosen, np.sort(expected))


def test_label_fraction_plan_is_the_papers_on_acdc():
    # the paper's ten fractions of ACDC's 1,498 train slices: round(n r) slices, repeated int(1 / r) times
    fractions = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    counts = [1, 3, 7, 15, 30, 75, 150, 300, 749, 1498]
    repeats = [1000, 500, 200, 100, 50, 20, 10, 5, 2, 1]
    assert [slices.label_fraction_plan(1498, r) for r in fractions] == list(zip(counts, repeats))
    assert [k * n for k, n in map(slices.label_fraction_plan, [1498] * 2, [0.001, 0.005])] == [1000, 1400]  # items


def test_label_fraction_plan_bounds_fractions_the_paper_never_used():
    with pytest.warns(UserWarning, match=r"just above 0.5 / 1498 = 0.000334"):
        assert slices.label_fraction_plan(1498, 1e-9) == (1, 1498)        # one slice, an epoch of about n
    assert slices.label_fraction_plan(1498, 0.0004) == (1, 1498)          # round(0.6) = 1; 2,500 repeats cut
    assert slices.label_fraction_plan(10, 0.15) == (2, 5)                 # round(1.5) = 2 (to even); 6 cut to 5
    assert slices.label_fraction_plan(10, 0.25) == (2, 4)                 # round(2.5) = 2, as np.around


def test_collate_pads_and_keeps_sizes():
    items = [{"image": torch.ones(3, 5), "label": torch.full((3, 5), 2), "patient": 1},
             {"image": torch.full((4, 2), 7.0), "label": torch.ones(4, 2, dtype=torch.int64), "patient": 2}]
    batch = slices.collate_slices(items)
    assert batch["image"].shape == (2, 1, 4, 5) and batch["label"].shape == (2, 4, 5)
    assert batch["size"].tolist() == [[3, 5], [4, 2]] and batch["patient"] == [1, 2]
    assert batch["image"][0, 0, 3].sum() == 0 and batch["image"][1, 0, :, 2:].sum() == 0
    assert batch["label"][0, :3].eq(2).all() and batch["label"][1, :, 2:].sum() == 0
    assert "label" not in slices.collate_slices([{"image": torch.ones(2, 2)}])


def test_dataloader_workers(phantom):
    dataset = slices.LabelledSlices(phantom, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=slices.collate_slices)
    batches = list(loader)
    assert sum(len(b["patient"]) for b in batches) == len(dataset)
    assert batches[0]["image"].shape[:2] == (4, 1)


def test_intensity_stats(phantom, tmp_path):
    mean, std = normalisation.data_statistics(phantom, cache_dir=str(tmp_path))
    x = np.concatenate([acdc.read_volume(f.image).data.ravel().astype(np.float64)
                        for c in acdc.find_cases(phantom, split="train") for f in c.frames])
    assert np.isclose(mean, x.mean()) and np.isclose(std, x.std())
