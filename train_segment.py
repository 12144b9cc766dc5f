"""Fine-tuning the U-Net on labelled ACDC slices (the paper's downstream step).

    python train_segment.py --data data/acdc-synth --weights runs/byol/backbone.pth --out runs/seg
    python train_segment.py --weights byol_acdc_backbone_last.pth --label-fraction 0.1 --seed 1 ...
    torchrun --nproc_per_node=4 train_segment.py ...

--weights takes any backbone checkpoint checkpoints.py reads (every published format, this project's
backbone.pth and checkpoint.pt), a full segmentation checkpoint (this project's best.pt or the
paper's fine-tuned Lightning .ckpt), or none. Writes RUN/config.json, RUN/log.jsonl,
RUN/checkpoint.pt (resumable: --resume auto) and RUN/best.pt (best validation IoU), which
evaluate.py reads.
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
from checkpoints import load_weights, read_checkpoint
from inference import predict_slices
from metrics import confusion
from progress import Estimate
from unet import UNet

CLASSES = ["background", "RV", "MYO", "LV"]


def parse_args(argv=None):
    number = training.number
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    # the paper's settings: 150 epochs, batch 192; crops a multiple of 32, the U-Net's stride
    training.add_common_args(p, out="runs/segment", epochs=150, batch_size=192, size_multiple=32)
    p.add_argument("--weights", default="none",
                   help="'none', a backbone checkpoint or a segmentation checkpoint")
    p.add_argument("--label-fraction", type=number(float, high=1, above=0), default=1.0,
                   help="fraction of the train slices to use, sampled with --seed; as the paper: "
                        "round(n x F) slices, repeated int(1 / F) times an epoch (at least 1 slice, at "
                        "most about n items)")
    p.add_argument("--loss", default="jaccard", choices=["jaccard", "dice", "ce+dice"],
                   help="the paper: multiclass soft Jaccard")
    p.add_argument("--lr", type=number(float, above=0), default=1e-4, help="Adam learning rate (paper: 1e-4)")
    p.add_argument("--start-lr", type=number(float, 0), default=1e-6,
                   help="learning rate at the start of the warmup (paper: 1e-6)")
    p.add_argument("--warmup-epochs", type=number(int, 0), default=10,
                   help="linear warmup epochs (paper: 10)")
    p.add_argument("--clip", type=number(float, above=0), default=5.0,
                   help="gradient norm clipping (paper: 5)")
    p.add_argument("--crop-scale", type=number(float, high=1, above=0), nargs=2, default=(0.08, 1.0),
                   metavar=("MIN", "MAX"),
                   help="area range of the random resized crops (paper: 0.08 1.0); short runs learn faster "
                        "from larger crops, which also match the whole-slice scale of validation better")
    p.add_argument("--freeze-encoder-epochs", type=number(int, 0), default=0,
                   help="keep the encoder's weights fixed (learning rate 0) for the first N epochs")
    p.add_argument("--val-every", type=number(int, 1), default=1,
                   help="validate every N epochs (and at the end); 10: the paper's candidate checkpoints, "
                        "epochs 10, 20, ..., 150")
    p.add_argument("--val-batch-size", type=number(int, 1), default=32, help="slices per validation batch")
    p.add_argument("--min-size", type=number(int, 0), default=224,
                   help="pad validation slices to at least this size, as evaluate.py (the paper: 224, its "
                        "training crop); 0: to a multiple of 32 only")
    args = p.parse_args(argv)
    if args.data is None:
        p.error(training.NO_DATA)
    if args.crop_scale[0] > args.crop_scale[1]:
        p.error(f"argument --crop-scale: {args.crop_scale[0]} {args.crop_scale[1]}: expected MIN <= MAX")
    return args


# -----------------------------------------------------------------------------
# losses: pure functions of logits (B, C, H, W) and labels (B, H, W)

def soft_scores(logits, labels, eps=1e-7):
    """-> per class soft intersection and union over the whole batch, and which classes are present"""
    probs = logits.float().softmax(dim=1)                                     # (B, C, H, W)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()   # (B, C, H, W)
    inter = (probs * onehot).sum(dim=(0, 2, 3))                              # (C,)
    total = (probs + onehot).sum(dim=(0, 2, 3))                              # (C,) |A| + |B|
    return inter, total, onehot.sum(dim=(0, 2, 3)) > 0


def jaccard_loss(logits, labels, eps=1e-7):
    """segmentation_models_pytorch's JaccardLoss, multiclass mode (the paper's loss): per class
    1 - I / max(U, eps), zero for classes absent from the batch's labels, mean over classes"""
    inter, total, present = soft_scores(logits, labels)
    score = inter / (total - inter).clamp_min(eps)
    return ((1 - score) * present).mean()


def dice_loss(logits, labels, eps=1e-7):
    """the same with the Dice score 2I / (|A| + |B|) (segmentation_models_pytorch's DiceLoss)"""
    inter, total, present = soft_scores(logits, labels)
    score = 2 * inter / total.clamp_min(eps)
    return ((1 - score) * present).mean()


LOSSES = {"jaccard": jaccard_loss, "dice": dice_loss,
          "ce+dice": lambda logits, labels: (F.cross_entropy(logits.float(), labels)
                                             + dice_loss(logits, labels))}


# -----------------------------------------------------------------------------
# one epoch of training, and validation

def make_inputs(batch, generator, run):
    """image and mask cropped and flipped together on the device: (B, 1, H, W) -> (B, 1, size, size)"""
    with torch.no_grad():
        # the paper's fine-tuning views: jitter with p=0.2
        images, labels = augment(batch["image"], batch["size"], generator, run.mean, run.std,
                                 out_size=run.args.size, scale=tuple(run.args.crop_scale), jitter_p=0.2,
                                 labels=batch["label"])
    images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def train_step(model, images, labels, optimizer, scaler, autocast, loss_fn, clip):
    """forward and loss under autocast -> scaled backward -> unscale -> clip -> step -> update; -> loss"""
    with autocast():
        logits = model(images)                                    # (B, 4, size, size)
        loss = loss_fn(logits, labels)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def progress(loss, lr, best, speed):
    """the progress bar's numbers; the best validation IoU only once there is one"""
    return {"loss": f"{loss:.4f}", "lr": f"{lr:.3g}", **({"best_iou": f"{best:.3f}"} if best >= 0 else {}),
            "img_s": f"{speed:.0f}"}


def train_one_epoch(model, loader, optimizer, scaler, autocast, generator, health, run, epoch):
    args, env = run.args, run.env
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not env.main, dynamic_ncols=True,
               leave=False)
    loss_sum, before, seen, t0 = training.epoch_start(run, epoch)  # (before: steps done before a resume)
    steps = 0  # this invocation's
    frozen = epoch < args.freeze_encoder_epochs
    for batch in bar:
        lr = training.warmup_cosine(run.step, run.total_steps, run.warmup_steps, args.lr,
                                    start_lr=args.start_lr)
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if frozen and group["name"] == "encoder" else lr
        images, labels = make_inputs(training.to_device(batch, env.device), generator, run)
        loss = train_step(model, images, labels, optimizer, scaler, autocast, run.loss_fn, args.clip)

        health.watch(loss, run.step)
        loss_sum += loss.detach()
        steps += 1
        run.step += 1
        seen += images.shape[0] * env.world_size
        run.estimate.step(end_of_epoch=steps == len(loader))

        # a signal stops the run after this step (on every rank alike); so does --stop-after
        stop = run.stop.agreed() or (args.stop_after and run.step - run.start_step >= args.stop_after)
        if run.step % args.log_every == 0 or steps == len(loader) or stop:
            loss_now = health.check(loss, scaler, epoch)
            speed = seen / (time.perf_counter() - t0)
            if env.main:
                bar.set_postfix({**progress(loss_now, lr, run.best, speed), "left": run.estimate.left()})
                files.append_jsonl(run.log, {"epoch": epoch, "step": run.step, "loss": loss_now,
                                             "lr": lr, "images_per_s": speed})
        if stop:
            run.stopped = True
            break
    bar.close()
    return training.epoch_stats(run, epoch, loss_sum, before + steps, seen, t0)


@torch.no_grad()
def validation_loader(dataset, run):
    """this rank's every world_size-th validation slice; built once, read in this process (the slices
    are memory-mapped: workers would cost more to start each epoch than they save)"""
    env = run.env
    shard = torch.utils.data.Subset(dataset, range(env.rank, len(dataset), env.world_size))
    return torch.utils.data.DataLoader(shard, batch_size=run.args.val_batch_size,
                                       collate_fn=slices.collate_slices)


def validate(model, loader, run):
    """whole slices, deterministically, by evaluate.py's protocol (padded to at least 224 and a
    multiple of 32, logits cropped back); the confusion matrix is summed over ranks"""
    args, env = run.args, run.env
    model.eval()
    counts = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long, device=env.device)
    for batch in loader:
        batch = training.to_device(batch, env.device)
        h, w = batch["image"].shape[-2:]
        # (B, H, W)
        valid = ((torch.arange(h, device=env.device)[None, :, None] < batch["size"][:, :1, None]) &
                 (torch.arange(w, device=env.device)[None, None, :] < batch["size"][:, 1:, None]))
        pred = predict_slices(model, batch["image"][:, 0], (run.mean, run.std), run.autocast,
                              min_size=args.min_size)  # (B, H, W)
        # -1: the padding
        counts += confusion(pred, torch.where(valid, batch["label"].long(), -1), len(CLASSES))
    distributed.all_reduce(counts)
    inter = counts.diag().double()
    union = counts.sum(0).double() + counts.sum(1).double() - inter
    iou = (inter / union.clamp_min(1)).tolist()
    return {"val_iou": sum(iou[1:]) / 3, **{f"val_iou_{c}": v for c, v in zip(CLASSES, iou)}}


# -----------------------------------------------------------------------------
# the script

def adam(net, lr, device):
    """Adam over two groups (the encoder can be frozen by its learning rate); the fused kernel on GPUs"""
    groups = [{"name": "encoder", "params": list(net.encoder.parameters())},
              {"name": "decoder",
               "params": [p for n, p in net.named_parameters() if not n.startswith("encoder.")]}]
    return torch.optim.Adam(groups, lr=lr,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))


def main(args):
    # -------------------------------------------------------------------- set-up: everything checked first
    env, resume, experiment, autocast, scaler, amp = training.start(args, "segmentation")

    # -------------------------------------------------------------------- data
    with distributed.main_first(env):
        train_set = slices.LabelledSlices(args.data, split="train", cache_dir=args.cache)
        val_set = slices.LabelledSlices(args.data, split="val", cache_dir=args.cache)
    spacing = slices.spacing_range(train_set.volumes)  # stored in best.pt: predict.py warns outside it
    train_set = slices.LabelFraction(train_set, args.label_fraction, args.seed)  # 1.0: every slice, once
    steps_per_epoch = training.steps_per_epoch(train_set, args.batch_size, env.world_size)

    # -------------------------------------------------------------------- model
    net = UNet(in_chans=1, num_classes=len(CLASSES), arch=args.arch)
    if resume:  # the resumed state replaces any initial weights
        loaded = resume["config"]["weights"]
    elif args.weights != "none":
        loaded = load_weights(net, args.weights, args.trust_checkpoint, flag="--weights")
    else:
        loaded = "nothing (random initialisation)"
    # net: the plain module, for checkpoints and validation
    net, model = distributed.wrap(net, env, args.compile)

    # -------------------------------------------------------------------- optimizer and schedule
    mean, std = normalisation.for_training(args)
    optimizer = adam(net, args.lr, env.device)
    run = training.Run(args=args, env=env, step=0, total_steps=args.epochs * steps_per_epoch,
                       warmup_steps=args.warmup_epochs * steps_per_epoch, mean=mean, std=std,
                       loss_fn=LOSSES[args.loss], autocast=autocast, best=-1.0, best_epoch=-1,
                       log=os.path.join(args.out, "log.jsonl"), stop=run_folder.StopSignal(env.control), stopped=False)
    run.config = training.run_config(args, env, experiment=experiment, data=acdc.describe(args.data), amp=amp,
                                     global_batch=args.batch_size * env.world_size,
                                     train_slices=len(train_set), distinct_train_slices=len(train_set.chosen),
                                     val_slices=len(val_set), steps_per_epoch=steps_per_epoch,
                                     total_steps=run.total_steps, weights=loaded,
                                     mean=run.mean, std=run.std, train_spacing=spacing)
    generator = torch.Generator(device=env.device).manual_seed(args.seed * 65536 + env.rank)
    meta = dict(arch=args.arch, in_chans=1, num_classes=len(CLASSES), mean=run.mean, std=run.std,
                train_spacing=spacing, config=run.config)

    # -------------------------------------------------------------------- resume
    start_epoch = 0
    if resume:
        start_epoch, run.step, run.partial = run_folder.resume(resume, net, optimizer, scaler, run.config)
        training.set_rng_state(resume["rng"], generator, env.rank)
        best_path = os.path.join(args.out, "best.pt")
        if resume["continues"] and os.path.exists(best_path):
            saved = read_checkpoint(best_path)
            run.best, run.best_epoch = saved["val"]["val_iou"], saved["epoch"]
    run.start_step = run.step
    if env.main:
        if resume:
            print(f"resumed from {args.resume} at step {run.step}, in epoch {start_epoch + 1}")
        print(f"fine-tuning a U-Net ({args.arch}) on {acdc.describe(args.data)}\n  weights: {loaded}\n"
              f"  slices: {len(train_set.chosen)} distinct train slices x {train_set.repeats} = {len(train_set)} "
              f"per epoch (label fraction {args.label_fraction}), {len(val_set)} validation slices\n"
              f"  steps: {args.epochs} epochs x {steps_per_epoch} = {run.total_steps} steps of "
              f"{args.batch_size * env.world_size} slices, amp {amp}, device {env.device}\n"
              f"  writes: {args.out}: config.json, log.jsonl, checkpoint.pt, best.pt, curves.svg")
        run_folder.begin(args.out, run.config, resume)

    # -------------------------------------------------------------------- loop
    health = training.Health(env.device)
    loader = slices.make_loader(train_set, args.batch_size, env, args.workers, args.seed)
    val_loader, best = validation_loader(val_set, run), None  # best: an improved best.pt not yet written
    run.estimate = Estimate(run, [(e + 1) * steps_per_epoch for e in range(args.epochs)
                                  if (e + 1) % args.val_every == 0 or e + 1 == args.epochs], len(val_set))
    for epoch in range(start_epoch, args.epochs):
        # after a mid-epoch resume, the sampler skips the batches this epoch did before the stop
        loader.sampler.set_epoch(epoch, skip=(run.step - epoch * steps_per_epoch) * args.batch_size)
        try:
            stats = train_one_epoch(model, loader, optimizer, scaler, autocast, generator, health, run, epoch)
        except FloatingPointError as e:
            if env.main:
                print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        done = run.step == (epoch + 1) * steps_per_epoch  # the epoch ran to its end
        if done and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            t = time.perf_counter()
            stats.update(validate(net, val_loader, run))
            run.estimate.validated(time.perf_counter() - t)
            if env.main and stats["val_iou"] > run.best:  # kept on the host; written with the next checkpoint
                run.best, run.best_epoch = stats["val_iou"], epoch
                best = {"kind": "segmentation", "model": {k: v.detach().to("cpu", copy=True)
                                                          for k, v in net.state_dict().items()},
                        "epoch": epoch, "val": stats, **meta}
        if done and env.main:
            files.append_jsonl(run.log, stats)
            pictures.draw_curves(args.out, f"fine-tuning, {os.path.basename(os.path.abspath(args.out))}",
                                   [("loss", "training loss"), ("val_iou", "validation IoU")])
            val = (f", val IoU {stats['val_iou']:.4f} (RV {stats['val_iou_RV']:.3f}, "
                   f"MYO {stats['val_iou_MYO']:.3f}, LV {stats['val_iou_LV']:.3f})"
                   if "val_iou" in stats else "")
            print(f"epoch {epoch + 1}: loss {stats['loss']:.4f}{val}, {stats['images_per_s']:.0f} images/s")
        if run.stopped or (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            # best.pt before checkpoint.pt: a crash between the two loses neither (a resume from the
            # older checkpoint redoes the same epochs exactly, so it finds the same best again)
            if best is not None:
                files.save_atomic(best, os.path.join(args.out, "best.pt"))
                best = None
            # epoch + done: the next epoch to start (the one in progress when stopped mid-epoch)
            run_folder.save_checkpoint(os.path.join(args.out, "checkpoint.pt"), "segmentation", net,
                                       optimizer, scaler, training.rng_state(generator), epoch + done,
                                       run.step, partial=run.partial, **meta)
        if run.stopped:
            break

    # -------------------------------------------------------------------- save and tear-down
    stopped = run.step < run.total_steps  # (by a signal or --stop-after) before the end of the last epoch
    run_folder.finish(args.out, stopped, run.step, ["best.pt", "checkpoint.pt", "curves.svg"],
                      f"best validation IoU {run.best:.4f} at epoch {run.best_epoch + 1}")
    return net


if __name__ == "__main__":
    training.run_main(main, parse_args())
    sys.exit(run_folder.exit_status)  # 75 when stopped before the end: run again with --resume auto
