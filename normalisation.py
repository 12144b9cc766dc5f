"""Every input normalisation of the project: the statistics, the paper's scalings, the --norm flags.

Every network here sees (x - mean) / std of raw MRI intensities x; this file decides mean and std:

    published   MEAN, STD: ACDC's labelled train volumes (the paper's DATASET_MEAN/STD); the default
    data        the same statistics of --data's labelled train slices, for data unlike ACDC
    paper       255 x MEAN, 255 x STD: what the paper's networks saw. Its fine-tuning applied MEAN and
                STD through albumentations' Normalize, whose max_pixel_value=255 multiplies both; its
                pretraining (--paper-inputs) divided uint8 images by 255 (ToTensor) and then applied
                Normalize(67.27, 84.66): ((x / 255) - MEAN) / STD, the same formula
    checkpoint  (evaluate.py, predict.py) what the checkpoint stores (this project's best.pt) or
                implies (the paper's fine-tuned files: 255 x, or their config's norm_max_pixel_value)

best.pt stores its mean and std, so evaluation applies what training applied; augment.py and
inference.py apply the numbers they are given.
"""
import argparse
import math
from collections.abc import Mapping

import numpy as np

import slices

# mean and std of the raw intensities of ACDC's labelled train volumes (the paper's DATASET_MEAN/STD)
MEAN, STD = 67.27297657740893, 84.6606962344396
PUBLISHED = (MEAN, STD)
PAPER_SCALE = 255  # albumentations' max_pixel_value, and ToTensor's / 255 before the pretraining's Normalize


def normalize(x, mean, std):
    """raw intensities -> network input"""
    return (x - mean) / std


def paper_scale():
    """(mean, std) the paper's networks saw, fine-tuned and pretrained alike (see the module docstring)"""
    return PAPER_SCALE * MEAN, PAPER_SCALE * STD


def data_statistics(root, cache_dir=None):
    """(mean, std) of the raw intensities of the labelled train slices of `root` (--norm data)"""
    dataset = slices.LabelledSlices(root, "train", cache_dir)
    n, total, total_sq = np.sum([(x.size, x.sum(dtype=np.float64), np.square(x, dtype=np.float64).sum())
                                 for x in (dataset._map(vol["cache"][0]) for vol in dataset.volumes)], 0)
    return float(total / n), float(np.sqrt(total_sq / n - (total / n) ** 2))


# -----------------------------------------------------------------------------
# training: --norm published | data | paper (fine-tuning only: train_pretrain.py refuses it)

def add_training_flag(p):
    p.add_argument("--norm", default="published", choices=["published", "data", "paper"],
                   help="input normalisation: the published models' ACDC statistics (mean 67.27, std 84.66), "
                        "those of --data's labelled train slices, or (fine-tuning) those x 255, the paper's "
                        "fine-tuning scale; pretraining and fine-tuning should use the same")


def for_training(args):
    """(mean, std) of a training run, as --norm asks (and --paper-inputs, in pretraining)"""
    if getattr(args, "paper_inputs", False) or args.norm == "paper":
        return paper_scale()
    return PUBLISHED if args.norm == "published" else data_statistics(args.data, args.cache)


# -----------------------------------------------------------------------------
# what a checkpoint stores or implies

def of_checkpoint(ckpt):
    """-> (mean, std, where they come from, in words): the input normalisation the checkpoint's model
    was trained with. This project stores it. The paper's fine-tuned models saw the paper scale, and
    their BatchNorm statistics expect that input, unless a Lightning file's config (OmegaConf, which
    read_checkpoint reads as a plain dict) gives another max_pixel_value."""
    if ckpt.get("kind") == "segmentation":
        return ckpt.get("mean", MEAN), ckpt.get("std", STD), "stored in the checkpoint"
    hyper = ckpt.get("hyper_parameters")
    config = hyper.get("config") if isinstance(hyper, Mapping) else None
    scale = config.get("norm_max_pixel_value") if isinstance(config, Mapping) else None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        return MEAN * scale, STD * scale, f"ACDC's statistics x {scale:g}, the checkpoint's config"
    return *paper_scale(), "ACDC's statistics x 255, as the paper's code applied them"


# -----------------------------------------------------------------------------
# evaluation and prediction: --norm checkpoint | published | paper | MEAN,STD

INFERENCE_CHOICES = ("checkpoint", "published", "paper")


def inference_flag(text):
    """argparse type of evaluate's and predict's --norm: checkpoint, published, paper, or MEAN,STD"""
    if text in INFERENCE_CHOICES:
        return text
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        mean = std = float("nan")
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected checkpoint, published, paper or MEAN,STD "
                                         f"(two numbers, STD > 0, e.g. 67.27,84.66)")
    return mean, std


def add_inference_flag(p):
    p.add_argument("--norm", type=inference_flag, default="checkpoint",
                   help="input normalisation (x - mean) / std: checkpoint (what the checkpoint stores or "
                        "implies), published (ACDC's mean 67.27, std 84.66), paper (those x 255, what the "
                        "paper's fine-tuned models saw), or MEAN,STD")


def for_inference(choice, from_checkpoint):
    """--norm's choice and the checkpoint's own (mean, std, source) -> (mean, std, source in words)"""
    if choice == "checkpoint":
        mean, std, source = from_checkpoint
        return mean, std, f"the checkpoint's: {source}"
    if choice == "published":
        return MEAN, STD, "ACDC's published statistics (--norm published)"
    if choice == "paper":
        return *paper_scale(), "ACDC's statistics x 255, what the paper's fine-tuned models saw (--norm paper)"
    return *choice, "given with --norm"
