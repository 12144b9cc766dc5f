"""The paper's experiments in one command: plan the run grid, run it on any number of devices, report.

    python study.py plan   --study studies/paper --data /data/ACDC          # the runs, done or not; time
    python study.py run    --study studies/paper --data /data/ACDC          # one device: run after run
    python study.py run    --study studies/paper --gpus 0,1,2,3             # one run per GPU until done
    python study.py run    --study studies/paper --index $SLURM_ARRAY_TASK_ID   # entry N of the plan only
    python study.py report --study studies/paper                            # results.csv, .md, SVG plots
    python study.py run --study studies/cpu --strategies none,pretrain:none:5 --fractions 0.1,1 --seeds 0,1 \\
        -- --arch resnet18 --size 64 --epochs 20           # after --: train_segment.py's other flags

The grid (grid.py) is strategies x label fractions x seeds, each a fine-tuning (train_segment.py)
then an evaluation on the test patients (evaluate.py); a strategy pretrain:INIT:EPOCHS is a BYOL
pretraining done first; --lengths adds the pretraining-length study. Defaults: the paper's grid.
A finished run is never redone, an interrupted one resumes, a failed one is reported while the
others go on; each run folder's lock lets any number of `run` processes share a study. The study
folder records its settings (study.json): running it with other ones is refused.
"""
import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import traceback


import acdc
import bench
import evaluate
import files
import results
import run_folder
import train_pretrain
import train_segment
import training
from grid import (COUNT, DEFAULTS, FRACTION, PAPER_LENGTHS, add_time, count_slices, failed_since, finished, keep,
                  label, lengths_type, listed, missing_weights, plan, recorded_settings, show_plan, state,
                  strategy_type)
from slices import label_fraction_plan

WAITING = 75  # EX_TEMPFAIL: --index on a run whose pretraining is not finished: try again later

# -----------------------------------------------------------------------------
# settings and the plan

def pretrain_flags(text):
    """an argparse type: --pretrain-args, refused here when train_pretrain.py's parser refuses it"""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            train_pretrain.parse_args(["--data", ".", *text.split()])
        except SystemExit:  # its error line, without its usage and its name
            raise argparse.ArgumentTypeError(f"{text!r}: {err.getvalue().split('error: ')[-1].strip()}") from None
    return text


def settings_of(args):
    """the study's settings: those recorded in STUDY/study.json, with what this command gives; a
    given flag that differs from the record is refused (a new --study folder changes them)"""
    recorded = recorded_settings(args.study)
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) not in (None, [])}
    differ = [k for k, v in given.items() if k in recorded and not same(k, recorded, v)]
    if differ:
        sys.exit(f"--study {args.study} was planned with other settings: "
                 + "; ".join(f"--{k.replace('_', '-')} {recorded[k]} (now {given[k]})" for k in differ)
                 + ". Use another --study folder for other settings")
    s = {k: given.get(k) if given.get(k) is not None else recorded.get(k, DEFAULTS[k]) for k in DEFAULTS}
    s["data"] = os.path.abspath(s["data"])  # recorded as an absolute path: later commands may run elsewhere
    if args.command != "report":  # a report reads the run folders only: the data may be elsewhere
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
    shared = ["--arch", given.arch, "--workers", str(given.workers), "--amp", given.amp, "--tf32", given.tf32]
    shared += ["--norm", given.norm] if given.norm in ("published", "data") else []  # paper: fine-tuning's alone
    shared += ["--cache", given.cache] if given.cache else []
    return [*shared, *s["pretrain_args"].split(), *common, "--init", entry.weights, "--epochs",
            str(entry.pretrain_epochs), "--save-backbone-epochs", ",".join(map(str, sorted(set(keep))))]


def execute(entry, s, args, tag):
    """train (resuming), evaluate, write result.json, keep what --keep says -> "done", "failed",
    "stopped" (a signal or --stop-after ended training early) or "busy" (another process has it)"""
    os.makedirs(entry.folder, exist_ok=True)
    if run_folder.try_lock(entry.folder):
        return "busy"
    if os.path.exists(os.path.join(entry.folder, "result.json")):  # finished by another process meanwhile
        run_folder.unlock(entry.folder, completely=True)
        return "done"
    resuming = os.path.exists(os.path.join(entry.folder, "checkpoint.pt"))
    print(f"{tag} {label(entry)}: {'resuming' if resuming else 'starting'}", flush=True)
    t0, outcome = time.time(), "failed"
    try:
        with open(os.path.join(entry.folder, "output.log"), "a") as log, \
                contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            argv = train_args(entry, s, args.device)
            script = train_segment if entry.kind == "finetune" else train_pretrain
            parsed = script.parse_args(argv)
            script.main(parsed)
            listen(STOP)  # the script's own signal handlers end with its training
            if not finished(entry.folder, parsed.epochs):
                outcome = "stopped"
                return outcome
            if entry.kind == "finetune":  # the test patients, on the same device, without masks or pictures
                evaluate.main(evaluate.parse_args([
                    "--checkpoint", os.path.join(entry.folder, "best.pt"), "--data", s["data"],
                    "--split", "test", "--out", os.path.join(entry.folder, "test"),
                    "--min-size", str(parsed.min_size), "--device", parsed.device,  # in IEEE fp32, as the paper
                    "--outputs", "metrics", "--workers", "0", "--overwrite"]))
        timing = add_time(entry.folder, time.time() - t0)
        files.write_json(os.path.join(entry.folder, "result.json"),
                         {"kind": entry.kind, "strategy": entry.strategy, **timing})
        keep(entry, args.keep)
        outcome = "done"
        return outcome
    except (Exception, SystemExit) as e:  # a failed run is reported; the others go on
        with contextlib.suppress(OSError):  # a full disk may refuse this too: the line below still says it
            files.write_text(os.path.join(entry.folder, "failed.txt"), f"{type(e).__name__}: {e}\n"
                             + traceback.format_exc())
        if isinstance(e, OSError):  # a full disk, a lost mount: every next run would fail alike
            print(f"{tag} {label(entry)}: failed: {e}; its checkpoint.pt and log are kept; the study stops")
            STOPPING["requested"] = True
        return outcome
    finally:
        listen(STOP)
        if outcome != "done":  # a stopped or failed invocation's time counts too
            with contextlib.suppress(OSError):
                add_time(entry.folder, time.time() - t0)
        run_folder.unlock(entry.folder, completely=True)


STOPPING = {"requested": False}


def STOP(signum, frame):
    """SIGTERM / SIGUSR1 / SIGINT between runs (during a run, the training script's own handlers stop
    it after its step): the study stops before its next run; a second Ctrl-C ends it at once"""
    STOPPING["requested"] = True
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def listen(handler):
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# running the plan: in this process, a pool of processes, or one entry

def work(entries, s, args):
    """run what is not done, in plan order, until nothing is left that this process can do; runs
    other processes hold are waited for. -> (done, failed, stopped)"""
    done, failed, tried, started = 0, [], set(), time.time()
    listen(STOP)
    while True:
        waiting = False
        for i, entry in enumerate(entries):
            if STOPPING["requested"]:
                return done, failed, True
            now = state(entry)
            if now in ("done", "unavailable") or i in tried or failed_since(entry, started):
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

    def forward(signum, frame):  # a cluster's SIGTERM to this process reaches every worker; Ctrl-C
        for proc in procs:  # reaches them from the terminal too: forwarded as SIGTERM, it counts once
            proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)
    listen(forward)
    codes = [p.wait() for p in procs]
    # a failure (1) or a killed worker (< 0) wins over "try again later" (75) and success (0)
    return 1 if any(c not in (0, WAITING) for c in codes) else max(codes)


def run_index(entries, s, args):
    if not 0 <= args.index < len(entries):
        sys.exit(f"--index {args.index}: the plan has entries 0..{len(entries) - 1}")
    entry, tag = entries[args.index], f"[{args.index}/{len(entries)}]"
    now = state(entry)
    if now == "unavailable":
        sys.exit(f"error: {missing_weights(entry)}")
    outcome = now if now in ("done", "waiting", "running") else execute(entry, s, args, tag)
    print(f"{tag} {label(entry)}: {outcome}")
    return {"done": 0, "failed": 1}.get(outcome, WAITING)


# -----------------------------------------------------------------------------
# planning output: the list, the count, the time it will take

def estimate(entries, s, device):
    """the plan's steps (pretrainings from their cines, fine-tunings from the label fractions' epoch lengths)
    x a step timed here, and the evaluations as forward passes (a third of a training step per slice)"""
    given = train_segment.parse_args(["--data", s["data"], *s["train_args"]])
    arch, device = "resnet50" if given.arch == "auto" else given.arch, device or given.device
    seconds, name = bench.seconds_per_step("segment", arch, given.size, given.batch_size, given.amp, device)
    n, runs = count_slices(s["data"]), [e for e in entries if e.kind == "finetune"]
    steps = sum(given.epochs * (k * repeats // given.batch_size)
                for e in runs for k, repeats in [label_fraction_plan(n, e.fraction)])
    steps += len(runs) * count_slices(s["data"], "test") / given.batch_size / 3
    hours, pretrainings = steps * seconds / 3600, [e for e in entries if e.kind == "pretrain"]
    for p in (train_pretrain.parse_args(train_args(e, s, None)) for e in pretrainings):  # every frame of the cines
        step_s, _ = bench.seconds_per_step("pretrain", arch, p.size, p.batch_size, p.amp, device)
        hours += p.epochs * (count_slices(s["data"], p.split, cine=True) // p.batch_size) * step_s / 3600
    return (f"estimate on {name}: {len(pretrainings)} pretrainings, {len(runs)} fine-tunings and their evaluations, "
            f"{hours:.1f} h of steps, {1.2 * hours:.1f} h with the 20% allowed for start-up and validation")


# -----------------------------------------------------------------------------
# the script

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("command", choices=["plan", "run", "report"], help="what to do")
    p.add_argument("--study", required=True, help="the study folder")
    p.add_argument("--data", default=None, help="ACDC root (default: the one study.json records)")
    p.add_argument("--strategies", type=listed(strategy_type), default=None,
                   help="comma-separated --weights values or pretrain:INIT:EPOCHS "
                        "(default: the paper's seven)")
    p.add_argument("--fractions", type=listed(FRACTION), default=None,
                   help="label fractions (default: the paper's)")
    p.add_argument("--seeds", type=listed(COUNT), default=None, help="seeds (default: the paper's ten)")
    p.add_argument("--lengths", type=lengths_type, default=None,
                   help="pretraining epochs completed to fine-tune from, for each pretrain: strategy; paper: "
                        + ",".join(map(str, PAPER_LENGTHS)) + " (its labels ep=N plus one)")
    p.add_argument("--length-fractions", type=listed(FRACTION), default=None, help="their label fractions (1.0)")
    p.add_argument("--length-seeds", type=listed(COUNT), default=None, help="their seeds (the paper's: 13)")
    p.add_argument("--pretrain-args", type=pretrain_flags, default=None,
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
    if args.command != "report" and args.data is None and "data" not in recorded_settings(args.study):
        p.error(f"{training.NO_DATA} (--study {args.study} holds no study.json that records it)")
    # a pool's processes get these again, without --gpus
    args.study_argv = [a for i, a in enumerate(argv[:cut]) if not (a == "--gpus" or a.startswith("--gpus=")
                                                                   or i and argv[i - 1] == "--gpus")]
    args.train_args = argv[cut + 1:] or None  # None: the study's recorded ones
    return args


def main(args):
    if args.command == "report" and not os.path.exists(os.path.join(args.study, "study.json")):
        sys.exit(f"error: --study {args.study}: no study.json there: plan or run a study first")
    s = settings_of(args)
    train_segment.parse_args(["--data", s["data"], *s["train_args"]])  # bad flags fail here, not in run 1
    entries = plan(args.study, s)
    if problem := files.folder_problem(args.study):
        sys.exit(f"error: --study {args.study}: {problem}")
    os.makedirs(args.study, exist_ok=True)
    once = s["train_args"]  # --stop-after is this invocation's, never the study's
    kept = [a for i, a in enumerate(once) if not (a == "--stop-after" or i and once[i - 1] == "--stop-after")]
    if args.command != "report":  # (a report leaves the record as it is)
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
    timings = [results.read_json(os.path.join(e.folder, "timing.json")) for e in entries
               if os.path.exists(os.path.join(e.folder, "timing.json"))]
    wall, step = (sum(t[k] for t in timings) for k in ("wall_s", "step_s"))
    print(f"{done} runs done in {time.time() - t0:.0f} s; over every run so far, {wall:.0f} s of wall time, "
          f"{step:.0f} s of it in training epochs" + (f" (ratio {wall / step:.2f})" if step else ""))
    for entry in failed:
        path = os.path.join(entry.folder, "failed.txt")
        tail = open(path).read().strip().splitlines()[-3:] if os.path.exists(path) else ["(no failed.txt)"]
        print(f"failed: {label(entry)} ({path}, output.log):\n    " + "\n    ".join(tail))
    if stopped and not failed:
        print("stopped (a signal or --stop-after): run the same command again to continue")
    return 1 if failed else (WAITING if stopped else 0)


def report(entries, args):
    """the finished runs' tables and plots; a run with a damaged file is skipped with one line (-> 1)"""
    rows, missing, skipped = [], [], 0
    for e in entries:
        if e.kind == "finetune" and state(e) == "done":
            # a length run belongs to its pretraining's strategy
            strategy = e.strategy if e.pretrain_epochs is None else e.needs.strategy
            try:
                rows.append(results.run_row(e.folder, strategy, e.pretrain_epochs))
            except results.DamagedFile as damage:
                print(f"skipped {label(e)}: {damage}")
                skipped += 1
        elif e.kind == "finetune":
            missing.append(f"{label(e)}: {state(e)}")
    title = os.path.basename(os.path.abspath(args.study))
    try:
        for path in results.write_all(args.study, rows, missing, title, args.reference):
            print(f"wrote {path}")
    except OSError as e:  # e.g. a folder where results.csv goes
        sys.exit(f"error: the report cannot be written in {args.study}: {e}")
    print(f"{len(rows)} finished runs" + (f", {len(missing)} not finished (see results.md)" if missing else "")
          + (f", {skipped} skipped for a damaged file (named above)" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(training.run_main(main, parse_args()))
