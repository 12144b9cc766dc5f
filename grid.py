"""A study's grid of runs: its settings, its entries, their folders, the state of each.

    entries = plan("studies/paper", settings)     # pretrainings first, then the grid, then the length study
    state(entries[5])                             # "done", "to do", "partial", "waiting", "running", ...

A strategy is a --weights value of train_segment.py (a published name, a file, none) or
pretrain:INIT:EPOCHS, a BYOL pretraining done in the study first (STUDY/pretrain/<strategy>), from
INIT for EPOCHS epochs; its fine-tunings wait for it. A run lives in
STUDY/runs/<strategy>/fraction-F/seed-S and is done when its result.json exists. The settings (the
paper's by default) are checked when study.py parses them, and recorded in STUDY/study.json.
"""
import argparse
import os
import sys
from collections import namedtuple

import nibabel as nib
import torch

import acdc
import files
import results
import run_folder
import training
import weights

Entry = namedtuple("Entry", "kind strategy fraction seed folder weights needs pretrain_epochs")

# -----------------------------------------------------------------------------
# the study's settings and their checks. The paper's: its encoder weights (supervised_imagenet is its
# "imagenet") and random initialisation, label fractions and seeds; the pretraining-length study's epochs
PAPER_STRATEGIES = ["none", "supervised_imagenet", "resnet50_byol_imagenet2012.pth.tar",
                    "supervised-imagenet-byol-acdc-ep=25.pth", "byol-imagenet-acdc-ep=34.ckpt",
                    "byol-imagenet-acdc-ep=25.pth", "byol_acdc_backbone_last.pth"]
PAPER_FRACTIONS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
PAPER_SEEDS = [0, 13, 42, 123, 1111, 77, 62, 91, 7, 5]
PAPER_LENGTHS = [*range(1, 12), 13, 15, 17, 19, 21, 23, 25, 26, 51, 101, 201, 301, 401]  # its ep=N: N + 1 epochs
# every setting study.json records (and the data's fingerprint), with its default
DEFAULTS = {"data": None, "strategies": PAPER_STRATEGIES, "fractions": PAPER_FRACTIONS,
            "seeds": PAPER_SEEDS, "lengths": [], "length_fractions": [1.0], "length_seeds": [13], "train_args": [],
            "pretrain_args": ""}
FRACTION, COUNT = training.number(float, above=0, high=1), training.number(int, 0)  # a seed or a length


def listed(kind):
    """an argparse type: a comma-separated list of `kind` values (kind refuses a bad one)"""
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def lengths_type(text):
    """an argparse type: --lengths, epochs completed (comma-separated), or paper (PAPER_LENGTHS)"""
    return list(PAPER_LENGTHS) if text == "paper" else listed(COUNT)(text)


def strategy_type(text):
    """an argparse type: a --weights value, or pretrain:INIT:EPOCHS with an integer EPOCHS >= 1"""
    parts = text.split(":")
    if parts[0] == "pretrain" and not (len(parts) == 3 and parts[2].isdigit() and int(parts[2]) >= 1):
        raise argparse.ArgumentTypeError(f"{text}: expected pretrain:INIT:EPOCHS with an integer EPOCHS >= 1, "
                                         "e.g. pretrain:none:400")
    return text


def recorded_settings(study):
    """the settings in STUDY/study.json ({} before the first plan); a damaged one stops here, saying how
    to write it again"""
    path = os.path.join(study, "study.json")
    try:
        record = results.read_json(path) if os.path.exists(path) else {}
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: {e}. Move it aside and run `study.py plan` with the study's original flags: "
                 "it is written again")
    return record


def slug(text):
    return text.replace("/", "_").replace(":", "-").replace("@", "-at")


def plan(study, s):
    """-> [Entry]: pretrainings first (fine-tunings wait for them), then the grid, then the length study"""
    entries, pretrain = [], {}
    for strategy in s["strategies"]:
        if strategy.startswith("pretrain:"):
            _, init, epochs = strategy.split(":")  # checked by strategy_type
            epochs = int(epochs)
            folder = os.path.join(study, "pretrain", slug(strategy))
            pretrain[strategy] = Entry("pretrain", strategy, None, None, folder, init, None, epochs)
    entries += pretrain.values()
    runs = [(s_, f, seed, None) for s_ in s["strategies"] for f in s["fractions"] for seed in s["seeds"]]
    runs += [(s_, f, seed, e) for s_, p in pretrain.items() for e in s["lengths"] if e <= p.pretrain_epochs
             for f in s["length_fractions"] for seed in s["length_seeds"]]
    for strategy, fraction, seed, at in runs:
        name = strategy if at is None else f"{strategy}@{at}"
        folder = os.path.join(study, "runs", slug(name), f"fraction-{fraction:g}", f"seed-{seed}")
        source = pretrain.get(strategy)
        if source is None:
            entries.append(Entry("finetune", name, fraction, seed, folder, strategy, None, None))
        else:
            backbone = "backbone.pth" if at is None else f"backbone_ep{at:03d}.pth"
            entries.append(Entry("finetune", name, fraction, seed, folder,
                                 os.path.join(source.folder, backbone), source, at))
    return entries


def missing_weights(entry):
    """None, or one line saying which file a run's weights need and how to get it: a named file that
    is not in the cache is fetched by the run's first use, unless it cannot be (Google Drive, offline);
    a fine-tuning from a pretraining done here needs what that pretraining starts from"""
    if entry.needs is not None:
        return missing_weights(entry.needs)
    source = entry.weights
    if source == "none":
        return None
    available, detail = weights.status(source)
    return None if available or weights.downloadable(source) else detail


def state(entry):
    folder = entry.folder
    if os.path.exists(os.path.join(folder, "result.json")):
        return "done"
    if missing_weights(entry):
        return "unavailable"
    if entry.needs is not None and state(entry.needs) != "done":
        return "waiting"
    owner = run_folder.read_owner(os.path.join(folder, run_folder.LOCK))
    if owner and not run_folder.stale_reason(owner) and owner.get("pid") != os.getpid():
        return "running"
    if os.path.exists(os.path.join(folder, "failed.txt")):
        return "failed"
    return "partial" if os.path.exists(os.path.join(folder, "checkpoint.pt")) else "to do"


def finished(folder, epochs):
    """a fine-tuning or pretraining ran all its epochs (its log has the last epoch's line)"""
    path = os.path.join(folder, "log.jsonl")
    return os.path.exists(path) and any(r["epoch"] == epochs - 1 for r in results.epoch_lines(folder))


def origin(entry):
    """"paper" for an entry of the paper's committed grid (its six published weights x its fractions x
    its seeds: 600 fine-tunings), "added" for the rest (random initialisation, pretrainings done here)"""
    paper = entry.strategy in PAPER_STRATEGIES[1:] and entry.fraction in PAPER_FRACTIONS and entry.seed in PAPER_SEEDS
    return "paper" if paper else "added"


def label(entry):
    if entry.kind == "pretrain":
        return f"pretraining {entry.strategy}"
    return f"{entry.strategy}, fraction {entry.fraction:g}, seed {entry.seed}"


def count_slices(root, split="train", cine=False):
    """a split's (or train+val's, all's) labelled slices, or its cines', from the headers alone"""
    cases = [c for part in split.replace("all", "train+val+test").split("+") for c in acdc.find_cases(root, split=part)]
    shapes = [nib.load(p).shape for c in cases for p in ([c.cine] if cine else [f.image for f in c.frames])]
    return sum(shape[2] * (shape[3] if cine else 1) for shape in shapes)


# -----------------------------------------------------------------------------
# what a run folder keeps: its time, its outcome, its weights

def add_time(folder, seconds):
    """timing.json: wall time summed over every invocation that worked on the run; the time in its
    training epochs, from its log -> the record"""
    path = os.path.join(folder, "timing.json")
    before = results.read_json(path)["wall_s"] if os.path.exists(path) else 0.0
    log = os.path.join(folder, "log.jsonl")
    step = sum(r["time_s"] for r in results.epoch_lines(folder)) if os.path.exists(log) else 0.0
    timing = {"wall_s": before + seconds, "step_s": step}
    files.write_json(path, timing)
    return timing


def failed_since(entry, t0):
    """the run failed in another process of this pool after t0: not tried again now"""
    path = os.path.join(entry.folder, "failed.txt")
    return os.path.exists(path) and os.path.getmtime(path) > t0


def keep(entry, what):
    """a finished run keeps its logs, metrics and (unless --keep none) best.pt, in fp16 by default"""
    folder = entry.folder
    if what == "all":
        return
    if os.path.exists(os.path.join(folder, "checkpoint.pt")):
        os.remove(os.path.join(folder, "checkpoint.pt"))
    best = os.path.join(folder, "best.pt")
    if entry.kind == "pretrain" or not os.path.exists(best):
        return
    if what == "none":
        os.remove(best)
    elif what == "best-fp16":  # half the disk; checkpoints.py reads it back into fp32 networks
        ckpt = torch.load(best, map_location="cpu", weights_only=True)
        ckpt["model"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
        files.save_atomic(ckpt, best)


def show_plan(entries):
    """the plan, a line an entry (its index, state, paper or added, label, folder), and what is skipped"""
    counts = {}
    for i, e in enumerate(entries):
        now = state(e)
        counts[now] = counts.get(now, 0) + 1
        print(f"{i:5d}  {now:<11} {origin(e):<5} {label(e)}  {e.folder}")
    for strategy in dict.fromkeys(e.strategy for e in entries if state(e) == "unavailable"):
        entry = next(e for e in entries if e.strategy == strategy)
        print(f"skipped: {missing_weights(entry)}")
    print(f"{len(entries)} entries: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
