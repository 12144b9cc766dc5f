"""The plumbing both training scripts share: common flags, the start, schedule, epoch statistics, faults.

In detail: the command-line flags they have in common, the checked start, the warmup-cosine
schedule, the random states a resume restores, and the health checks that stop a run on a
non-finite loss. A run's life (lock, signals, checkpoints, resume) is run_folder.py's; the input
normalisation is normalisation.py's; autocast and TF32 are precision.py's; DDP is distributed.py's.

Plain functions, not a framework: train_pretrain.py and train_segment.py call them in the
order they read (arguments -> distributed and AMP -> data -> model -> optimizer -> resume ->
loop -> save -> tear-down). Nothing here is run on its own.
"""
import argparse
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist

import acdc
import checkpoints
import distributed
import files
import normalisation
import precision
import run_folder
from checkpoints import CheckpointError


# -----------------------------------------------------------------------------
# command line

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the script's docstring as written and the default of every flag that has one"""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def number(kind, low=None, high=None, above=None, multiple=None):
    """an argparse type: an int or a finite float in a range (>= low, <= high, > above, a multiple of
    `multiple`); a value outside it is refused at parse time with the range in the message"""
    name = "an integer" if kind is int else "a number"
    bounds = [f"{sign} {v:g}" for sign, v in ((">=", low), (">", above), ("<=", high)) if v is not None]
    expected = name + (" " + " and ".join(bounds) if bounds else "")
    expected += f", a multiple of {multiple}" if multiple else ""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
        if (not math.isfinite(value) or (low is not None and value < low)
                or (high is not None and value > high) or (above is not None and value <= above)
                or (multiple and value % multiple)):
            raise argparse.ArgumentTypeError(f"{text}: expected {expected}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def add_device_args(p, amp="auto", tf32="auto"):
    """--device, --amp, --tf32, --compile, --trust-checkpoint: how any script runs a model (its own defaults)"""
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)")
    p.add_argument("--amp", default=amp, choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 on a GPU that supports it, "
                        "fp16 on other GPUs, off on CPU")
    p.add_argument("--tf32", default=tf32, choices=["auto", "on", "off"],
                   help="under --amp off, TF32 in fp32 convolutions and matmuls on GPUs (auto: PyTorch's "
                        "default, convolutions only); ignored under bf16/fp16, where the stem stays IEEE fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of checkpoints that hold more than tensors "
                        "(runs code from the file)")


def add_common_args(parser, *, out, epochs, batch_size, size=224, size_multiple=None):
    """the flags both training scripts share, with the same names"""
    p = parser
    p.add_argument("--data", help="ACDC root (training/, testing/ or a folder holding them); required")
    p.add_argument("--out", default=out, help="run folder for config.json, log.jsonl and checkpoints")
    p.add_argument("--epochs", type=number(int, 1), default=epochs, help="epochs to train")
    p.add_argument("--batch-size", type=number(int, 1), default=batch_size, help="slices per device per step")
    p.add_argument("--arch", default="auto", choices=["auto", "resnet18", "resnet34", "resnet50"],
                   help="encoder; auto: the one in the starting weights (--weights, --init), else resnet50 "
                        "(the paper's); 18/34 for quick runs")
    p.add_argument("--size", type=number(int, 32, multiple=size_multiple), default=size,
                   help="side of the random resized crops (the paper: 224)")
    add_device_args(p)
    p.add_argument("--workers", type=number(int, -1), default=-1,
                   help="data loader workers per process; -1: CPU cores / processes on this node, at most 8")
    p.add_argument("--seed", type=number(int, 0), default=0,
                   help="seed for initialisation, data order, augmentation")
    p.add_argument("--resume", default=None,
                   help="RUN/checkpoint.pt to continue from, or 'auto' (the --out run's, if any)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that holds another run")
    p.add_argument("--save-every", type=number(int, 1), default=1,
                   help="write checkpoint.pt every N epochs (and at the end)")
    p.add_argument("--log-every", type=number(int, 1), default=20,
                   help="steps between progress updates and log.jsonl lines")
    p.add_argument("--stop-after", type=number(int, 0), default=0,
                   help="stop after N steps in this invocation, writing checkpoint.pt "
                        "(for time-limited jobs); 0: never")
    p.add_argument("--cache", default=None, help="folder for decoded slices (default: acdc.py's)")
    normalisation.add_training_flag(p)
    p.add_argument("--dist-timeout", type=number(int, 1), default=1800,
                   help="under torchrun: seconds any rank waits for the others, in the process group's "
                        "set-up and in every collective (other ranks wait while rank 0 fills the slice cache)")
    return p


# no default data: a forgotten --data must not start the paper's full recipe on the phantom for hours
NO_DATA = ("the following argument is required: --data ROOT, an ACDC root (training/, testing/ or a folder "
           "holding them); for a first try, make a phantom with `python phantom.py data/acdc-synth` "
           "and pass --data data/acdc-synth")


def arch_of_weights(args):
    """--arch auto: the ResNet that the starting weights hold (resnet50 without any)"""
    flag, source = ("--weights", args.weights) if hasattr(args, "weights") else ("--init", args.init)
    if source == "none":
        return "resnet50"
    arch = checkpoints.arch_of(source, trust=args.trust_checkpoint, flag=flag)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"--arch auto: {arch}, the encoder of {flag} {source}")
    return arch


def start(args, kind):
    """the set-up both scripts open with -> (env, checkpoint dict to resume or None, what the run
    trains (for config.json), autocast, scaler, amp). Everything a run needs is checked here, before
    any process group and before anything is written: the output folders, the data, the resume file."""
    for flag, folder in (("--out", args.out), ("--cache", args.cache)):
        if folder and (problem := files.folder_problem(folder)):
            sys.exit(f"{flag} {folder}: {problem}")
    try:
        acdc.find_cases(args.data)
    except acdc.DatasetError as e:
        sys.exit(f"--data: {e}")
    if args.arch == "auto":
        args.arch = arch_of_weights(args)
    experiment = run_folder.experiment_of(args)
    files.makedirs(args.out)
    try:
        resume = run_folder.prepare_run(args, kind, experiment)
        if args.cache:
            try:
                files.makedirs(args.cache)
            except OSError as e:
                sys.exit(f"--cache {args.cache}: cannot be created: {e.strerror}")
    except BaseException:  # a refused start leaves no empty folder of its own behind
        run_folder.unlock(args.out, completely=True)
        files.remove_empty_made()
        raise
    env = distributed.setup(args.device, args.dist_timeout)
    torch.manual_seed(args.seed)
    return (env, resume, experiment, *precision.autocast(env.device, args.amp, args.tf32))


def run_main(main, args):
    """call main(args), always give up the run folder's lock and tear the process group down; bad input,
    a failed write (OSError) and Ctrl-C end in one line, another exception with its traceback; the status
    is then non-zero, and torchrun stops every other rank"""
    try:
        return main(args)
    except (CheckpointError, acdc.DatasetError) as e:  # bad input: its message names the file, no traceback
        sys.exit(f"error: {e}")
    except OSError as e:  # a full disk, a lost mount: the file (files.write_atomic names it) and the reason
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: the file being written is removed on the way (files.write_atomic)
        print("stopped: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    finally:
        run_folder.unlock_all()
        files.remove_empty_made()  # the folders this invocation created and a failure left empty
        distributed.teardown()


class Run:
    """what a training loop carries: arguments, environment, schedule numbers, step counters"""
    partial = None  # the epoch in progress so far (epoch_stats), kept in checkpoint.pt for a resume

    def __init__(self, **kw):
        self.__dict__.update(kw)


# -----------------------------------------------------------------------------
# schedules: pure functions of the step

def warmup_cosine(step, total_steps, warmup_steps, base_lr, start_lr=0.0, final_lr=0.0):
    """linear warmup from start_lr to base_lr, then cosine decay to final_lr at total_steps"""
    if step < warmup_steps:
        return start_lr + (base_lr - start_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# -----------------------------------------------------------------------------
# data: raw slices only; augmentation happens on the device (the loader is slices.py's)

def steps_per_epoch(dataset, batch_size, world_size):
    steps = (len(dataset) // world_size) // batch_size
    if steps == 0:
        sys.exit(f"--batch-size {batch_size} x {world_size} processes is larger than the dataset "
                 f"({len(dataset)} slices): lower --batch-size")
    return steps


def epoch_start(run, epoch):
    """-> the epoch's loss sum, steps, images and start time so far: none yet, or, in the epoch a mid-epoch
    resume continues, what it did before the stop, so that its line covers the whole epoch"""
    nothing = {"loss_sum": 0.0, "steps": 0, "seen": 0, "time_s": 0.0}
    done = run.partial if run.partial and run.partial["epoch"] == epoch else nothing
    return (torch.tensor(done["loss_sum"], device=run.env.device), done["steps"], done["seen"],
            time.perf_counter() - done["time_s"])


def epoch_stats(run, epoch, loss_sum, steps, seen, t0):
    """the epoch's mean loss over ranks and its speed, for the per-epoch line of log.jsonl; run.partial
    keeps the sums, for a checkpoint written when the epoch stops mid-way"""
    world = dist.get_world_size() if dist.is_initialized() else 1
    seconds = time.perf_counter() - t0
    total = distributed.all_reduce(loss_sum) / world  # the mean of the ranks' sums: every rank resumes from it
    run.partial = {"epoch": epoch, "loss_sum": total.item(), "steps": steps, "seen": seen, "time_s": seconds}
    return {"epoch": epoch, "loss": (total / max(1, steps)).item(), "steps": steps,
            "images_per_s": seen / seconds, "time_s": seconds}


def to_device(batch, device):
    """pinned host tensors -> device without blocking the host"""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_config(args, env, **derived):
    """every argument plus the environment and derived numbers, for config.json and the start-up print"""
    return {"args": vars(args), "torch": str(torch.__version__), "device": str(env.device),
            "device_name": device_name(env.device),
            "world_size": env.world_size, "argv": sys.argv, **derived,
            "precision": precision.name(env.device, derived["amp"]), "tf32": precision.tf32_state()}


# -----------------------------------------------------------------------------
# random states, for exact resume (run_folder.py saves and loads them)

def rng_state(generator):
    """every random state a step depends on, as tensors and plain values (weights_only loads it);
    the augmentation streams of all ranks (each rank has its own), so every rank resumes its own"""
    streams = [generator.get_state()]
    if dist.is_initialized():
        streams = [None] * dist.get_world_size()
        dist.all_gather_object(streams, generator.get_state())  # a collective: every rank calls rng_state
    state = {"python": list(random.getstate()[1]), "torch": torch.get_rng_state(), "augment": streams}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator, rank):
    random.setstate((3, tuple(state["python"]), None))
    torch.set_rng_state(state["torch"])
    if rank < len(state["augment"]):  # a rank the old run did not have keeps its fresh seed
        generator.set_state(state["augment"][rank])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# faults

class Health:
    """finds a non-finite loss and a collapsing fp16 loss scale without a host sync per step: flags
    accumulate on the device and are read (and agreed on across ranks) at logging intervals only"""

    MIN_SCALE = 1.0  # each skipped fp16 step halves the scale: below 1 means many skips in a row

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def watch(self, loss, step):
        bad = ~torch.isfinite(loss.detach())
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step),
                                     self.first_bad)

    def check(self, loss, scaler, epoch):
        """at a logging interval, on every rank: raises FloatingPointError on a fault (on all ranks
        alike); -> this step's loss averaged over ranks"""
        first_bad = distributed.all_reduce(self.first_bad.clone(), dist.ReduceOp.MAX)
        loss = (distributed.all_reduce(loss.detach().float().clone())
                / (dist.get_world_size() if dist.is_initialized() else 1))
        if first_bad >= 0:
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {int(first_bad)}: stopping; "
                                     f"the last good checkpoint.pt is kept")
        if scaler.is_enabled() and scaler.get_scale() < self.MIN_SCALE:
            raise FloatingPointError(f"fp16 loss scale collapsed to {scaler.get_scale():.3g} at epoch "
                                     f"{epoch + 1}: the grad scaler skipped many steps in a row; try --amp bf16 "
                                     f"or a lower learning rate")
        return loss.item()
