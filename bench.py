"""Throughput: the compute ceiling beside the end-to-end step, in one run.

    python bench.py pretrain --batch-size 128 --amp bf16 [--compile]     # BYOL step
    python bench.py segment --batch-size 192 --amp bf16 [--compile]      # U-Net fine-tuning step
    python bench.py evaluate                                              # volumes/s, whole evaluation path
    python bench.py stem                  # a GPU check: the stem under bf16 autocast equals IEEE fp32 (<= 1e-6)
    python bench.py segment --device cpu --arch resnet18 --size 64 --batch-size 8 --steps 5

For a training mode it times (a) the ceiling: the training step of train_pretrain.py /
train_segment.py on one fixed batch already on the device, and (b) the end-to-end step: real
slices from acdc.py (a phantom by default) through the DataLoader, the host-to-device copy, the
augmentation on the device and the same step. It prints images/s for both, their ratio, the
share of the end-to-end time spent waiting for data and augmenting, the peak device memory,
and one JSON line for collecting results.
"""
import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

import acdc
import distributed
import inference
import metrics
import normalisation
import phantom
import precision
import slices
import train_pretrain
import train_segment
import training
from byol import BYOL, LARS, lars_param_groups
from resnet import ARCHS
from unet import UNet


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=training.HelpFormatter)
    p.add_argument("mode", choices=["pretrain", "segment", "evaluate", "stem"], help="which path to time")
    p.add_argument("--data", default="data/acdc-synth",
                   help="ACDC root; a phantom is written to a temporary folder if absent")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the paper's (pretrain 128, segment 192, evaluate 32)")
    p.add_argument("--size", type=int, default=224, help="crop side (the paper: 224)")
    p.add_argument("--arch", default="resnet50", choices=list(ARCHS), help="encoder")
    training.add_device_args(p)
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first (compilation, cudnn autotuning)")
    p.add_argument("--workers", type=int, default=-1, help="loader workers; -1: as the training scripts")
    p.add_argument("--seed", type=int, default=0, help="seed")
    return p.parse_args(argv)


class Timer:
    """wall time of a block; waits for the device first and last, so queued GPU work is counted"""

    def __init__(self, device):
        self.device, self.total = device, 0.0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.total += time.perf_counter() - self.t0


class Stopwatch:
    """device time of the blocks it wraps, without synchronising (which would stall the pipeline
    it measures): CUDA events on a GPU, the clock on the CPU. Read seconds() after a sync."""

    def __init__(self, device):
        self.cuda, self.spans, self.cpu = device.type == "cuda", [], 0.0

    @contextlib.contextmanager
    def __call__(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.cpu += time.perf_counter() - t0

    def seconds(self):
        return self.cpu + sum(a.elapsed_time(b) for a, b in self.spans) / 1000


def build(args, env, dataset_kind):
    """-> (inputs(batch on device, generator): the script's augmentation,
           step(inputs): its training step, amp)"""
    autocast, scaler, amp = precision.autocast(env.device, args.amp, args.tf32)
    run = training.Run(args=SimpleNamespace(size=args.size, crop_scale=(0.08, 1.0), paper_inputs=False),
                       env=env, mean=normalisation.MEAN, std=normalisation.STD)
    # the scripts' models and optimizers, wrapped as they wrap them
    if dataset_kind == "pretrain":
        net, model = distributed.wrap(BYOL(ARCHS[args.arch](in_chans=1)), env, args.compile)
        optimizer = LARS(lars_param_groups(net, 1e-5), lr=0.1)
    else:
        net, model = distributed.wrap(UNet(in_chans=1, num_classes=4, arch=args.arch), env, args.compile)
        optimizer = train_segment.adam(net, 1e-4, env.device)
    model.train()

    def inputs(batch, generator):
        if dataset_kind == "pretrain":
            return train_pretrain.make_views(batch, generator, run)
        return train_segment.make_inputs(batch, generator, run)

    def step(inputs):
        if dataset_kind == "pretrain":
            return train_pretrain.train_step(model, net, inputs, optimizer, scaler, autocast, tau=0.99)
        return train_segment.train_step(model, *inputs, optimizer, scaler, autocast,
                                        train_segment.jaccard_loss, 5.0)
    return inputs, step, amp


def seconds_per_step(mode, arch, size, batch_size, amp, device, compile=False, steps=3, warmup=2):
    """the ceiling on a synthetic batch, without data: for estimates (study.py plan --estimate)"""
    env = distributed.setup(device)
    args = SimpleNamespace(arch=arch, size=size, amp=amp, tf32="auto", compile=compile)
    inputs, step, _ = build(args, env, mode)
    batch = {"image": 200 * torch.rand(batch_size, 1, size, size, device=env.device),
             "size": torch.full((batch_size, 2), size, device=env.device),
             "label": torch.randint(0, 4, (batch_size, size, size), device=env.device)}
    fixed = inputs(batch, torch.Generator(device=env.device).manual_seed(0))
    for _ in range(warmup):
        step(fixed)
    with Timer(env.device) as timer:
        for _ in range(steps):
            step(fixed)
    return timer.total / steps, training.device_name(env.device)


def bench_training(args, env, data):
    dataset = (slices.UnlabelledSlices if args.mode == "pretrain"
               else slices.LabelledSlices)(data, split="train")
    training.steps_per_epoch(dataset, args.batch_size, 1)  # exits with a message if one batch does not fit
    inputs, step, amp = build(args, env, args.mode)
    generator = torch.Generator(device=env.device).manual_seed(args.seed)
    loader = slices.make_loader(dataset, args.batch_size, env, args.workers, args.seed)

    def batches():  # as many batches as asked for, epoch after epoch, as the training scripts draw them
        for epoch in itertools.count():
            loader.sampler.set_epoch(epoch)
            yield from loader

    it = batches()
    # (a) the ceiling: one fixed batch, augmented once, already on the device
    fixed = inputs(training.to_device(next(it), env.device), generator)
    for _ in range(args.warmup):
        step(fixed)
    with Timer(env.device) as ceiling:
        for _ in range(args.steps):
            step(fixed)

    # (b) end to end: loader -> copy -> augmentation -> step. On the side, without extra syncs: the
    # host's time blocked on the loader, and the device's time in augmentation
    for _ in range(args.warmup):
        step(inputs(training.to_device(next(it), env.device), generator))
    wait, augmenting = 0.0, Stopwatch(env.device)
    with Timer(env.device) as total:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = training.to_device(next(it), env.device)
            wait += time.perf_counter() - t0
            with augmenting():
                x = inputs(batch, generator)
            step(x)
    images = args.steps * args.batch_size
    out = {"mode": args.mode, "arch": args.arch, "size": args.size, "batch_size": args.batch_size, "amp": amp,
           "compile": args.compile, "device": training.device_name(env.device), "steps": args.steps,
           "ceiling_images_per_s": images / ceiling.total, "end_to_end_images_per_s": images / total.total}
    out["ratio"] = out["end_to_end_images_per_s"] / out["ceiling_images_per_s"]
    out["host_data_wait_share"] = wait / total.total
    out["augment_share"] = augmenting.seconds() / total.total
    return out


def bench_evaluate(args, env, data):
    """volumes/s through the whole evaluation path: read, predict slice by slice, Dice and Hausdorff"""
    cases = acdc.find_cases(data, split="test")
    frames = [f for c in cases for f in c.frames]
    _, model = distributed.wrap(UNet(in_chans=1, num_classes=4, arch=args.arch), env, args.compile)
    model.eval()
    autocast, _, amp = precision.autocast(env.device, args.amp, args.tf32)
    frames = itertools.cycle(frames)

    def one_volume():  # read, predict slice by slice, score: evaluate.py's path for one volume
        frame = next(frames)
        image = acdc.read_volume(frame.image)
        truth = torch.as_tensor(acdc.read_label(frame.label).data, device=env.device)
        pred = inference.predict_volume(model, image.data, env.device, autocast=autocast,
                                        batch_size=args.batch_size)
        metrics.score_volume(pred, truth, image.spacing)
    for _ in range(args.warmup):
        one_volume()
    with Timer(env.device) as timer:
        for _ in range(args.steps):
            one_volume()
    count = args.steps
    return {"mode": "evaluate", "arch": args.arch, "batch_size": args.batch_size, "amp": amp,
            "compile": args.compile, "device": training.device_name(env.device), "volumes": count,
            "volumes_per_s": count / timer.total}


def check_stem(args, env, data):
    """the stem's output (batch statistics, as in training) under bf16 autocast and in TF32, each against
    IEEE fp32, on uniform raw intensities 0-1000 at the paper's fine-tuning scale"""
    net = ARCHS[args.arch](in_chans=1).to(env.device, memory_format=torch.channels_last)
    raw = 1000 * torch.rand(args.batch_size, 1, args.size, args.size, device=env.device)
    x = normalisation.normalize(raw, *normalisation.paper_scale()).contiguous(memory_format=torch.channels_last)
    out = []
    for amp, tf32 in (("off", "off"), ("bf16", "auto"), ("off", "on")):
        with torch.no_grad(), precision.autocast(env.device, amp, tf32)[0]():
            out.append(net.stem(x).float())
    bf16, tf32 = (((y - out[0]).norm() / out[0].norm()).item() for y in out[1:])
    return {"mode": "stem", "arch": args.arch, "size": args.size, "batch_size": args.batch_size, "amp": "bf16",
            "device": training.device_name(env.device), "stem_rel_diff_bf16": bf16, "stem_rel_diff_tf32": tf32}


def main(args):
    args.batch_size = args.batch_size or {"pretrain": 128, "segment": 192, "evaluate": 32, "stem": 32}[args.mode]
    env = distributed.setup(args.device)
    torch.manual_seed(args.seed)
    if env.device.type == "cuda":  # (distributed.setup already turned on cuDNN autotuning, as in training)
        torch.cuda.reset_peak_memory_stats(env.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not os.path.isdir(data) and args.mode != "stem":  # (the stem check needs no data)
            print(f"{data} not found: writing a phantom to a temporary folder")
            data = os.path.join(tmp, "acdc")
            phantom.write_phantom(data, patients=20, seed=args.seed)
        bench = {"evaluate": bench_evaluate, "stem": check_stem}.get(args.mode, bench_training)
        result = bench(args, env, data)
    result["peak_memory_gb"] = (torch.cuda.max_memory_allocated(env.device) / 2**30
                                if env.device.type == "cuda" else None)

    # a readable table, then one JSON line
    print(f"\n{args.mode} on {result['device']}: {args.arch}, batch {args.batch_size}, amp {result['amp']}, "
          f"compile {args.compile}")
    if args.mode == "stem":
        print(f"  stem against IEEE fp32: bf16 autocast {result['stem_rel_diff_bf16']:.2e}, TF32 "
              f"{result['stem_rel_diff_tf32']:.2e}")
    elif args.mode == "evaluate":
        print(f"  evaluation path        {result['volumes_per_s']:10.2f} volumes/s")
    else:
        print(f"  ceiling (data on device) {result['ceiling_images_per_s']:10.1f} images/s")
        print(f"  end to end               {result['end_to_end_images_per_s']:10.1f} images/s")
        print(f"  ratio                    {result['ratio']:10.3f}")
        share = 100 * result["host_data_wait_share"]
        print(f"  host waiting for data    {share:9.1f} % of the end-to-end time")
        print(f"  augmentation             {100 * result['augment_share']:9.1f} %")
    if result["peak_memory_gb"] is not None:
        print(f"  peak device memory       {result['peak_memory_gb']:10.2f} GB")
    print(json.dumps(result))
    if result.get("stem_rel_diff_bf16", 0) > 1e-6:  # the check: bf16 autocast must leave the stem in IEEE fp32
        sys.exit(f"error: the stem under bf16 autocast differs from IEEE fp32 by {result['stem_rel_diff_bf16']:.2e}")
    return result


if __name__ == "__main__":
    training.run_main(main, parse_args())
