"""acdc.py: reading the ACDC layout, the split, the datasets and their cache, the check.
Everything runs on tiny phantoms written here (the real data cannot be downloaded)."""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import acdc
import slices

TINY = dict(size_range=(40, 56), frames_range=(4, 6), slices_range=(3, 4))


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
    dataset = slices.LabelledSlices(str(tmp_path / "database"), "train")
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


@pytest.mark.parametrize("dtype", [np.float32, None])
def test_values_beyond_float32_are_refused_naming_the_file(tmp_path, dtype):
    """float64 1e300 and int16 with scl_slope 1e38 are finite as stored but inf as float32, what the model sees;
    dtype None (the slice cache's read, cast later) is checked the same way"""
    big = nib.Nifti1Image(np.full((4, 4, 2), 1e300), np.eye(4))
    scaled = nib.Nifti1Image(np.full((4, 4, 2), 100, np.int16), np.eye(4))
    scaled.header.set_slope_inter(1e38, 0)
    for name, img in [("big.nii", big), ("scaled.nii.gz", scaled)]:
        nib.save(img, tmp_path / name)
        with pytest.raises(acdc.DatasetError, match=f"^{tmp_path / name}: .*beyond float32"):
            acdc.read_volume(str(tmp_path / name), dtype=dtype)


# -----------------------------------------------------------------------------
# the slice cache

def test_cache_hit_and_invalidation(phantom, tmp_path, monkeypatch):
    root, folder = one_patient(phantom, tmp_path)
    first = slices.LabelledSlices(root, "train")
    cache = os.path.join(root, ".cache")
    entries = sorted(os.listdir(cache))  # each volume: the .npy and its checksum
    assert len(entries) == 8 and sorted(e[:-4] for e in entries if e.endswith(".npy")) == \
        sorted(e[:-5] for e in entries if e.endswith(".json"))

    def no_decoding(*args, **kw):
        raise AssertionError("decoded a cached volume")

    monkeypatch.setattr(acdc, "read_volume", no_decoding)
    second = slices.LabelledSlices(root, "train")  # all hits
    assert torch.equal(first[0]["image"], second[0]["image"])
    monkeypatch.undo()

    image = acdc.find_cases(root)[0].frames[0].image  # a changed source invalidates its entry
    volume = nib.load(image)
    nib.save(nib.Nifti1Image(np.asanyarray(volume.dataobj) + 1, volume.affine, volume.header), image)
    third = slices.LabelledSlices(root, "train")
    assert torch.equal(third[0]["image"], first[0]["image"] + 1)
    assert len(os.listdir(cache)) == 8  # the stale entry is gone


def test_a_changed_cache_entry_is_found_by_check_and_rebuilt(phantom, tmp_path, capsys):
    """a cached volume zeroed in place would train on black images with real labels"""
    root, folder = one_patient(phantom, tmp_path)
    first = slices.LabelledSlices(root, "train")
    image_entry, expected = first.volumes[0]["cache"][0], first[0]["image"].clone()
    del first  # its memory maps: reading a truncated mapped file would be a bus error
    data = np.load(image_entry, mmap_mode="r+")
    data[:] = 0  # zeroed in place: same size, same mtime of the source
    data.flush()
    del data
    problems = acdc.check_dataset(root)
    assert len(problems) == 1 and problems[0].startswith(image_entry) and "checksum" in problems[0]
    again = slices.LabelledSlices(root, "train")  # rebuilt, with a notice naming it
    assert f"notice: the cache entry {image_entry}" in capsys.readouterr().out
    assert torch.equal(again[0]["image"], expected) and expected.abs().sum() > 0
    del again
    with open(image_entry, "r+b") as f:  # truncated: rebuilt too
        f.truncate(100)
    assert torch.equal(slices.LabelledSlices(root, "train")[0]["image"], expected)
    assert "truncated" in capsys.readouterr().out
    assert acdc.check_dataset(root) == []


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_broken_patient_link_is_a_problem(phantom, tmp_path, kind):
    root, folder = one_patient(phantom, tmp_path)
    link = tmp_path / "training" / "patient013"
    os.symlink(tmp_path / "nowhere" if kind == "dangling" else link, link)
    problems = acdc.check_dataset(root)
    assert len(problems) == 1 and problems[0].startswith(str(link))
    assert ("loop" if kind == "loop" else "does not exist") in problems[0]
    with pytest.raises(acdc.DatasetError, match="patient013"):  # training does not drop it silently
        slices.LabelledSlices(root, "train")


def test_cache_falls_back_when_root_is_not_writable(tmp_path, monkeypatch):
    (tmp_path / ".cache").write_text("")  # blocks <root>/.cache whoever runs the test (even root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    assert acdc.default_cache_dir(str(tmp_path)) == str(tmp_path / "home" / "acdc-slices")
    assert acdc.default_cache_dir(str(tmp_path / "x")) == str(tmp_path / "x" / ".cache")


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
        slices.LabelledSlices(root, "train")


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
        slices.UnlabelledSlices(root, "train")


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
        slices.LabelledSlices(str(root))


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


@pytest.mark.parametrize("damage", ["empty json", "json list", "pickled objects"])
def test_a_damaged_cache_entry_is_reported_and_rebuilt(phantom, tmp_path, capsys, damage):
    """a checksum file that is not a record, or an array of Python objects under a matching checksum"""
    root, folder = one_patient(phantom, tmp_path)
    first = slices.LabelledSlices(root, "train")
    entry, expected = first.volumes[0]["cache"][0], first[0]["image"].clone()
    del first
    if damage == "pickled objects":
        np.save(entry, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with open(entry[:-4] + ".json", "w") as f:
            json.dump({"source": "x", "bytes": os.path.getsize(entry), "crc32": acdc.crc32_of(entry)}, f)
    else:
        with open(entry[:-4] + ".json", "w") as f:
            f.write("{}" if damage == "empty json" else "[1, 2]")
    problems = acdc.check_dataset(root)
    assert len(problems) == 1 and problems[0].startswith(entry)
    again = slices.LabelledSlices(root, "train")  # rebuilt, with a notice naming it
    assert f"notice: the cache entry {entry}" in capsys.readouterr().out
    assert torch.equal(again[0]["image"], expected)
