"""A study's results: one row per finished run, the tables a paper prints, the plots.

study.py runs the grid; this module only reads finished run folders (config.json, log.jsonl,
test/metrics.json, timing.json) and writes results.csv, results.md and SVG plots:

    rows = [run_row(folder, entry) for each finished run]
    write_all(study_folder, rows, missing, reference="supervised_imagenet")

Definitions: epochs_to_90 / epochs_to_95 are the epochs trained until the validation IoU first
reached 90% / 95% of that run's best; test figures come from the run's metrics.json (the paper's
per-slice IoU with background and over the structures; the challenge's Dice and HD95 per
structure, averaged over ED and ES); wall_s is the run's wall time, step_s its time in training
epochs (steps and data loading), both summed over every invocation that worked on it.
"""
import json
import math
import os

import torch

import files
import pictures

FIELDS = ["strategy", "weights", "fraction", "distinct_train_slices", "seed", "epochs", "steps",
          "best_val_iou", "best_epoch", "epochs_to_90", "epochs_to_95", "test_iou_with_background",
          "test_iou_structures", "dice_RV", "dice_MYO", "dice_LV", "hd95_RV", "hd95_MYO", "hd95_LV",
          "mean_dice", "wall_s", "step_s"]
STRUCTURES = ("RV", "MYO", "LV")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def epoch_lines(folder):
    return [r for r in files.read_jsonl(os.path.join(folder, "log.jsonl")) if "steps" in r]  # one line per epoch


def epochs_to(curve, share):
    """epochs trained until the curve [(epoch from 1, IoU)] first reached `share` of its best (nan: never, or
    a best of 0: nothing learned, so no epoch reached anything)"""
    best = max((v for _, v in curve), default=float("nan"))
    if not best > 0:
        return float("nan")
    return next((epoch for epoch, v in curve if v >= share * best), float("nan"))


def mean_of(*values):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


class DamagedFile(Exception):
    """a finished run's file is missing or is not what the run writes; the message names it"""


def run_row(folder, strategy, pretrain_epochs=None):
    """the results.csv row of a finished run folder (train_segment.py then evaluate.py into test/); a
    missing or damaged file raises DamagedFile naming it"""
    row = {"strategy": strategy, "pretrain_epochs": pretrain_epochs}  # (for the length table, not a column)
    for name, fields in (("config.json", config_fields), ("test/metrics.json", metric_fields),
                         ("timing.json", timing_fields), ("log.jsonl", curve_fields)):
        path = os.path.join(folder, name)
        try:
            row.update(fields(path))
        except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:
            raise DamagedFile(f"{path}: {type(e).__name__}: {getattr(e, 'strerror', None) or e}") from None
    return row


def config_fields(path):
    config = read_json(path)
    args = config["args"]
    return {"weights": args["weights"], "fraction": args["label_fraction"], "seed": args["seed"],
            "distinct_train_slices": config.get("distinct_train_slices", config["train_slices"]),
            "epochs": args["epochs"], "steps": config["total_steps"]}


def metric_fields(path):
    metrics = read_json(path)
    challenge, paper = metrics["challenge"], metrics["paper_slice_iou"]
    return {"test_iou_with_background": paper["mean_iou_with_background"],
            "test_iou_structures": paper["mean_iou_structures"],
            **{f"dice_{s}": mean_of(*(challenge[p][s]["dice"]["mean"] for p in ("ED", "ES"))) for s in STRUCTURES},
            **{f"hd95_{s}": mean_of(*(challenge[p][s]["hd95"]["mean"] for p in ("ED", "ES"))) for s in STRUCTURES},
            "mean_dice": metrics["mean_dice_structures"]}


def timing_fields(path):
    timing = read_json(path)
    return {"wall_s": timing["wall_s"], "step_s": timing["step_s"]}


def curve_fields(path):
    """the validation IoU per epoch (kept for the convergence plot), its best and how soon it came; epochs
    counted from 1 (log.jsonl's "epoch" is 0-based: epoch k is the line with "epoch" k - 1)"""
    curve = [(r["epoch"] + 1, r["val_iou"]) for r in files.read_jsonl(path) if r.get("val_iou") is not None]
    best_epoch, best = max(curve, key=lambda c: c[1], default=(float("nan"), float("nan")))
    return {"best_val_iou": best, "best_epoch": best_epoch, "epochs_to_90": epochs_to(curve, 0.90),
            "epochs_to_95": epochs_to(curve, 0.95), "curve": curve}


# -----------------------------------------------------------------------------
# statistics over seeds

def stats(values):
    """(mean, population std, n) over the finite values: the spread of the seeds, as the paper's np.std"""
    v = torch.tensor([x for x in values if x is not None and math.isfinite(x)], dtype=torch.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return v.mean().item(), v.std(correction=0).item(), len(v)


def cell(values, digits=3):
    """'0.812 ± 0.013' over seeds ('0.812' from one seed; '(n)' when some runs have no value)"""
    mean, std, n = stats(values)
    if n == 0:
        return "n/a"
    spread = f" ± {std:.{digits}f}" if n > 1 else ""
    return f"{mean:.{digits}f}{spread}" + (f" ({n} of {len(values)})" if n != len(values) else "")


def group(rows, *keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


# -----------------------------------------------------------------------------
# results.md

def table(header, lines):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines])


def markdown(rows, missing, title, reference, fraction_for_speed):
    grid = [r for r in rows if r["pretrain_epochs"] is None]
    strategies = list(dict.fromkeys(r["strategy"] for r in grid))
    fractions = sorted({r["fraction"] for r in grid})
    by = group(grid, "strategy", "fraction")
    parts = [f"# {title}", "", f"{len(rows)} finished runs"
             + (f"; {len(missing)} not finished (listed at the end)" if missing else "")
             + ". Mean ± std over seeds."]
    for key, name in (("test_iou_with_background",
                       "Test IoU, the paper's protocol (per slice, with background)"),
                      ("mean_dice",
                       "Test Dice, mean of RV, MYO, LV over ED and ES (the challenge's protocol)")):
        lines = [[s] + [cell([r[key] for r in by.get((s, f), [])]) if (s, f) in by else "" for f in fractions]
                 for s in strategies]
        parts += ["", f"## {name}", "", table(["strategy"] + [f"{f:g}" for f in fractions], lines)]
    speed = group([r for r in grid if r["fraction"] == fraction_for_speed], "strategy")
    if speed:
        if (reference,) not in speed:  # supervised ImageNet not in this study: relative to its first strategy
            reference = next(iter(speed))[0]
        ref = stats([r["epochs_to_95"] for r in speed[(reference,)]])[0]
        lines = []
        for (s,), runs in speed.items():
            mean = stats([r["epochs_to_95"] for r in runs])[0]
            factor = f"{ref / mean:.2f} x" if math.isfinite(ref) and mean > 0 else "n/a"
            lines.append([s, cell([r["epochs_to_95"] for r in runs], 1),
                          cell([r["best_val_iou"] for r in runs]), factor])
        parts += ["", f"## Convergence at label fraction {fraction_for_speed:g}", "",
                  f"Epochs until the validation IoU first reached 95% of the run's best; speed-up: "
                  f"{reference}'s epochs divided by the strategy's.", "",
                  table(["strategy", "epochs to 95%", "best validation IoU",
                         f"speed-up vs {reference}"], lines)]
    length = [r for r in rows if r["pretrain_epochs"] is not None]
    if length:
        # the paper named a snapshot after N + 1 epochs ep=N (0-based epochs); 0 epochs are the initial weights
        lines = [[s, e, f"ep={e - 1}" if e else "-", cell([r["test_iou_with_background"] for r in runs]),
                  cell([r["epochs_to_95"] for r in runs], 1)]
                 for (s, e), runs in sorted(group(length, "strategy", "pretrain_epochs").items())]
        parts += ["", "## Pretraining length", "", table(["pretraining", "pretraining epochs", "the paper's label",
                                                          "test IoU", "epochs to 95%"], lines)]
    wall, step = (sum(r[k] for r in rows if math.isfinite(r[k])) for k in ("wall_s", "step_s"))
    if step:
        parts += ["", "## Time", "", f"The runs' wall time {wall:.0f} s, of which {step:.0f} s in training epochs "
                  f"(ratio {wall / step:.2f}): start-up, validation, evaluation and writing files took the rest."]
    if missing:
        parts += ["", "## Not finished", ""] + [f"- {m}" for m in missing]
    return "\n".join(parts) + "\n"


# -----------------------------------------------------------------------------
# plots

def band(runs_by_x, key):
    xs = sorted(runs_by_x)
    s = [stats([r[key] for r in runs_by_x[x]]) for x in xs]
    return xs, [m for m, _, _ in s], ([m - d for m, d, _ in s], [m + d for m, d, _ in s])


def data_efficiency(rows, title):
    charts = []
    for key, label in (("test_iou_with_background", "test IoU (paper protocol)"), ("mean_dice", "test Dice")):
        chart = pictures.Chart(f"{label} against label fraction, {title}", "label fraction", label, xlog=True)
        for (s,), runs in group(rows, "strategy").items():
            xs, ys, lohi = band(group_one(runs, "fraction"), key)
            chart.line(xs, ys, s, band=lohi)
        charts.append(chart)
    return charts


def group_one(rows, key):
    return {k[0]: v for k, v in group(rows, key).items()}


def convergence(rows, fraction, title):
    """validation IoU against epochs trained (as epochs_to_95 counts them), mean and band over seeds"""
    chart = pictures.Chart(f"validation IoU per epoch, label fraction {fraction:g}, {title}",
                           "epochs trained", "validation IoU", integer_x=True)
    for (s,), runs in group([r for r in rows if r["fraction"] == fraction], "strategy").items():
        epochs = sorted({e for r in runs for e, _ in r["curve"]})
        per_epoch = {e: [{"v": v} for r in runs for e2, v in r["curve"] if e2 == e] for e in epochs}
        xs, ys, lohi = band(per_epoch, "v")
        chart.line(xs, ys, s, band=lohi)
    return chart


def pretraining_length(rows, title):
    charts = []
    for key, label in (("test_iou_with_background", "test IoU"),
                       ("epochs_to_95", "fine-tuning epochs to 95%")):
        chart = pictures.Chart(f"{label} against pretraining epochs, {title}", "pretraining epochs", label,
                               integer_x=True)
        for (s,), runs in group(rows, "strategy").items():
            xs, ys, lohi = band(group_one(runs, "pretrain_epochs"), key)
            chart.line(xs, ys, s, band=lohi)
        charts.append(chart)
    return charts


def write_all(folder, rows, missing, title, reference="supervised_imagenet", convergence_fractions=None):
    """results.csv, results.md and the plots into the study folder; -> the paths written"""
    grid = [r for r in rows if r["pretrain_epochs"] is None]
    fractions = sorted({r["fraction"] for r in grid})
    chosen = convergence_fractions or sorted({fractions[0], fractions[-1]}) if fractions else []
    written = {"results.csv": None, "results.md": None}
    files.write_csv(os.path.join(folder, "results.csv"), [{k: r[k] for k in FIELDS} for r in rows], FIELDS)
    files.write_text(os.path.join(folder, "results.md"),
                     markdown(rows, missing, f"Results: {title}", reference, max(fractions, default=1.0)))
    if grid:
        pictures.write_svg(os.path.join(folder, "data_efficiency.svg"), data_efficiency(grid, title))
        pictures.write_svg(os.path.join(folder, "convergence.svg"),
                           [convergence(grid, f, title) for f in chosen])
        written.update({"data_efficiency.svg": None, "convergence.svg": None})
    length = [r for r in rows if r["pretrain_epochs"] is not None]
    if length:
        pictures.write_svg(os.path.join(folder, "pretraining_length.svg"), pretraining_length(length, title))
        written["pretraining_length.svg"] = None
    return [os.path.join(folder, name) for name in written]
