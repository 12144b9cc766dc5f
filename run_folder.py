"""A training run's life, in order: lock, start, steps, a signal, the checkpoint, resume, finish.

A run folder (--out) holds config.json (every flag, the environment, derived numbers), log.jsonl
(a line per logging interval and one per epoch), curves.svg (the log drawn by pictures.draw_curves),
checkpoint.pt (everything needed to continue exactly) and the exported weights (best.pt of
fine-tuning, backbone.pth of pretraining). Both training scripts live a run in this order:

1. lock: one process owns a folder at a time. run.lock names its host and process and carries a
   heartbeat; a second run is refused; a stale lock (no heartbeat for STALE_S seconds on any host,
   or its process gone on this one; or a record that cannot be read) is taken over with a notice.
2. start (prepare_run): what would lose or mix runs is refused before anything is written: a
   folder holding another run without --resume auto or --overwrite, a --resume file that is not
   this kind of checkpoint, or one trained with other experiment flags (EXPERIMENT_FLAGS).
3. begin: --overwrite removes the old run's files only now, when the new run is about to write
   its own; a resumed run drops the log lines written after its checkpoint; config.json is written.
4. steps: the loop asks StopSignal.agreed() after every step. SIGTERM, SIGUSR1 (what clusters send
   before a time limit) or SIGINT (Ctrl-C) only set a flag: the run finishes its current step, and
   under DDP all ranks stop after the same one; a second Ctrl-C ends the process at once.
5. checkpoint (save_checkpoint): every --save-every epochs, at the end and when stopped, the
   unwrapped model, optimizer, grad scaler, counters and every random state (each rank's
   augmentation stream), written atomically. Its "epoch" is the next epoch to start, which is the
   epoch still in progress when a run stopped mid-epoch; "step" counts the steps done; "partial" holds
   that epoch's loss sum, steps, images and time so far, so that its log line covers the whole epoch.
6. resume: --resume auto loads that checkpoint into a run of the same shape; the loader's sampler
   skips the batches of the current epoch done before the stop (slices.SkipDoneSampler), so the
   resumed run takes the same batches and random draws as an uninterrupted one.
7. finish: a last line (the files written, or how to continue: the script exits 75) and the lock given back.
"""
import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

import acdc
import files
from checkpoints import read_checkpoint

RUN_FILES = ("checkpoint.pt", "config.json", "log.jsonl", "curves.svg", "best.pt", "backbone.pth")
LOCK = "run.lock"
HEARTBEAT_S = 30   # how often the owner rewrites its heartbeat
STALE_S = 600      # a lock without a heartbeat for this long is stale, on any host
exit_status = 0    # the training scripts': 75 (EX_TEMPFAIL) when their run stopped before its end (finish)


def unwrap(model):
    """the plain module under DDP (.module) and torch.compile (._orig_mod): checkpoints hold this one"""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def is_main_process():
    return int(os.environ.get("RANK", 0)) == 0


# -----------------------------------------------------------------------------
# 1. the lock: one process per run folder

_held = {}  # folder -> [times taken, stop event, heartbeat thread] of the locks this process holds


def _owner_record(started):
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "heartbeat": time.time()}


def read_owner(path):
    """the lock file's record; None when there is no lock file, {} when it cannot be read"""
    for _ in range(20):  # a new lock's owner may not have written its record yet: read again shortly
        try:
            with open(path) as f:
                owner = json.load(f)
            return owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def stale_reason(owner):
    """why a lock's owner no longer holds it, or None while it does: no heartbeat for STALE_S on any host
    (a process suspended that long loses its folder; a pid may be another process's by now), or its
    process gone on this host. A record without an integer pid, a numeric heartbeat and a host is unreadable."""
    pid, beat, host = (owner.get(k) for k in ("pid", "heartbeat", "host"))
    if type(pid) is not int or type(beat) not in (int, float) or not isinstance(host, str):
        return "unreadable lock file"
    age = time.time() - beat
    if not abs(age) <= STALE_S:  # (a heartbeat in the future, infinite or nan is no heartbeat either)
        return f"no heartbeat for {age:.0f} s"
    return f"process {pid} is gone" if host == socket.gethostname() and files.process_gone(pid) else None


def take_over(path, owner):
    """remove the stale lock `owner` left, unless another process has replaced it meanwhile. A second
    lock file, taken with O_EXCL, makes this one process at a time: between reading a stale record and
    removing it, another process could otherwise take over too and lose its fresh lock to this one."""
    mutex = path + ".takeover"
    try:
        os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:  # another process is taking over; one killed while doing so left it
        with contextlib.suppress(FileNotFoundError):
            if time.time() - os.path.getmtime(mutex) > 60:
                os.remove(mutex)
        time.sleep(0.1)
        return
    try:
        if read_owner(path) == owner:  # still the stale record: nobody else took over
            os.remove(path)
    finally:
        os.remove(mutex)


def lock(folder):
    """make this process the owner of `folder`, or exit with a message naming the owner"""
    if busy := try_lock(folder):
        sys.exit(busy)


def try_lock(folder):
    """make this process the owner of `folder` -> None, or the message naming the live process that
    holds it. Taking a lock this process holds counts once more (the study runner holds it around a
    run's training and evaluation; training takes it too), and each unlock() gives one back."""
    folder = os.path.abspath(folder)
    if folder in _held:
        _held[folder][0] += 1
        return None
    path = os.path.join(folder, LOCK)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    while True:
        try:  # O_EXCL: of two processes creating the file at once, exactly one succeeds
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_owner(path)
            if owner is None:  # released meanwhile: try again
                continue
            if owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid():
                break  # left by this very process (an earlier call that ended in an exception)
            reason = stale_reason(owner)
            if reason is None:
                age = time.time() - float(owner["heartbeat"])
                return (f"--out {folder} is in use by another run: host {owner['host']}, "
                        f"process {owner['pid']}, started {owner.get('started')}, last heartbeat {age:.0f} s ago "
                        f"({path}); wait for it to finish or choose another --out")
            print(f"notice: taking over the stale lock of {folder} ({reason}; it was held by "
                  f"{owner.get('host')} process {owner.get('pid')})")
            take_over(path, owner)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_owner_record(started), f)
        break
    stop = threading.Event()

    def beat():  # the heartbeat: rewritten atomically, so the file always exists while held
        while not stop.wait(HEARTBEAT_S):
            try:
                files.write_json(path, _owner_record(started))
            except OSError:  # a full disk or a hiccup of a network filesystem: the next beat tries again
                pass
    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat {folder}")
    thread.start()
    _held[folder] = [1, stop, thread]
    return None


def unlock(folder, completely=False):
    """give back one taking of the lock on `folder` (all of them with completely=True); the lock
    file goes when none is left. A no-op when this process does not hold it."""
    folder = os.path.abspath(folder)
    if folder not in _held:
        return
    _held[folder][0] -= 1
    if _held[folder][0] > 0 and not completely:
        return
    _, stop, thread = _held.pop(folder)
    stop.set()
    thread.join()
    path = os.path.join(folder, LOCK)
    owner = read_owner(path)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        os.remove(path)


@atexit.register
def unlock_all():
    for folder in list(_held):
        unlock(folder, completely=True)


# -----------------------------------------------------------------------------
# 2. start: the decisions every rank takes alike before the process group exists

def prepare_run(args, kind, experiment):
    """-> the checkpoint dict to resume from, or None. Takes the folder's lock (rank 0), removes
    temporary files that a killed save left, and refuses what would lose or mix runs: a folder
    holding another run without --resume or --overwrite, a --resume file that is not this kind of
    checkpoint, or one trained with other experiment flags. Nothing is deleted here: --overwrite
    clears the old run in begin(), when the new run is about to write its own files."""
    out = args.out
    if is_main_process():
        lock(out)
        for name in os.listdir(out):  # .tmpPID.name: what a save killed mid-way left behind
            if name.startswith(".tmp") and not name.endswith(LOCK):  # (not this run's heartbeat)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
    mine = os.path.join(out, "checkpoint.pt")
    path = (mine if os.path.exists(mine) else None) if args.resume == "auto" else args.resume
    taken = [f for f in sorted(os.listdir(out)) if f in RUN_FILES or f.startswith("backbone_ep")]
    if path is None:
        # --resume auto without a checkpoint restarts a run killed before its first one; never a
        # finished run whose checkpoint.pt was removed (the study runner keeps only the weights)
        weights = [f for f in ("best.pt", "backbone.pth") if f in taken]
        if args.resume == "auto" and weights and not args.overwrite:
            sys.exit(f"--out {out} holds a finished run ({', '.join(taken)}) without its checkpoint.pt: "
                     f"nothing to resume; pass --overwrite to start afresh, or choose another --out")
        if taken and args.resume != "auto" and not args.overwrite:
            sys.exit(f"--out {out} holds another run ({', '.join(taken)}): pass --resume auto to continue "
                     f"it, --overwrite to start afresh, or choose another --out")
        if taken and args.resume == "auto" and is_main_process():
            print(f"notice: --resume auto found no checkpoint.pt in {out} (a run stopped before its first): "
                  f"starting afresh, replacing {', '.join(taken)}")
        return None
    if not os.path.exists(path):
        sys.exit(f"--resume {path}: file not found")
    continues = os.path.exists(mine) and os.path.samefile(path, mine)  # this folder's own run
    if not continues and taken and not args.overwrite:
        sys.exit(f"--out {out} holds another run ({', '.join(taken)}): continuing --resume {path} there "
                 f"would mix the two; choose another --out (or --overwrite)")
    ckpt = read_checkpoint(path, trust=args.trust_checkpoint)
    if ckpt.get("kind") == "segmentation" and "optimizer" not in ckpt:
        sys.exit(f"--resume {path}: this is the best U-Net of a fine-tuning run (weights only, no optimizer "
                 f"state); --resume needs the run's checkpoint.pt (or 'auto'); to start from these weights "
                 f"use --weights {path}")
    if ckpt.get("kind") != kind or "optimizer" not in ckpt:
        what = (f"this project's {ckpt['kind']} checkpoint" if ckpt.get("kind")
                else "not this project's checkpoint")
        sys.exit(f"--resume {path}: {what}; "
                 f"--resume needs the RUN/checkpoint.pt of a {kind} run of this project")
    refuse_changed_flags(path, ckpt["config"].get("experiment") or {}, experiment)
    ckpt["continues"] = continues  # (in memory only) whether the run goes on in its own folder
    return ckpt


# flags that change what is trained; the others (workers, logging, cache, device, amp, compile,
# devices at the same global batch) change only how it runs and may differ after a resume
EXPERIMENT_FLAGS = ("split", "label_fraction", "loss", "weights", "init", "arch", "size", "lr", "start_lr",
                    "weight_decay", "warmup_epochs", "epochs", "tau_base", "seed", "crop_scale", "clip",
                    "freeze_encoder_epochs", "norm", "paper_inputs", "val_every")


def experiment_of(args):
    """what a run trains, for comparing a resumed run with the one in its checkpoint; files by name
    (cluster jobs copy weights and data to local scratch), the data by its cases and file sizes"""
    values = {k: getattr(args, k) for k in EXPERIMENT_FLAGS if hasattr(args, k)}
    for k in ("weights", "init"):
        if k in values and values[k] not in (None, "none"):
            values[k] = os.path.basename(str(values[k]))
    if "crop_scale" in values:
        values["crop_scale"] = [float(v) for v in values["crop_scale"]]
    return {**values, "data": acdc.fingerprint(args.data)}


def refuse_changed_flags(path, old, new):
    changed = [k for k in new if k in old and old[k] != new[k]]
    if changed:
        flags = "; ".join("--data (other cases or file sizes)" if k == "data" else
                          f"--{k.replace('_', '-')} was {old[k]}, now {new[k]}" for k in changed)
        sys.exit(f"--resume {path}: the run was trained with other settings: {flags}. "
                 f"These change what is trained: resume with the run's own flags (its config.json), "
                 f"or start a new run in another --out")


# -----------------------------------------------------------------------------
# 3. begin: the run writes its own files

def begin(out, config, resumed):
    """the run is about to write its own files (rank 0): --overwrite removes the old run's files now;
    a run resumed in its own folder drops the log lines written after its checkpoint; config.json is
    written"""
    if resumed is None or not resumed["continues"]:
        for name in os.listdir(out):
            if name in RUN_FILES or name.startswith("backbone_ep"):
                os.remove(os.path.join(out, name))
    else:
        truncate_log(os.path.join(out, "log.jsonl"), resumed["step"], resumed["epoch"])
    files.write_json(os.path.join(out, "config.json"), config)


def truncate_log(path, step, epoch):
    """keep the log lines up to the checkpoint's step and epoch: what came after is redone after a
    resume. Epoch lines (they have "steps") count by epoch, the others by step."""
    if not os.path.exists(path):
        return
    kept = "".join(json.dumps(r) + "\n" for r in files.read_jsonl(path)  # without a torn last line
                   if (r["epoch"] < epoch if "steps" in r else r.get("step", 0) <= step))
    files.write_text(path, kept)


# -----------------------------------------------------------------------------
# 4. steps: a signal asks the run to stop after the current step

class StopSignal:
    """SIGTERM / SIGUSR1 (what clusters send before killing a job) or SIGINT (Ctrl-C) ask the run to finish
    its step, write checkpoint.pt and exit; --resume auto picks it up. A second Ctrl-C ends it at once."""

    def __init__(self, control=None):
        self.requested, self.control = False, control  # control: distributed.Env.control
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        if signum == signal.SIGINT:  # the next Ctrl-C gets the system's default: the process ends there
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def agreed(self):
        """whether to stop after this step. Under DDP every rank must stop after the same step (or the
        others would wait in the next all-reduce): the flag is all-reduced each step over gloo, on the
        host, so no rank waits for its GPU; a rank's signal stops all of them after the current step"""
        if self.control is None or not dist.is_initialized():
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())


# -----------------------------------------------------------------------------
# 5. the checkpoint, 6. resume, 7. finish

def save_checkpoint(path, kind, model, optimizer, scaler, rng, epoch, step, **extra):
    """everything needed to continue exactly: unwrapped model, optimizer, scaler, counters, RNG states
    (training.rng_state, which every rank calls: it gathers them); rank 0 writes"""
    if is_main_process():
        files.save_atomic({"kind": kind, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "rng": rng, **extra}, path)


def resume(ckpt, model, optimizer, scaler, config):
    """load a checkpoint written by save_checkpoint into a run of the same shape -> (epoch, step, partial);
    the caller restores the random states (training.set_rng_state(ckpt["rng"], ...))"""
    old = ckpt["config"]
    # the batches an epoch holds must be the same, or the schedule and the epoch count would shift
    for key in ("steps_per_epoch", "global_batch"):
        if old[key] != config[key]:
            sys.exit(f"--resume: {key} was {old[key]}, now {config[key]}; resume with the same global batch "
                     f"(--batch-size x processes) and data")
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and scaler.is_enabled():  # empty when the run was not fp16
        scaler.load_state_dict(ckpt["scaler"])
    if old["world_size"] != config["world_size"] and is_main_process():
        print(f"notice: resuming on {config['world_size']} processes instead of {old['world_size']}: the "
              f"same global batch, but data order and augmentation draws differ from an uninterrupted run")
    return ckpt["epoch"], ckpt["step"], ckpt.get("partial")  # (older checkpoints have no "partial")


def finish(out, stopped, step, names, summary):
    """the run's end on every rank: its exit status; on rank 0 its last line, naming only the files it
    wrote (or how to continue a stopped run), and its lock given back"""
    global exit_status
    exit_status = 75 if stopped else 0
    if stopped and is_main_process():
        print(f"stopped at step {step}: {out}/checkpoint.pt written; to continue, run again with --resume auto")
    elif is_main_process():
        written = [name for name in names if os.path.exists(os.path.join(out, name))]
        print(f"done: {summary}; in {out}: {', '.join(written)}")
    unlock(out)  # (held by rank 0 only)
