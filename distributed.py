"""DDP for the training scripts: torchrun's environment, the process group, the collectives, the wrapped model.

torchrun only: RANK in the environment decides, otherwise a single process, so the same script runs on
a laptop and on several nodes. Only rank 0 prints and writes files (Env.main):

    env = setup(args.device, args.dist_timeout); net, model = wrap(UNet(...), env, compile=False); teardown()
"""
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    main: bool  # rank 0: the only process that prints and writes files
    control: object = None  # under DDP, a gloo group for host-side agreement (the stop flag), beside NCCL


DDP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def ddp_environment():
    """-> (rank, world size, local rank) from torchrun's variables, or None without RANK; exits at
    once, naming what is wrong, when RANK is set without the rest (a notebook or a Slurm script that
    exported it): the process group would otherwise wait without a word"""
    if "RANK" not in os.environ:
        return None
    missing = [k for k in DDP_ENV if k not in os.environ]
    if missing:
        sys.exit(f"RANK is set ({os.environ['RANK']}) but {', '.join(missing)} "
                 f"{'is' if len(missing) == 1 else 'are'} not: start with torchrun, "
                 f"or unset RANK to run a single process")
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        values = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        sys.exit(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {values}")
    if not 0 <= rank < world:
        sys.exit(f"RANK {rank} is not below WORLD_SIZE {world}: start with torchrun")
    return rank, world, local


def setup(device="auto", dist_timeout=600):
    control = None
    ddp = ddp_environment()
    rank, world, local = ddp or (0, 1, 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible to this process")
        device = f"cuda:{local}" if ddp or device == "cuda" else device
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest kernels once
    if ddp:
        # nccl between GPUs, gloo on CPU (nccl has no CPU path)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=dist_timeout))
        except Exception as e:  # the store's timeout, a refused connection, ...
            sys.exit(f"process group set-up failed after waiting up to --dist-timeout {dist_timeout} s for "
                     f"{world} ranks at {address} (this is rank {rank}): {' '.join(str(e).split())[:200]}")
        control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return Env(rank, world, local, torch.device(device), rank == 0, control)


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t, op=None):
    """sum (or op) over ranks in place; a no-op in a single process"""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


@contextlib.contextmanager
def main_first(env):
    """rank 0 runs the block first (e.g. decoding volumes into the slice cache), the others after it,
    so that every rank does not decode the same files at once"""
    if not env.main and dist.is_initialized():
        dist.barrier()
    yield
    if env.main and dist.is_initialized():
        dist.barrier()


def wrap(net, env, compile):
    """the plain module -> what the loop calls: SyncBatchNorm across GPUs, channels_last (faster
    convolutions on GPUs and on CPUs), DDP, then torch.compile (compiling the DDP module lets
    gradient communication overlap the backward pass). -> (plain module, wrapped model)"""
    if env.world_size > 1 and env.device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # no CPU kernel: gloo runs keep per-rank BN
    net = net.to(env.device, memory_format=torch.channels_last)
    model = net
    if env.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return net, (torch.compile(model) if compile else model)
