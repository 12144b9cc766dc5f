"""BYOL pretraining of a ResNet on ACDC's cine slices (the paper's self-supervised step).

    python train_pretrain.py --data data/acdc-synth --out runs/byol            # one device
    torchrun --nproc_per_node=4 train_pretrain.py --data DIR --out runs/byol   # DDP
    # hierarchical: ImageNet, then ACDC
    python train_pretrain.py --init resnet50_imagenet.pth ...

Writes RUN/config.json, RUN/log.jsonl, RUN/checkpoint.pt (resumable: --resume auto) and
RUN/backbone.pth, the target backbone in the form of the paper's byol_acdc_backbone_last.pth,
which train_segment.py --weights reads.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import acdc
import distributed
import files
import normalisation
import pictures
import run_folder
import slices
import training
from augment import augment
from byol import BYOL, LARS, lars_param_groups, tau_at
from checkpoints import load_backbone
from progress import Estimate
from resnet import ARCHS

# what the network sees, in words, for config.json and checkpoint.pt (backbone.pth, in the paper's plain
# form, cannot say it)
PAPER_INPUTS = ("the paper's: raw intensities modulo 256 (its uint16 -> uint8), the ED and ES frame files "
                "as well as the cine, PIL's bicubic crops and uint8 jitter, "
                "((x mod 256) / 255 - 67.27) / 84.66")
RAW_INPUTS = "raw intensities, (x - mean) / std"


def epoch_list(text):
    """'0,5,10' -> [0, 5, 10] (argparse type of --save-backbone-epochs)"""
    try:
        epochs = [int(e) for e in text.split(",") if e.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated epochs, e.g. 0,5,10") from None
    if any(e < 0 for e in epochs):
        raise argparse.ArgumentTypeError(f"{text!r}: epochs must be >= 0")
    return epochs


def parse_args(argv=None):
    number = training.number
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    # the paper's settings (solo-learn's BYOL on ACDC): 400 epochs from scratch, batch 128 per device
    training.add_common_args(p, out="runs/pretrain", epochs=400, batch_size=128)
    p.add_argument("--init", default="none",
                   help="'none' (the paper's BYOL ACDC) or a backbone checkpoint to start from, "
                        "e.g. ImageNet weights "
                        "(the paper's hierarchical strategies then trained 25 epochs on ACDC)")
    p.add_argument("--lr", type=number(float, above=0), default=0.5,
                   help="LARS base learning rate, scaled by global batch / 256 (paper: 0.5)")
    p.add_argument("--weight-decay", type=number(float, 0), default=1e-5,
                   help="LARS weight decay (paper: 1e-5)")
    p.add_argument("--warmup-epochs", type=number(int, 0), default=10,
                   help="linear warmup epochs (paper: 10)")
    p.add_argument("--tau-base", type=number(float, 0, 1), default=0.99,
                   help="starting target momentum (paper: 0.99, to 1.0)")
    p.add_argument("--split", default="train", choices=["train", "train+val", "all"],
                   help="whose cine frames to pretrain on (the paper: the train patients only)")
    p.add_argument("--save-backbone-epochs", type=epoch_list, default="",
                   help="comma-separated epochs after which to keep a copy backbone_epNNN.pth "
                        "(e.g. 0,5,10,25; 0: the initial weights)")
    p.add_argument("--collapse-threshold", type=number(float, 0), default=0.01,
                   help="warn when the std of the normalised projections falls below this "
                        "(healthy: ~1/sqrt(256)=0.0625)")
    p.add_argument("--paper-inputs", action="store_true",
                   help="the paper's input pipeline: intensities as its uint16 -> uint8 conversion left them "
                        "(modulo 256: 300 -> 44), the ED and ES frame files next to the cine (those slices "
                        "twice), PIL's bicubic crops and uint8 jitter, ((x mod 256) / 255 - 67.27) / 84.66")
    args = p.parse_args(argv)
    if args.data is None:
        p.error(training.NO_DATA)
    if args.norm == "paper":  # the same numbers, but on raw intensities, not on the uint8 images --paper-inputs makes
        p.error("--norm paper is the paper's fine-tuning scale; for its pretraining inputs use --paper-inputs")
    if args.paper_inputs and args.norm != "published":
        p.error("--paper-inputs normalises as the paper did; it takes no --norm")
    return args


def make_views(batch, generator, run):
    """two views of each slice, augmented on the device:
    (B, 1, H, W) raw -> 2 x (B, 1, size, size) normalised"""
    with torch.no_grad():
        views = [augment(batch["image"], batch["size"], generator, run.mean, run.std, out_size=run.args.size,
                         paper_uint8=run.args.paper_inputs) for _ in range(2)]
    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def train_step(model, byol, views, optimizer, scaler, autocast, tau):
    """forward and loss under autocast -> scaled backward -> step -> target update; -> (loss, z1)"""
    with autocast():
        loss, z1 = model(*views)
    scaler.scale(loss).backward()
    # no clipping: the paper's LARS had none. (In fp16 the scaler reads its inf check on the host
    # each step for any optimizer without a fused kernel, LARS included; bf16 needs no scaler.)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    byol.update_target(tau)  # after the optimizer step, as in the paper
    return loss, z1


def train_one_epoch(model, byol, loader, optimizer, scaler, autocast, generator, health, run, epoch):
    """one pass over the loader; returns the epoch's mean loss and speed (all ranks)"""
    args, env = run.args, run.env
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not env.main, dynamic_ncols=True,
               leave=False)
    loss_sum, before, seen, t0 = training.epoch_start(run, epoch)  # (before: steps done before a resume)
    steps = 0  # this invocation's
    for batch in bar:
        lr = training.warmup_cosine(run.step, run.total_steps, run.warmup_steps, run.lr)
        tau = tau_at(run.step, run.total_steps, base=args.tau_base)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = make_views(training.to_device(batch, env.device), generator, run)
        loss, z1 = train_step(model, byol, views, optimizer, scaler, autocast, tau)

        health.watch(loss, run.step)
        loss_sum += loss.detach()
        steps += 1
        run.step += 1
        seen += views[0].shape[0] * env.world_size
        run.estimate.step(end_of_epoch=steps == len(loader))

        # a signal stops the run after this step (on every rank alike); so does --stop-after
        stop = run.stop.agreed() or (args.stop_after and run.step - run.start_step >= args.stop_after)
        if run.step % args.log_every == 0 or steps == len(loader) or stop:
            loss_now = health.check(loss, scaler, epoch)
            # collapse watch: the spread of the normalised projections across the batch
            spread = distributed.all_reduce(F.normalize(z1.float(), dim=1).std(dim=0).mean()).item()
            run.proj_std = spread / env.world_size
            speed = seen / (time.perf_counter() - t0)
            record = {"epoch": epoch, "step": run.step, "loss": loss_now, "lr": lr, "tau": tau,
                      "proj_std": run.proj_std, "images_per_s": speed}
            if env.main:
                bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{lr:.3g}", tau=f"{tau:.4f}",
                                img_s=f"{speed:.0f}", left=run.estimate.left())
                files.append_jsonl(run.log, record)
                if run.proj_std < args.collapse_threshold:
                    tqdm.write(f"warning: projections collapsing (std {run.proj_std:.4f} < "
                               f"{args.collapse_threshold}) at epoch {epoch + 1}, step {run.step}")
        if stop:
            run.stopped = True
            break
    bar.close()
    # the epoch's line also carries the last learning rate and projection spread, for curves.svg
    stats = training.epoch_stats(run, epoch, loss_sum, before + steps, seen, t0)
    return {**stats, "lr": lr, "proj_std": run.proj_std}


def save(run, byol, optimizer, scaler, generator, epoch):
    """checkpoint.pt for resuming exactly, and backbone.pth in the paper's form (the target backbone);
    every rank calls it (the ranks' random states are gathered), rank 0 writes"""
    run_folder.save_checkpoint(os.path.join(run.args.out, "checkpoint.pt"), "byol", byol, optimizer, scaler,
                               training.rng_state(generator), epoch, run.step, partial=run.partial, config=run.config,
                               arch=run.args.arch, in_chans=1, mean=run.mean, std=run.std, inputs=run.config["inputs"])
    if run.env.main:
        files.save_atomic(byol.target_backbone.state_dict(), os.path.join(run.args.out, "backbone.pth"))

def main(args):
    # -------------------------------------------------------------------- set-up: everything checked first
    env, resume, experiment, autocast, scaler, amp = training.start(args, "byol")

    # -------------------------------------------------------------------- data
    splits = {"train": ["train"], "train+val": ["train", "val"], "all": ["train", "val", "test"]}[args.split]
    with distributed.main_first(env):
        dataset = torch.utils.data.ConcatDataset(
            [slices.UnlabelledSlices(args.data, split=s, cache_dir=args.cache, paper_inputs=args.paper_inputs)
             for s in splits])
    steps_per_epoch = training.steps_per_epoch(dataset, args.batch_size, env.world_size)

    # -------------------------------------------------------------------- model
    backbone = ARCHS[args.arch](in_chans=1)
    if args.init != "none" and not resume:  # the resumed state replaces the initial weights
        backbone.load_state_dict(load_backbone(args.init, in_chans=1, trust=args.trust_checkpoint,
                                               arch=args.arch, flag="--init"))
    # the target starts as a copy of the online network
    byol, model = distributed.wrap(BYOL(backbone), env, args.compile)

    # -------------------------------------------------------------------- optimizer and schedule
    mean, std = normalisation.for_training(args)
    global_batch = args.batch_size * env.world_size
    lr = args.lr * global_batch / 256  # the paper's linear scaling rule
    optimizer = LARS(lars_param_groups(byol, args.weight_decay), lr=lr)
    run = training.Run(args=args, env=env, lr=lr, step=0, total_steps=args.epochs * steps_per_epoch,
                       warmup_steps=args.warmup_epochs * steps_per_epoch, mean=mean, std=std, proj_std=None,
                       log=os.path.join(args.out, "log.jsonl"), stop=run_folder.StopSignal(env.control), stopped=False)
    run.config = training.run_config(args, env, experiment=experiment, data=acdc.describe(args.data), amp=amp,
                                     global_batch=global_batch, lr_scaled=lr, slices=len(dataset),
                                     steps_per_epoch=steps_per_epoch, total_steps=run.total_steps,
                                     init=args.init, mean=run.mean, std=run.std,
                                     inputs=PAPER_INPUTS if args.paper_inputs else RAW_INPUTS)
    # the augmentation's random stream, one per rank
    generator = torch.Generator(device=env.device).manual_seed(args.seed * 65536 + env.rank)

    # -------------------------------------------------------------------- resume
    start_epoch = 0
    if resume:
        start_epoch, run.step, run.partial = run_folder.resume(resume, byol, optimizer, scaler, run.config)
        training.set_rng_state(resume["rng"], generator, env.rank)
    run.start_step = run.step
    if env.main:
        if resume:
            print(f"resumed from {args.resume} at step {run.step}, in epoch {start_epoch + 1}")
        print(f"BYOL pretraining of a {args.arch} on {acdc.describe(args.data)}\n  weights: {args.init}\n"
              f"  slices: {len(dataset)} unlabelled slices ({args.split} split)\n  steps: {args.epochs} epochs x "
              f"{steps_per_epoch} = {run.total_steps} steps of {global_batch} slices, lr {lr:.4g}, amp {amp}, "
              f"device {env.device}, {env.world_size} process(es)\n  writes: {args.out}: config.json, log.jsonl, "
              f"checkpoint.pt, backbone.pth, curves.svg")
        run_folder.begin(args.out, run.config, resume)
    keep = set(args.save_backbone_epochs)
    if 0 in keep and run.step == 0 and env.main:  # epoch 0: the initial weights, for the length study
        files.save_atomic(byol.target_backbone.state_dict(), os.path.join(args.out, "backbone_ep000.pth"))

    # -------------------------------------------------------------------- loop
    health = training.Health(env.device)
    loader = slices.make_loader(dataset, args.batch_size, env, args.workers, args.seed)
    run.estimate = Estimate(run)
    for epoch in range(start_epoch, args.epochs):
        # after a mid-epoch resume, the sampler skips the batches this epoch did before the stop
        loader.sampler.set_epoch(epoch, skip=(run.step - epoch * steps_per_epoch) * args.batch_size)
        try:
            stats = train_one_epoch(model, byol, loader, optimizer, scaler, autocast, generator, health,
                                    run, epoch)
        except FloatingPointError as e:
            if env.main:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        done = run.step == (epoch + 1) * steps_per_epoch  # the epoch ran to its end
        if done and env.main:
            files.append_jsonl(run.log, stats)
            pictures.draw_curves(args.out, f"BYOL, {os.path.basename(os.path.abspath(args.out))}",
                                   [("loss", "BYOL loss"), ("lr", "learning rate"), ("proj_std", "proj_std")])
            print(f"epoch {epoch + 1}: loss {stats['loss']:.4f}, {stats['images_per_s']:.0f} images/s")
        if done and epoch + 1 in keep and env.main:  # before checkpoint.pt: a crash in between loses neither
            files.save_atomic(byol.target_backbone.state_dict(),
                              os.path.join(args.out, f"backbone_ep{epoch + 1:03d}.pth"))
        if run.stopped or (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            # epoch + done: the next epoch to start (the one in progress when stopped mid-epoch)
            save(run, byol, optimizer, scaler, generator, epoch + done)
        if run.stopped:
            break

    # -------------------------------------------------------------------- save and tear-down
    stopped = run.step < run.total_steps  # (by a signal or --stop-after) before the end of the last epoch
    run_folder.finish(args.out, stopped, run.step, ["backbone.pth", "checkpoint.pt", "curves.svg"],
                      "backbone.pth is the target backbone")
    return byol


if __name__ == "__main__":
    training.run_main(main, parse_args())
    sys.exit(run_folder.exit_status)  # 75 when stopped before the end: run again with --resume auto
