"""The paper's experiments in one command: plan the run grid, run it on any number of devices, report.

    python study.py plan   --study studies/paper --data /data/ACDC          # the runs, done or not; time
    python study.py run    --study studies/paper --data /data/ACDC          # one device: run after run
    python study.py run    --study studies/paper --gpus 0,1,2,3             # one run per GPU until done
    python study.py run    --study studies/paper --index $SLURM_ARRAY_TASK_ID   # entry N of the plan only
    python study.py report --study studies/paper                            # results.csv, .md, SVG plots
    python study.py run --study studies/cpu --strategies none,pretrain:none:5 --fractions 0.1,1 --seeds 0,1 \\
        -- --arch resnet18 --size 64 --epochs 20           # after --: train_segment.py's other flags

The grid is strategies x label fractions x seeds, each a fine-tuning (train_segment.py) then an
evaluation on the test patients (evaluate.py), in STUDY/runs/<strategy>/fraction-F/seed-S. A
strategy is what --weights accepts (a published name, a file, none) or pretrain:INIT:EPOCHS, a
BYOL pretraining done here first (STUDY/pretrain/...), from INIT (none: random; or a name or file)
for EPOCHS epochs; --lengths adds the pretraining-length study, fine-tuning from the copies of
each such backbone saved at those epochs. Defaults are the paper's grid (700 fine-tunings).

A run is done when its result.json exists and never redone; an interrupted one resumes from its
checkpoint.pt; a failed one is reported and the others go on. Every run folder is locked by the
process working in it (run_folder.py), so any number of `run` processes share a study safely.
The study folder records its settings (study.json): running it with other ones is refused.
"""
import argparse
import contextlib
import os
import subprocess
import sys
import time
import traceback

import torch

import acdc
import bench
import evaluate
import files
import results
import run_folder
import train_pretrain
import train_segment
import training
from grid import count_slices, finished, label, missing_weights, plan, state
from slices import label_fraction_plan

# the paper's grid: its encoder weights (supervised_imagenet is its "imagenet") and random initialisation,
# label fractions and seeds; the pretraining-length study's epochs
PAPER_STRATEGIES = ["none", "supervised_imagenet", "resnet50_byol_imagenet2012.pth.tar",
                    "supervised-imagenet-byol-acdc-ep=25.pth", "byol-imagenet-acdc-ep=34.ckpt",
                    "byol-imagenet-acdc-ep=25.pth", "byol_acdc_backbone_last.pth"]
PAPER_FRACTIONS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
PAPER_SEEDS = [0, 13, 42, 123, 1111, 77, 62, 91, 7, 5]
PAPER_LENGTHS = [*range(11), 12, 14, 16, 18, 20, 22, 24, 25, 50, 100, 200, 300, 400]
WAITING = 75  # EX_TEMPFAIL: --index on a run whose pretraining is not finished: try again later
SETTINGS = ("data", "strategies", "fractions", "seeds", "lengths", "length_fractions", "length_seeds",
            "train_args", "pretrain_args")

# -----------------------------------------------------------------------------
# settings and the plan

def listed(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list") from None
    return parse


def settings_of(args):
    """the study's settings: those recorded in STUDY/study.json, with what this command gives; a
    given flag that differs from the record is refused (a new --study folder changes them)"""
    path = os.path.join(args.study, "study.json")
    recorded = results.read_json(path) if os.path.exists(path) else {}
    given = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) not in (None, [])}
    given["data"] = os.path.abspath(given["data"]) if "data" in given else None
    differ = [k for k, v in given.items() if k in recorded and v is not None and not same(k, recorded, v)]
    if differ:
        sys.exit(f"--study {args.study} was planned with other settings: "
                 + "; ".join(f"--{k.replace('_', '-')} {recorded[k]} (now {given[k]})" for k in differ)
                 + ". Use another --study folder for other settings")
    defaults = {"data": os.path.abspath("data/acdc-synth"), "strategies": PAPER_STRATEGIES,
                "fractions": PAPER_FRACTIONS, "seeds": PAPER_SEEDS, "lengths": [], "length_fractions": [1.0],
                "length_seeds": [13], "train_args": [], "pretrain_args": ""}
    s = {k: given.get(k) if given.get(k) is not None else recorded.get(k, defaults[k]) for k in SETTINGS}
    try:
        s["data_fingerprint"] = acdc.fingerprint(s["data"])
    except acdc.DatasetError as e:
        sys.exit(f"error: --data: {e}")
    return s


def same(key, recorded, new):
    """the same experiment: the data by its content (a copy elsewhere is the same), flags by what they
    train (how they run may change)"""
    old = recorded[key]
    if key == "data":
        return os.path.isdir(new) and acdc.fingerprint(new) == recorded.get("data_fingerprint")
    if key == "train_args":
        return experiment(train_segment, old) == experiment(train_segment, new)
    if key == "pretrain_args":
        return experiment(train_pretrain, old.split()) == experiment(train_pretrain, new.split())
    return old == new


def experiment(script, argv):
    """what a script's flags train (run_folder.EXPERIMENT_FLAGS, the batch, the evaluation's padding),
    without what the study itself varies"""
    parsed = vars(script.parse_args(["--data", ".", *argv]))
    varied = ({"weights", "init", "label_fraction", "seed"}
              | ({"epochs"} if script is train_pretrain else set()))
    keys = set(run_folder.EXPERIMENT_FLAGS) | {"batch_size", "min_size"}
    return {k: v for k, v in parsed.items() if k in keys - varied}


# -----------------------------------------------------------------------------
# one run: training, evaluation, the result, what is kept

def train_args(entry, s, device):
    """train_segment.py's flags for a fine-tuning entry (or train_pretrain.py's for a pretraining)"""
    given = train_segment.parse_args(["--data", s["data"], *s["train_args"]])
    common = ["--data", s["data"], "--out", entry.folder, "--resume", "auto", "--seed", str(entry.seed or 0)]
    common += ["--device", device] if device else []
    if entry.kind == "finetune":
        # checkpoint.pt every 25 epochs unless asked otherwise: the paper's 150 epochs of 7 steps would spend
        # more time writing a checkpoint each epoch than training
        saves = [] if "--save-every" in s["train_args"] else ["--save-every", "25"]
        return [*saves, *s["train_args"], *common, "--weights", entry.weights, "--label-fraction",
                f"{entry.fraction:g}"]
    keep = [e for e in s["lengths"] if e <= entry.pretrain_epochs] + [entry.pretrain_epochs]
    shared = ["--arch", given.arch, "--workers", str(given.workers), "--amp", given.amp, "--norm", given.norm]
    shared += ["--cache", given.cache] if given.cache else []
    return [*shared, *s["pretrain_args"].split(), *common, "--init", entry.weights, "--epochs",
            str(entry.pretrain_epochs), "--save-backbone-epochs", ",".join(map(str, sorted(set(keep))))]


def execute(entry, s, args, tag):
    """train (resuming), evaluate, write result.json, keep what --keep says -> "done", "failed",
    "stopped" (a signal or --stop-after ended training early) or "busy" (another process has it)"""
    os.makedirs(entry.folder, exist_ok=True)
    if run_folder.try_lock(entry.folder):
        return "busy"
    resuming = os.path.exists(os.path.join(entry.folder, "checkpoint.pt"))
    print(f"{tag} {label(entry)}: {'resuming' if resuming else 'starting'}", flush=True)
    t0 = time.time()
    try:
        with open(os.path.join(entry.folder, "output.log"), "a") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            argv = train_args(entry, s, args.device)
            script = train_segment if entry.kind == "finetune" else train_pretrain
            parsed = script.parse_args(argv)
            script.main(parsed)
            if not finished(entry.folder, parsed.epochs):
                return "stopped"
            if entry.kind == "finetune":  # the test patients, on the same device, without masks or pictures
                evaluate.main(evaluate.parse_args([
                    "--checkpoint", os.path.join(entry.folder, "best.pt"), "--data", s["data"],
                    "--split", "test", "--out", os.path.join(entry.folder, "test"),
                    "--min-size", str(parsed.min_size), "--device", parsed.device, "--amp", parsed.amp,
                    "--outputs", "metrics", "--workers", "0", "--overwrite"]))
        epochs = results.epoch_lines(entry.folder)
        timing = {"wall_s": time.time() - t0, "step_s": sum(r["time_s"] for r in epochs)}
        old = os.path.join(entry.folder, "timing.json")
        if os.path.exists(old):  # an earlier invocation worked on this run too
            timing["wall_s"] += results.read_json(old)["wall_s"]
        files.write_json(old, timing)
        files.write_json(os.path.join(entry.folder, "result.json"),
                         {"kind": entry.kind, "strategy": entry.strategy, **timing})
        keep(entry, args.keep)
        return "done"
    except (Exception, SystemExit) as e:  # a failed run is reported; the others go on
        files.write_text(os.path.join(entry.folder, "failed.txt"), f"{type(e).__name__}: {e}\n"
                         + traceback.format_exc())
        return "failed"
    finally:
        run_folder.unlock(entry.folder, completely=True)


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
        run_folder.save_atomic(ckpt, best)


# -----------------------------------------------------------------------------
# running the plan: in this process, a pool of processes, or one entry

def work(entries, s, args):
    """run what is not done, in plan order, until nothing is left that this process can do; runs
    other processes hold are waited for. -> (done, failed, stopped)"""
    done, failed, tried = 0, [], set()
    while True:
        waiting = False
        for i, entry in enumerate(entries):
            now = state(entry)
            if now in ("done", "unavailable") or i in tried:
                continue
            if now == "waiting":
                waiting = waiting or entries.index(entry.needs) not in tried  # a failed pretraining: none
                continue
            t0 = time.time()
            outcome = execute(entry, s, args, f"[{i}/{len(entries)}]")
            if outcome == "busy":
                waiting = True
                continue
            tried.add(i)
            print(f"[{i}/{len(entries)}] {label(entry)}: {outcome} in {time.time() - t0:.1f} s", flush=True)
            if outcome == "stopped":
                return done, failed, True
            done += outcome == "done"
            failed += [entry] if outcome == "failed" else []
        if not waiting:
            return done, failed, False
        time.sleep(2)  # what is left runs in other processes, or waits for their pretraining


def pool(args):
    """one `study.py run` process per entry of --gpus, each on its device, sharing the plan (each run
    folder's lock keeps two of them off one run)"""
    procs = []
    for device in args.gpus:
        env = dict(os.environ)
        if device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = device  # the process sees this GPU alone, as cuda
        else:  # CPU processes share the cores: more threads than cores slow every one of them down
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(args.gpus)))
        cmd = [sys.executable, os.path.abspath(__file__), *args.study_argv, "--device",
               "cpu" if device == "cpu" else "cuda", "--", *(args.train_args or [])]
        procs.append(subprocess.Popen(cmd, env=env))
    return max(p.wait() for p in procs)


def run_index(entries, s, args):
    if not 0 <= args.index < len(entries):
        sys.exit(f"--index {args.index}: the plan has entries 0..{len(entries) - 1}")
    entry = entries[args.index]
    now = state(entry)
    print(f"[{args.index}/{len(entries)}] {label(entry)}: {now}")
    if now == "unavailable":
        sys.exit(f"error: {missing_weights(entry)}")
    if now in ("waiting", "running"):
        return WAITING
    outcome = "done" if now == "done" else execute(entry, s, args, f"[{args.index}/{len(entries)}]")
    print(f"[{args.index}/{len(entries)}] {label(entry)}: {outcome}")
    return {"done": 0, "failed": 1}.get(outcome, WAITING)


# -----------------------------------------------------------------------------
# planning output: the list, the count, the time it will take

def estimate(entries, s, device):
    """the fine-tunings' steps (from the label fractions' epoch lengths) x a step timed here"""
    given = train_segment.parse_args(["--data", s["data"], *s["train_args"]])
    arch = "resnet50" if given.arch == "auto" else given.arch
    seconds, name = bench.seconds_per_step("segment", arch, given.size, given.batch_size, given.amp,
                                           device or given.device)
    n = count_slices(s["data"])
    steps = sum(given.epochs * (k * repeats // given.batch_size)
                for e in entries if e.kind == "finetune"
                for k, repeats in [label_fraction_plan(n, e.fraction)])
    hours = steps * seconds / 3600
    return (f"estimate on {name}: {steps} fine-tuning steps x {seconds:.3g} s = {hours:.1f} h of steps, "
            f"{1.2 * hours:.1f} h with the 20% allowed for start-up, validation and evaluation (pretraining "
            f"not included)")


def show_plan(entries):
    counts = {}
    for i, e in enumerate(entries):
        now = state(e)
        counts[now] = counts.get(now, 0) + 1
        print(f"{i:5d}  {now:<11} {label(e)}  {e.folder}")
    for strategy in dict.fromkeys(e.strategy for e in entries if state(e) == "unavailable"):
        entry = next(e for e in entries if e.strategy == strategy)
        print(f"skipped: {missing_weights(entry)}")
    print(f"{len(entries)} entries: " + ", ".join(f"{n} {k}" for k, n in counts.items()))


# -----------------------------------------------------------------------------
# the script

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("command", choices=["plan", "run", "report"], help="what to do")
    p.add_argument("--study", required=True, help="the study folder")
    p.add_argument("--data", default=None, help="ACDC root (default: the phantom, data/acdc-synth)")
    p.add_argument("--strategies", type=listed(str), default=None,
                   help="comma-separated --weights values or pretrain:INIT:EPOCHS "
                        "(default: the paper's seven)")
    p.add_argument("--fractions", type=listed(float), default=None,
                   help="label fractions (default: the paper's)")
    p.add_argument("--seeds", type=listed(int), default=None, help="seeds (default: the paper's ten)")
    p.add_argument("--lengths", type=listed(int), default=None,
                   help="pretraining epochs to fine-tune from, for each pretrain: strategy (the paper's: "
                        + ",".join(map(str, PAPER_LENGTHS)) + ")")
    p.add_argument("--length-fractions", type=listed(float), default=None, help="their label fractions (1.0)")
    p.add_argument("--length-seeds", type=listed(int), default=None, help="their seeds (the paper's: 13)")
    p.add_argument("--pretrain-args", default=None,
                   help="train_pretrain.py's flags for pretrain: strategies, in quotes (--arch and --cache "
                        "follow the fine-tuning's)")
    p.add_argument("--keep", default="best-fp16", choices=["best-fp16", "best", "all", "none"],
                   help="what a finished run keeps besides logs and metrics: best.pt in fp16, in fp32, "
                        "everything (checkpoint.pt too), or no weights")
    p.add_argument("--gpus", type=listed(str), default=None,
                   help="a pool: one run on each (e.g. 0,1,2,3 or cpu,cpu)")
    p.add_argument("--index", type=training.number(int, 0), default=None, help="run only entry N of the plan")
    p.add_argument("--device", default=None,
                   help="the device of this process's runs (default: train_segment's)")
    p.add_argument("--reference", default="supervised_imagenet",
                   help="the strategy speed-ups are relative to")
    p.add_argument("--estimate", action="store_true", help="plan: time a few steps and estimate the study")
    p.add_argument("--count", action="store_true",
                   help="plan: print only the number of entries and of pretrainings (first in the plan), for "
                        "sbatch --array")
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    # a pool's processes get these again, without --gpus
    args.study_argv = [a for i, a in enumerate(argv[:cut]) if not (a == "--gpus" or a.startswith("--gpus=")
                                                                   or i and argv[i - 1] == "--gpus")]
    args.train_args = argv[cut + 1:] or None  # None: the study's recorded ones
    return args


def main(args):
    s = settings_of(args)
    train_segment.parse_args(["--data", s["data"], *s["train_args"]])  # bad flags fail here, not in run 1
    entries = plan(args.study, s)
    if problem := files.folder_problem(args.study):
        sys.exit(f"error: --study {args.study}: {problem}")
    os.makedirs(args.study, exist_ok=True)
    once = s["train_args"]  # --stop-after is this invocation's, never the study's
    kept = [a for i, a in enumerate(once) if not (a == "--stop-after" or i and once[i - 1] == "--stop-after")]
    files.write_json(os.path.join(args.study, "study.json"), {**s, "train_args": kept})
    if args.command == "plan" and args.count:
        print(len(entries), sum(e.kind == "pretrain" for e in entries))
        return 0
    print(f"study {args.study}: {acdc.describe(s['data'])}")
    if args.command == "plan":
        show_plan(entries)
        print(estimate(entries, s, args.device) if args.estimate else "(--estimate: time it on this device)")
        return 0
    if args.command == "report":
        return report(entries, args)
    if args.index is not None:
        return run_index(entries, s, args)
    if args.gpus:
        return pool(args)
    t0 = time.time()
    done, failed, stopped = work(entries, s, args)
    wall = time.time() - t0
    step = sum(results.read_json(os.path.join(e.folder, "timing.json"))["step_s"] for e in entries
               if os.path.exists(os.path.join(e.folder, "timing.json")))
    print(f"{done} runs done in {wall:.0f} s; time in training epochs over all finished runs {step:.0f} s")
    for entry in failed:
        tail = open(os.path.join(entry.folder, "failed.txt")).read().strip().splitlines()[-3:]
        print(f"failed: {label(entry)} ({entry.folder}/failed.txt, output.log):\n    " + "\n    ".join(tail))
    if stopped:
        print("stopped (a signal or --stop-after): run the same command again to continue")
    return 1 if failed else (WAITING if stopped else 0)


def report(entries, args):
    rows, missing = [], []
    for e in entries:
        if e.kind == "finetune" and state(e) == "done":
            rows.append(results.run_row(e.folder, e.strategy.split("@")[0], e.pretrain_epochs))
        elif e.kind == "finetune":
            missing.append(f"{label(e)}: {state(e)}")
    title = os.path.basename(os.path.abspath(args.study))
    for path in results.write_all(args.study, rows, missing, title, args.reference):
        print(f"wrote {path}")
    print(f"{len(rows)} finished runs"
          + (f", {len(missing)} not finished (see results.md)" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(training.run_main(main, parse_args()))
