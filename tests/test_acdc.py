"""acdc.py: reading the ACDC layout, the split, the datasets and their cache, the check.
Everything runs on tiny phantoms written here (the real data cannot be downloaded)."""
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import acdc
from phantom import write_phantom

TINY = dict(size_range=(40, 56), frames_range=(4, 6), slices_range=(3, 4))


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """5 patients: 1 test, 2 val, 3..5 train"""
    root = str(tmp_path_factory.mktemp("phantom"))
    write_phantom(root, patients=5, seed=0, **TINY)
    return root


def one_patient(phantom, tmp_path, patient=3):
    """a root of its own holding a copy of one train patient, to break"""
    name = f"patient{patient:03d}"
    shutil.copytree(os.path.join(phantom, "training", name), tmp_path / "training" / name)
    return str(tmp_path), str(tmp_path / "training" / name)


# -----------------------------------------------------------------------------
# the layout, the split

def test_find_cases_reads_the_phantom(phantom):
    cases = acdc.find_cases(phantom)
    assert [c.patient for c in cases] == [1, 2, 3, 4, 5]
    for case in cases:
        assert set(case.info) == {"ED", "ES", "Group", "Height", "NbFrame", "Weight"}
        assert [f.phase for f in case.frames] == ["ED", "ES"]
        assert [f.frame for f in case.frames] == [case.ed, case.es] == [case.info["ED"], case.info["ES"]]
        assert case.frames[1].image.endswith(f"patient{case.patient:03d}_frame{case.es:02d}.nii.gz")
        assert case.frames[1].label.endswith(f"_frame{case.es:02d}_gt.nii.gz")
        assert nib.load(case.cine).shape[3] == case.info["NbFrame"]
    assert [c.patient for c in acdc.find_cases(phantom, split="train")] == [3, 4, 5]
    assert [c.patient for c in acdc.select(cases, "val")] == [2]


def test_read_info_is_tolerant(tmp_path):
    (tmp_path / "Info.cfg").write_text("ED: 1\n  ES :12 \nGroup: DCM\nHeight: 184.0\nnoise line\nNew: x:y\n")
    assert acdc.read_info(tmp_path / "Info.cfg") == {"ED": 1, "ES": 12, "Group": "DCM", "Height": 184.0, "New": "x:y"}


def test_split_of_patient_id(phantom):
    splits = [acdc.split_of(i) for i in range(1, 101)]
    assert [i for i in range(1, 101) if splits[i - 1] == "test"] == list(range(1, 101, 10))
    assert [i for i in range(1, 101) if splits[i - 1] == "val"] == list(range(2, 101, 10))
    assert splits.count("train") == 80
    assert {acdc.split_of(i) for i in range(101, 151)} == {"testing"}
    with pytest.raises(acdc.DatasetError, match="no patient of split 'training'"):
        acdc.find_cases(phantom, split="training")


def test_database_root_and_uncompressed_nii(phantom, tmp_path):
    shutil.copytree(os.path.join(phantom, "training", "patient003"), tmp_path / "database" / "training" / "patient003")
    folder = tmp_path / "database" / "training" / "patient003"
    for path in list(folder.glob("*.nii.gz")):  # .nii.gz -> .nii
        nib.save(nib.load(path), str(path)[:-3])
        path.unlink()
    for root in (tmp_path, tmp_path / "database", tmp_path / "database" / "training"):
        (case,) = acdc.find_cases(str(root))
        assert case.frames[0].image.endswith(".nii") and case.cine.endswith("_4d.nii")
    dataset = acdc.LabelledSlices(str(tmp_path / "database"), "train")
    assert len(dataset) == sum(nib.load(f.image).shape[2] for f in case.frames)
    assert acdc.check_dataset(str(tmp_path)) == []


# -----------------------------------------------------------------------------
# reading volumes

def test_spacing_and_affine_round_trip(tmp_path):
    affine = np.array([[1.5, 0, 0, -10], [0, 1.5, 0, 20], [0, 0, 8, 3], [0, 0, 0, 1]])
    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "v.nii.gz")
    volume = acdc.read_volume(str(tmp_path / "v.nii.gz"))
    assert volume.data.dtype == np.float32 and np.array_equal(volume.data, data)
    assert volume.spacing == (1.5, 1.5, 8.0) and np.allclose(volume.affine, affine)


# -----------------------------------------------------------------------------
# datasets, cache, collate

def test_labelled_slices(phantom):
    dataset = acdc.LabelledSlices(phantom, "train")
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
    assert {acdc.LabelledSlices(phantom, "test")[0]["patient"]} == {1}


def test_unlabelled_slices(phantom):
    dataset = acdc.UnlabelledSlices(phantom, "val")
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
    plain, paper = (acdc.UnlabelledSlices(root, "train", paper_inputs=p) for p in (False, True))
    assert plain[0]["image"][0, :6].tolist() == [0, 255, 256, 300, 1000, -1]
    # astype(np.uint16).astype(np.uint8): modulo 256, and -1 as the integer 65535
    assert paper[0]["image"][0, :6].tolist() == [0, 255, 0, 44, 232, 255]
    # the ED and ES frame files are read too: their slices appear twice
    assert len(paper) == len(plain) + sum(nib.load(f.image).shape[2] for f in case.frames)
    ed = paper[len(plain)]
    assert (ed["frame"], ed["slice"]) == (case.ed, 0)
    assert np.array_equal(ed["image"].numpy(), acdc.read_volume(case.frames[0].image).data[:, :, 0] % 256)


def test_label_fraction(phantom):
    dataset = acdc.LabelledSlices(phantom, "train")
    a, b, c = (acdc.LabelFraction(dataset, 0.25, seed) for seed in (0, 0, 1))
    k, repeats = acdc.label_fraction_plan(len(dataset), 0.25)
    assert len(a.chosen) == k == round(0.25 * len(dataset)) and len(a) == k * repeats == k * a.repeats
    assert np.array_equal(a.chosen, b.chosen) and not np.array_equal(a.chosen, c.chosen)
    seen = {(a[i]["patient"], a[i]["frame"], a[i]["slice"]) for i in range(len(a))}
    assert len(seen) == len(a.chosen)


def test_label_fraction_draws_as_the_paper():
    # the paper: pl.seed_everything(seed) (numpy's global seed), then np.random.choice(n, k, replace=False)
    for seed in (0, 13, 42):
        np.random.seed(seed)
        expected = np.random.choice(1498, 15, replace=False)
        assert np.array_equal(acdc.LabelFraction(range(1498), 0.01, seed).chosen, np.sort(expected))


def test_label_fraction_plan_is_the_papers_on_acdc():
    # the paper's ten fractions of ACDC's 1,498 train slices: round(n r) slices, repeated int(1 / r) times
    fractions = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    slices = [1, 3, 7, 15, 30, 75, 150, 300, 749, 1498]
    repeats = [1000, 500, 200, 100, 50, 20, 10, 5, 2, 1]
    assert [acdc.label_fraction_plan(1498, r) for r in fractions] == list(zip(slices, repeats))
    assert [k * n for k, n in map(acdc.label_fraction_plan, [1498] * 2, [0.001, 0.005])] == [1000, 1400]  # items


def test_label_fraction_plan_bounds_fractions_the_paper_never_used():
    with pytest.warns(UserWarning, match=r"just above 0.5 / 1498 = 0.000334"):
        assert acdc.label_fraction_plan(1498, 1e-9) == (1, 1498)        # one slice, an epoch of about n
    assert acdc.label_fraction_plan(1498, 0.0004) == (1, 1498)          # round(0.6) = 1; 2,500 repeats cut
    assert acdc.label_fraction_plan(10, 0.15) == (2, 5)                 # round(1.5) = 2 (to even); 6 cut to 5
    assert acdc.label_fraction_plan(10, 0.25) == (2, 4)                 # round(2.5) = 2, as np.around


def test_collate_pads_and_keeps_sizes():
    items = [{"image": torch.ones(3, 5), "label": torch.full((3, 5), 2), "patient": 1},
             {"image": torch.full((4, 2), 7.0), "label": torch.ones(4, 2, dtype=torch.int64), "patient": 2}]
    batch = acdc.collate_slices(items)
    assert batch["image"].shape == (2, 1, 4, 5) and batch["label"].shape == (2, 4, 5)
    assert batch["size"].tolist() == [[3, 5], [4, 2]] and batch["patient"] == [1, 2]
    assert batch["image"][0, 0, 3].sum() == 0 and batch["image"][1, 0, :, 2:].sum() == 0
    assert batch["label"][0, :3].eq(2).all() and batch["label"][1, :, 2:].sum() == 0
    assert "label" not in acdc.collate_slices([{"image": torch.ones(2, 2)}])


def test_dataloader_workers(phantom):
    dataset = acdc.LabelledSlices(phantom, "train")
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=acdc.collate_slices)
    batches = list(loader)
    assert sum(len(b["patient"]) for b in batches) == len(dataset)
    assert batches[0]["image"].shape[:2] == (4, 1)


def test_cache_hit_and_invalidation(phantom, tmp_path, monkeypatch):
    root, folder = one_patient(phantom, tmp_path)
    first = acdc.LabelledSlices(root, "train")
    cache = os.path.join(root, ".cache")
    entries = sorted(os.listdir(cache))
    assert len(entries) == 4 and all(e.endswith(".npy") for e in entries)

    def no_decoding(*args, **kw):
        raise AssertionError("decoded a cached volume")

    monkeypatch.setattr(acdc, "read_volume", no_decoding)
    second = acdc.LabelledSlices(root, "train")  # all hits
    assert torch.equal(first[0]["image"], second[0]["image"])
    monkeypatch.undo()

    image = acdc.find_cases(root)[0].frames[0].image  # a changed source invalidates its entry
    volume = nib.load(image)
    nib.save(nib.Nifti1Image(np.asanyarray(volume.dataobj) + 1, volume.affine, volume.header), image)
    third = acdc.LabelledSlices(root, "train")
    assert torch.equal(third[0]["image"], first[0]["image"] + 1)
    assert len(os.listdir(cache)) == 4  # the stale entry is gone


def test_cache_falls_back_when_root_is_not_writable(tmp_path, monkeypatch):
    (tmp_path / ".cache").write_text("")  # blocks <root>/.cache whoever runs the test (even root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    assert acdc.default_cache_dir(str(tmp_path)) == str(tmp_path / "home" / "acdc-slices")
    assert acdc.default_cache_dir(str(tmp_path / "x")) == str(tmp_path / "x" / ".cache")


def test_intensity_stats(phantom, tmp_path):
    mean, std = acdc.intensity_stats(phantom, cache_dir=str(tmp_path))
    x = np.concatenate([acdc.read_volume(f.image).data.ravel().astype(np.float64)
                        for c in acdc.find_cases(phantom, split="train") for f in c.frames])
    assert np.isclose(mean, x.mean()) and np.isclose(std, x.std())


# -----------------------------------------------------------------------------
# the check, and the same errors from the datasets

def rewrite(path, change):
    volume = nib.load(path)
    nib.save(nib.Nifti1Image(change(np.asanyarray(volume.dataobj)), volume.affine), path)


BREAKS = {  # name -> (break the copied patient folder, the file the problem must name, words in the message)
    "missing gt": (lambda d: os.remove(f"{d}/patient003_frame01_gt.nii.gz"), "patient003_frame01_gt.nii.gz", "missing"),
    "shape": (lambda d: rewrite(f"{d}/patient003_frame01_gt.nii.gz", lambda a: a[:-1]), "patient003_frame01_gt.nii.gz", "shape"),
    "label values": (lambda d: rewrite(f"{d}/patient003_frame01_gt.nii.gz", lambda a: a + 3), "_frame01_gt.nii.gz", "outside 0..3"),
    "not 3D": (lambda d: rewrite(f"{d}/patient003_frame01.nii.gz", lambda a: a[:, :, 0]), "patient003_frame01.nii.gz", "2D"),
    "NaN": (lambda d: rewrite(f"{d}/patient003_frame01.nii.gz", lambda a: np.where(a > 100, np.nan, a).astype(np.float32)),
            "patient003_frame01.nii.gz", "NaN"),
    "truncated": (lambda d: truncate(f"{d}/patient003_frame01.nii.gz"), "patient003_frame01.nii.gz", "truncated"),
    "no Info.cfg": (lambda d: os.remove(f"{d}/Info.cfg"), "Info.cfg", "missing"),
    "no ED line": (lambda d: open(f"{d}/Info.cfg", "w").write("ES: 2\nGroup: NOR\n"), "Info.cfg", "ED"),
    "ED without file": (lambda d: set_ed(d, 9), "patient003_frame09.nii.gz", "ED frame 9"),
}


def set_ed(folder, frame):
    info = acdc.read_info(f"{folder}/Info.cfg")
    open(f"{folder}/Info.cfg", "w").write(f"ED: {frame}\nES: {info['ES']}\n")


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("name", list(BREAKS))
def test_check_and_datasets_report_each_problem(phantom, tmp_path, name, capsys):
    root, folder = one_patient(phantom, tmp_path)
    breaks, culprit, words = BREAKS[name]
    breaks(folder)
    (problem,) = acdc.check_dataset(root)
    assert os.path.join(folder, "") in problem and culprit in problem and words in problem
    assert acdc.main(["check", root]) == 1
    assert culprit in capsys.readouterr().out
    with pytest.raises(acdc.DatasetError, match=culprit):
        acdc.LabelledSlices(root, "train")


def test_check_lists_every_problem_in_one_pass(phantom, tmp_path):
    root, folder3 = one_patient(phantom, tmp_path, 3)
    _, folder4 = one_patient(phantom, tmp_path, 4)
    os.remove(f"{folder3}/Info.cfg")
    rewrite(f"{folder4}/patient004_frame01.nii.gz", lambda a: a[..., None, None].repeat(2, 4))  # 5D
    truncate(f"{folder4}/patient004_4d.nii.gz")
    problems = acdc.check_dataset(root)
    assert len(problems) == 3
    assert "patient003/Info.cfg: missing" in problems[0] and "patient004_frame01.nii.gz: a 5D" in problems[1]
    assert "patient004_4d.nii.gz: truncated or corrupt" in problems[2]
    with pytest.raises(acdc.DatasetError, match="Info.cfg: missing"):
        acdc.UnlabelledSlices(root, "train")


@pytest.mark.parametrize("make", ["missing", "empty", "other"])
def test_check_wrong_root(tmp_path, make):
    root = tmp_path / "data"
    if make != "missing":
        root.mkdir()
    if make == "other":
        (root / "notes.txt").write_text("hello")
    (problem,) = acdc.check_dataset(str(root))
    assert str(root) in problem
    assert acdc.main(["check", str(root)]) == 1
    with pytest.raises(acdc.DatasetError, match=str(root)):
        acdc.LabelledSlices(str(root))


def test_check_clean_phantom_passes(phantom, capsys):
    assert acdc.main(["check", phantom]) == 0
    out = capsys.readouterr().out
    assert "5 patients" in out and "no problems found" in out and "label voxels" in out


def test_a_testing_set_without_labels_is_not_a_problem(phantom, tmp_path):
    """ACDC's testing/ (101-150) came without _gt files before the 2020 re-release"""
    folder = tmp_path / "testing" / "patient101"
    shutil.copytree(os.path.join(phantom, "training", "patient003"), folder)
    for f in os.listdir(folder):
        os.rename(folder / f, folder / f.replace("patient003", "patient101"))
        if f.endswith("_gt.nii.gz"):
            os.remove(folder / f.replace("patient003", "patient101"))
    assert acdc.check_dataset(str(tmp_path)) == []
    [case] = acdc.find_cases(str(tmp_path), split="testing")
    assert case.patient == 101 and case.frames == []
