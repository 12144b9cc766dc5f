"""train_segment.py: the losses by hand, and a tiny fine-tuning run that saves, resumes exactly,
starts from a pretrained backbone and subsamples labels."""
import json
import os
import re
import signal

import pytest
import torch

import acdc
import normalisation  # noqa: E402
import precision
import slices
import train_segment
from checkpoints import CheckpointError
from resnet import resnet18


def tiny_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--arch", "resnet18", "--size", "32", "--batch-size", "8",
            "--epochs", "2", "--warmup-epochs", "1", "--workers", "0", "--log-every", "1", "--device", "cpu",
            "--cache", os.path.join(data, "cache"), "--val-batch-size", "4", *extra]


def run(data, out, *extra):
    return train_segment.main(train_segment.parse_args(tiny_args(data, out, *extra)))


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


# -----------------------------------------------------------------------------
# losses

def uniform_case():
    """4 classes, equal logits (probabilities 1/4), two pixels labelled background and LV"""
    return torch.zeros(1, 4, 1, 2, requires_grad=True), torch.tensor([[[0, 3]]])


def test_jaccard_loss_by_hand():
    logits, labels = uniform_case()
    # background and LV: I = 1/4, |A| + |B| = 2/4 + 1 -> U = 5/4, score 1/5, loss 4/5;
    # RV and MYO are absent from the labels: loss 0; mean over the 4 classes
    loss = train_segment.jaccard_loss(logits, labels)
    assert loss.item() == pytest.approx((0.8 + 0.8) / 4)
    loss.backward()
    # raising the logit of a pixel's true class lowers the loss
    assert logits.grad[0, 0, 0, 0] < 0 and logits.grad[0, 3, 0, 1] < 0
    assert logits.grad[0, 3, 0, 0] > 0 and logits.grad[0, 0, 0, 1] > 0


def test_dice_loss_by_hand():
    logits, labels = uniform_case()
    # Dice = 2 I / (|A| + |B|) = (1/2) / (3/2) = 1/3 for background and LV
    assert train_segment.dice_loss(logits, labels).item() == pytest.approx((2 / 3 + 2 / 3) / 4)


def test_perfect_prediction_has_zero_loss():
    labels = torch.tensor([[[0, 1], [2, 3]]])
    logits = 50 * torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    for name, loss in train_segment.LOSSES.items():
        assert loss(logits, labels).item() == pytest.approx(0, abs=1e-5), name


# -----------------------------------------------------------------------------
# the script

def test_short_run_writes_best_and_log(tiny_acdc, tmp_path, capsys):
    out = tmp_path / "run"
    precision.set_tf32(False, False)  # as an evaluation in the same process leaves it: --tf32 auto restores
    run(tiny_acdc, out, "--norm", "paper")  # the paper's fine-tuning scale, stored for evaluation
    assert {"best.pt", "checkpoint.pt", "config.json", "log.jsonl"} <= set(os.listdir(out))
    epochs = [r for r in records(out) if "val_iou" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(0 <= r["val_iou_LV"] <= 1 for r in epochs)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["kind"] == "segmentation" and best["arch"] == "resnet18"
    assert best["val"]["val_iou"] == max(r["val_iou"] for r in epochs)
    # a person reads epochs counted from 1; the files keep their 0-based "epoch"
    out_text, err_text = capsys.readouterr()
    assert "\nepoch 1: loss" in out_text and "\nepoch 2: loss" in out_text and "epoch 0" not in out_text + err_text
    assert f"at epoch {best['epoch'] + 1}; in" in out_text and "epoch 2/2" in err_text
    assert (best["mean"], best["std"]) == (255 * normalisation.MEAN, 255 * normalisation.STD)
    config = json.load(open(out / "config.json"))
    assert (config["precision"], config["tf32"]) == ("fp32", {"convolutions": True, "matmuls": False})


def test_resume_after_a_signal_continues_exactly(tiny_acdc, tmp_path, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(tiny_acdc, whole)
    real, calls = train_segment.LOSSES["jaccard"], {"n": 0}

    def loss_then_signal(logits, labels):  # what a cluster does before it kills a job
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(logits, labels)
    monkeypatch.setitem(train_segment.LOSSES, "jaccard", loss_then_signal)
    run(tiny_acdc, split)
    assert max(r["step"] for r in records(split) if "step" in r) == 3  # finished its step, then stopped
    monkeypatch.setitem(train_segment.LOSSES, "jaccard", real)
    run(tiny_acdc, split, "--resume", "auto")
    losses = lambda out: {r["step"]: r["loss"] for r in records(out) if "step" in r and "steps" not in r}
    assert losses(split) == losses(whole)
    val = lambda out: [r["val_iou"] for r in records(out) if "val_iou" in r]
    assert val(split) == val(whole)
    epochs = lambda out: [(r["loss"], r["steps"]) for r in records(out) if "steps" in r]
    assert epochs(split) == epochs(whole)  # epoch 0's line covers the steps before the signal too


def test_weights_from_a_backbone_file_initialise_the_encoder(tiny_acdc, tmp_path, capsys):
    backbone = resnet18(in_chans=1).state_dict()
    torch.save(backbone, tmp_path / "backbone.pth")
    argv = tiny_args(tiny_acdc, tmp_path / "run", "--weights", str(tmp_path / "backbone.pth"), "--epochs", "1",
                     "--freeze-encoder-epochs", "1")
    argv.remove("--arch"), argv.remove("resnet18")  # --arch auto: the backbone's
    net = train_segment.main(train_segment.parse_args(argv))
    out, err = capsys.readouterr()
    assert net.arch == "resnet18" and "--arch auto: resnet18, the encoder of --weights" in out
    # the start-up, notices and warnings included: at most 12 lines saying what, on what, from what, how
    # much and where; then, once, the estimate; the progress bar shows the time left
    start = out[:out.index("estimated")].splitlines() + [line for line in err.splitlines() if "epoch 1/1" not in line]
    assert len(start) <= 12 and all(w in out for w in ("weights: the encoder", "slices:", "steps:", "writes:"))
    assert re.search(r"^estimated (\d+ min )?\d+ s for 1 epoch \(\d+\.\d images/s on cpu\)$", out, re.M)
    assert out.count("estimated") == 1 and "left=" in err
    # frozen for the one epoch: the weights are the file's (BatchNorm statistics still follow the data)
    for k, v in backbone.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(net.encoder.state_dict()[k], v), k
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert "the encoder from" in config["weights"]


def test_label_fraction_reports_distinct_slices_and_epoch_length(tiny_acdc, tmp_path, capsys):
    # 1e-9 rounds to no slice: one slice, repeated to about the full epoch (printed "150 train slices" before)
    with pytest.warns(UserWarning, match="training on 1 slice"):
        run(tiny_acdc, tmp_path / "run", "--label-fraction", "1e-9", "--val-every", "2")
    n = len(slices.LabelledSlices(tiny_acdc, "train", cache_dir=os.path.join(tiny_acdc, "cache")))
    assert f"1 distinct train slices x {n} = {n} per epoch (label fraction 1e-09)" in capsys.readouterr().out
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert (config["distinct_train_slices"], config["train_slices"], config["steps_per_epoch"]) == (1, n, n // 8)
    # --val-every 2 validates (and may keep best.pt) after the 2nd epoch, not the 1st: 10 gives the paper's
    # candidate checkpoints, epochs 10, 20, ..., 150
    assert [r["epoch"] for r in records(tmp_path / "run") if "val_iou" in r] == [1]


@pytest.mark.parametrize("flag, value, expected", [
    ("--label-fraction", "1.5", "expected a number > 0 and <= 1"), ("--size", "7", "a multiple of 32"),
    ("--batch-size", "0", "expected an integer >= 1"), ("--lr", "nan", "expected a number > 0"),
    ("--epochs", "0", "expected an integer >= 1"), ("--crop-scale", "0.5 0.2", "expected MIN <= MAX")])
def test_bad_numbers_are_refused_at_parse_time(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        train_segment.parse_args(["--data", "d", flag, *value.split()])
    assert e.value.code == 2  # argparse's convention: the usage and one error line
    err = capsys.readouterr().err
    assert f"error: argument {flag}: " in err and expected in err


def test_norm_data_uses_and_stores_the_train_split_statistics(tiny_acdc, tmp_path):
    run(tiny_acdc, tmp_path / "run", "--norm", "data", "--epochs", "1")
    mean, std = normalisation.data_statistics(tiny_acdc, os.path.join(tiny_acdc, "cache"))
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert (best["mean"], best["std"]) == pytest.approx((mean, std))
    assert best["mean"] != pytest.approx(normalisation.MEAN)


def test_progress_shows_no_iou_before_the_first_validation():
    assert "best_iou" not in train_segment.progress(0.5, 1e-4, -1.0, 10)
    assert train_segment.progress(0.5, 1e-4, 0.8123, 10)["best_iou"] == "0.812"


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train_segment.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out  # a flag without a default says nothing of one
    for default in ("(default: auto)", "(default: 150)", "(default: 192)", "(default: runs/segment)",
                    "(default: jaccard)", "(default: 0.0001)"):
        assert default in out


@pytest.mark.parametrize("flag", ["--out", "--cache"])
def test_output_folders_are_checked_before_anything_runs(tiny_acdc, tmp_path, flag, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match=f"{flag} {a_file}: a file is there, not a folder"):
        run(tiny_acdc, tmp_path / "run", flag, str(a_file))
    (tmp_path / "read-only").mkdir()
    real = os.access  # a folder this user may not write into (root may write anywhere)
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and p != str(tmp_path / "read-only"))
    with pytest.raises(SystemExit, match=f"{flag} {tmp_path}/read-only/x: no permission to write in"):
        run(tiny_acdc, tmp_path / "run", flag, str(tmp_path / "read-only" / "x"))


def test_the_data_read_is_named_and_a_phantom_says_so(tiny_acdc, tmp_path, capsys):
    run(tiny_acdc, tmp_path / "run", "--epochs", "1")
    assert f"on {os.path.abspath(tiny_acdc)} (synthetic phantom, not ACDC)" in capsys.readouterr().out
    assert "synthetic phantom" in json.load(open(tmp_path / "run" / "config.json"))["data"]


def test_a_refused_start_creates_no_folder(tiny_acdc, tmp_path, monkeypatch):
    """a cache folder that cannot be made, a bad data path, a refused --resume file: one line each,
    and no empty --out folder left behind"""
    real = os.mkdir

    def refusing(path, *a, **kw):  # a filesystem that will not make this one folder
        if str(path).startswith(str(tmp_path / "nope")):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "mkdir", refusing)
    with pytest.raises(SystemExit, match=f"--cache {tmp_path}/nope: cannot be created: Permission denied"):
        run(tiny_acdc, tmp_path / "run", "--cache", str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="--data"):
        run(str(tmp_path / "no-data"), tmp_path / "run")
    (tmp_path / "not-a-checkpoint.pt").write_text("hello")
    with pytest.raises((SystemExit, CheckpointError), match="not-a-checkpoint.pt"):
        run(tiny_acdc, tmp_path / "run", "--resume", str(tmp_path / "not-a-checkpoint.pt"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "nope").exists()
