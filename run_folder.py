"""A training run's folder: its files, its checkpoints, exact resume.

A run folder (--out) holds config.json (every flag, the environment, derived numbers), log.jsonl
(a line per logging interval and one per epoch), checkpoint.pt (everything needed to continue
exactly) and the exported weights (best.pt of fine-tuning, backbone.pth of pretraining).
A folder that holds another run is never overwritten silently.
"""
import json
import os
import random
import sys

import torch
import torch.distributed as dist

import files
from checkpoints import read_checkpoint


def unwrap(model):
    """the plain module under DDP (.module) and torch.compile (._orig_mod): checkpoints hold this one"""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)



def prepare_run(out, resume, overwrite):
    """-> the checkpoint to resume from, or None. A folder that holds another run is never
    overwritten silently. Every rank calls this before the process group exists (rank 0 writes
    nothing until all ranks have joined it), so all of them take the same decision."""
    os.makedirs(out, exist_ok=True)
    mine = os.path.join(out, "checkpoint.pt")
    if resume == "auto":
        return mine if os.path.exists(mine) else None
    if resume:
        if not os.path.exists(resume):
            sys.exit(f"--resume {resume}: file not found")
        return resume
    taken = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if taken and not overwrite:
        sys.exit(f"--out {out} holds another run ({', '.join(taken)}): pass --resume auto to continue it, "
                 f"--overwrite to start afresh, or choose another --out")
    if int(os.environ.get("RANK", 0)) == 0:  # --overwrite: nothing of the old run may be resumed or kept as best
        for f in taken + [f for f in os.listdir(out) if f.startswith("backbone_ep")]:
            os.remove(os.path.join(out, f))
    return None


RUN_FILES = ("checkpoint.pt", "config.json", "log.jsonl", "best.pt", "backbone.pth")


def save_atomic(obj, path):
    files.write_atomic(path, lambda tmp: torch.save(obj, tmp))


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
    generator.set_state(state["augment"][rank])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, kind, model, optimizer, scaler, generator, epoch, step, **extra):
    """everything needed to continue exactly: unwrapped model, optimizer, scaler, counters, RNG states.
    Every rank calls it (the RNG states are gathered); rank 0 writes."""
    rng = rng_state(generator)
    if int(os.environ.get("RANK", 0)) == 0:
        save_atomic({"kind": kind, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "rng": rng, **extra}, path)


def resume(path, kind, model, optimizer, scaler, generator, config, trust=False):
    """load a checkpoint written by save_checkpoint into a run of the same shape; -> (epoch, step)"""
    ckpt = read_checkpoint(path, trust=trust)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        sys.exit(f"--resume {path}: not a {kind} checkpoint of this project")
    # the batches an epoch holds and their order must be the same, or the run would not continue exactly
    for key in ("world_size", "steps_per_epoch", "global_batch"):
        if ckpt["config"][key] != config[key]:
            sys.exit(f"--resume {path}: {key} was {ckpt['config'][key]}, now {config[key]}; resume with "
                     f"the same processes, --batch-size and data")
    if ckpt["config"]["args"]["seed"] != config["args"]["seed"]:
        sys.exit(f"--resume {path}: --seed was {ckpt['config']['args']['seed']}, now {config['args']['seed']}")
    unwrap(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and scaler.is_enabled():  # empty when the run was not fp16
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"], generator, dist.get_rank() if dist.is_initialized() else 0)
    return ckpt["epoch"], ckpt["step"]
