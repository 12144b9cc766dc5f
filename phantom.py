"""The synthetic phantom: short-axis cine MRI in the exact ACDC layout, from a seed.

    python phantom.py data/acdc-synth --patients 20 --seed 0     # and data/acdc-synth/montage.svg

It writes what ACDC holds (training/patientNNN/Info.cfg, _4d cine, ED and ES frames with their
_gt labels) with anatomy-like shapes: LV blood pool, myocardial ring, RV crescent against the
septum, contraction from ED to ES, slices shrinking toward the apex, textured surroundings,
Rician noise, a bias field and a per-patient intensity scale. Every code path runs on it and
learning is measurable, but it is not ACDC: results on it say "synthetic phantom".
Run again into a folder that holds this very phantom, it writes nothing; into any other non-empty
folder, only with --overwrite, so the data under finished runs never changes by surprise.
"""
import argparse
import glob
import json
import os
import sys

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

import acdc
import files
import pictures

# ACDC's five groups, as changes to a normal heart: LV size, wall thickness, contraction, RV size
GROUPS = {"NOR": (1, 1, 1, 1), "MINF": (1.1, 0.9, 0.55, 1), "DCM": (1.3, 0.8, 0.35, 1),
          "HCM": (0.85, 1.5, 1.1, 1), "RV": (1, 1, 0.9, 1.4)}


def _texture(rng, shape, width):
    """smooth texture of unit std: white noise blurred by a Gaussian `width` pixels wide"""
    kx, ky = np.fft.fftfreq(shape[-2])[:, None], np.fft.rfftfreq(shape[-1])[None]
    blur = np.exp(-2 * (np.pi * width) ** 2 * (kx ** 2 + ky ** 2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * blur, s=shape[-2:])
    return (field / field.std()).astype(np.float32)


def _phantom_patient(rng, size_range, frames_range, slices_range):
    """-> cine (T, Z, X, Y) float32, labels of ED and ES (2, Z, X, Y) uint8, ES index, spacing, group"""
    group = str(rng.choice(list(GROUPS)))  # the group sets how the heart differs from a normal one
    lv_size, wall_size, contract, rv_size = GROUPS[group]
    px, dz = rng.uniform(1.2, 1.9), rng.uniform(5, 10)  # in-plane and between-slice spacing, mm
    # a field of view of 30-40 cm where it fits
    Y = int(np.clip(round(rng.uniform(290, 400) / px), *size_range))
    X = int(np.clip(round(Y * rng.uniform(0.75, 1)), *size_range))
    Z = rng.integers(slices_range[0], slices_range[1] + 1)
    T = rng.integers(frames_range[0], frames_range[1] + 1)
    es = int(round(T * rng.uniform(0.3, 0.42)))  # ED is the first frame, as in ACDC
    soft = lambda sd: np.clip(0.5 + sd / (1.2 * px), 0, 1)  # partial volume over ~1 pixel; label = soft > 0.5
    lerp = lambda a, b, m: a + (b - a) * m
    x = ((np.arange(X, dtype=np.float32) - X / 2) * px)[:, None]  # mm from the image centre, (X, 1)
    y = ((np.arange(Y, dtype=np.float32) - Y / 2) * px)[None, :]  # (1, Y)

    def blob(cx, cy, ax, ay, wobble=0.0):
        """signed distance (mm, > 0 inside) to an ellipse with a wavy outline"""
        angle = np.arctan2(y - cy, x - cx)
        wave = (1 + wobble * np.cos(2 * angle + rng.uniform(0, 7))
                + wobble / 2 * np.cos(3 * angle + rng.uniform(0, 7)))
        return (1 - np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) / wave) * min(ax, ay)

    # the torso, the same in every frame: fat under the skin, muscle, lungs, spine, aorta, liver near the apex
    # grain of ~4 and ~1.5 mm
    tex = 0.7 * _texture(rng, (Z, X, Y), 4 / px) + 0.5 * _texture(rng, (Z, X, Y), 1.5 / px)
    patches = _texture(rng, (1, X, Y), 8 / px)[0]
    (bx, by), ax = rng.normal([8, 0], 6), rng.uniform(100, 125)
    ay, fat = rng.uniform(140, 175), rng.uniform(8, 20)
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
    # a smooth bias field: coil sensitivity
    ramp, dome = rng.normal(0, 0.2 / 150, 2), rng.uniform(0, 0.3 / 150 ** 2)
    bias = gain * np.exp(ramp[0] * x + ramp[1] * y - dome * (x * x + y * y))
    sigma = rng.uniform(0.02, 0.045) * 260 * gain  # noise relative to the blood pool

    cine, labels = np.empty((T, Z, X, Y), np.float32), np.empty((2, Z, X, Y), np.uint8)
    for z in range(Z):
        p = (z + 0.5) / Z  # 0 at the base, 1 at the apex
        # the RV vanishes first
        s_lv, s_rv = np.sqrt(max(1 - p ** 2.2, 0.02)), np.sqrt(max(1 - (p / 0.85) ** 2, 0))
        # the long axis is not quite perpendicular to the slices
        dx, dy = x - hx - tilt[0] * p, y - hy - tilt[1] * p
        theta = np.arctan2(dy, dx)
        outline = 1 + shape[0] * np.cos(2 * (theta - shape[1])) + shape[2] * np.cos(3 * theta)
        rho = np.sqrt(dx ** 2 + dy ** 2) / outline
        u, v = dx * np.cos(rv_dir) + dy * np.sin(rv_dir), -dx * np.sin(rv_dir) + dy * np.cos(rv_dir)
        r_endo = r0 * s_lv * (1 - squeeze * c)  # (T, 1, 1)
        # the wall keeps its area: thicker at ES
        r_epi = np.sqrt(r_endo ** 2 + (r0 * s_lv + wall) ** 2 - (r0 * s_lv) ** 2)
        rv_a, rv_b = (r0 + wall) * s_rv * (1 - 0.2 * c) * rv_ab[:, None, None, None] + 1e-3
        q = np.sqrt(((u - rv_off * (r0 * s_lv + wall)) / rv_a) ** 2 + (v / rv_b) ** 2)
        # signed distances, mm
        sd_endo, sd_epi, sd_rv = r_endo - rho, r_epi - rho, (1 - q) * np.minimum(rv_a, rv_b)
        # papillary muscles: labelled LV, as in ACDC
        pap = [np.hypot(dx - 0.62 * r_endo * np.cos(a), dy - 0.62 * r_endo * np.sin(a))
               for a in (rv_dir + 2.4, rv_dir - 2.4)]
        sd_pap = pap_r * np.clip(r_endo / 12 - 0.5, 0, 1) - np.minimum(*pap)
        blood, myo = 260 * (1 + 0.05 * tex[z]), 65 * (1 + 0.12 * tex[z])
        endo, epi = soft(sd_endo), soft(sd_epi)
        img = lerp(bg[z], 55 * (1 + 0.12 * tex[z]), soft(blob(*liver_at, liver[z], 1.2 * liver[z], 0.05)))
        epicardial_fat = soft(np.maximum(sd_epi, sd_rv + 2.5) + 4) * soft(4 * patches)
        img = lerp(img, 160 * (1 + 0.1 * tex[z]), epicardial_fat)
        img = lerp(img, myo, np.maximum(soft(sd_rv + 2.5), epi))  # myocardium; the thin RV free wall
        img = lerp(img, 0.92 * blood, soft(sd_rv) * (1 - epi))
        img = lerp(img, blood, endo)
        img = lerp(img, 0.5 * blood, endo * soft(sd_pap)) * bias
        noise = rng.standard_normal((2,) + img.shape, dtype=np.float32) * sigma
        # the magnitude of a complex signal: Rician
        cine[:, z] = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
        inside = [sd_endo[[0, es]] > 0, sd_epi[[0, es]] > 0, sd_rv[[0, es]] > 0]
        labels[:, z] = np.select(inside, [3, 2, 1], 0)
    return cine, labels, es, (px, px, dz), group


def write_phantom(root, patients=20, seed=0, size_range=(150, 300), frames_range=(12, 30),
                  slices_range=(6, 12)):
    """root/training/patientNNN/... for ids 1..patients (ids over 100 under testing/, as in ACDC);
    the same files for the same seed. A patient depends on (seed, id) only: a smaller phantom is a
    prefix of a larger one."""
    os.makedirs(root, exist_ok=True)
    # the marker that tells every script (and a person browsing the folder) that this is not ACDC
    marker = {"what": "a synthetic phantom in the ACDC layout, written by phantom.py; not real MRI",
              "patients": patients, "seed": seed, "complete": False}
    files.write_json(os.path.join(root, acdc.PHANTOM_MARKER), marker)
    for patient in tqdm(range(1, patients + 1), desc="phantom", unit="patient", disable=None):
        rng = np.random.default_rng([seed, patient])
        cine, labels, es, spacing, group = _phantom_patient(rng, size_range, frames_range, slices_range)
        name, folder = f"patient{patient:03d}", patient_folder(root, patient)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "Info.cfg"), "w") as f:
            f.write(f"ED: 1\nES: {es + 1}\nGroup: {group}\nHeight: {rng.uniform(150, 195):.1f}\n"
                    f"NbFrame: {len(cine)}\nWeight: {rng.uniform(50, 110):.1f}\n")
        # both storage types occur in the wild; int16 is the common one
        cine = np.round(cine).clip(0, 32767).astype(np.int16) if rng.random() < 0.75 else cine
        volumes = {"4d": cine, **{f"frame{t + 1:02d}": cine[t] for t in (0, es)},
                   **{f"frame{t + 1:02d}_gt": label for t, label in zip((0, es), labels)}}
        for stem, data in volumes.items():
            # ([T,] Z, X, Y) -> the file's (X, Y, Z[, T]); the spacing on the diagonal of the affine
            image = nib.Nifti1Image(data.T.swapaxes(0, 1), np.diag([*spacing, 1.0]))
            image.header.set_xyzt_units("mm", "sec")
            path = os.path.join(folder, f"{name}_{stem}.nii.gz")
            files.write_atomic(path, lambda tmp: nib.save(image, tmp))
    files.write_json(os.path.join(root, acdc.PHANTOM_MARKER), {**marker, "complete": True})  # last: all there


def patient_folder(root, patient):
    return os.path.join(root, "training" if patient <= 100 else "testing", f"patient{patient:03d}")


def phantom_in(root):
    """(patients, seed) of the complete phantom in `root`, or None. Complete: phantom.json says so
    (written last); a phantom.json from before that field, when every patient's five NIfTI files are there."""
    try:
        with open(os.path.join(root, acdc.PHANTOM_MARKER)) as f:
            marker = json.load(f)
        found = int(marker["patients"]), marker["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "complete" not in marker:
        marker["complete"] = all(len(glob.glob(os.path.join(patient_folder(root, p), "*.nii.gz"))) == 5
                                 for p in range(1, found[0] + 1))
    return found if marker["complete"] is True else None


def write_montage(root, path, patients=3, tile=160):
    """an SVG, a row a patient: ED slices from base to apex and a mid ES slice, each beside its labels"""
    rows, captions = [], []
    for case in acdc.find_cases(root)[:patients]:
        tiles = []
        for f in case.frames:
            image = torch.from_numpy(acdc.read_volume(f.image).data)
            label = torch.from_numpy(acdc.read_label(f.label).data)
            Z = image.shape[2]
            for z in ((0, Z // 2, Z - 2) if f.phase == "ED" else (Z // 2,)):
                gray = pictures.grey(image[:, :, z], low=0.0, high=0.995)
                tiles += [gray.expand(3, -1, -1), pictures.overlay(gray, label[:, :, z])]
        rows.append(tiles)
        captions.append(f"patient{case.patient:03d}: group {case.info.get('Group')}, {Z} slices, "
                        f"{case.info.get('NbFrame')} frames, ED frame {case.ed}, ES frame {case.es}")
    columns = [f"{c}{w}" for c in ("ED base", "ED mid", "ED near apex", "ES mid") for w in ("", ", labels")]
    title = f"{root}: a synthetic phantom (not ACDC), its first {len(rows)} patients"
    pictures.write_svg(path, [pictures.Tiles(rows, title, captions=captions, tile=tile, columns=columns)])


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a synthetic cardiac MRI phantom in the ACDC layout, "
                                "and a picture of it, OUT/montage.svg",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="folder to write: OUT/training/patientNNN/...")
    p.add_argument("--patients", type=int, default=20, help="number of patients, ids 001..N")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same data")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that holds no "
                   "phantom of these --patients and --seed (patients 1..N are replaced, other files stay)")
    args = p.parse_args(argv)
    if problem := files.folder_problem(args.out):
        sys.exit(f"error: {args.out}: {problem}")
    found = phantom_in(args.out)
    if found == (args.patients, args.seed):  # so the quickstart can run again
        print(f"{args.out} already holds this phantom ({args.patients} patients, seed {args.seed}): nothing written")
        return 0
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        what = f"a phantom of {found[0]} patients, seed {found[1]}" if found else "no complete phantom"
        sys.exit(f"error: {args.out} is not empty and holds {what}: pass --overwrite to write over it, "
                 "or choose another folder")
    write_phantom(args.out, args.patients, args.seed)
    write_montage(args.out, os.path.join(args.out, "montage.svg"))
    print(f"wrote {args.patients} patients under {args.out}; a look at them: {args.out}/montage.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
