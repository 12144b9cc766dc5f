"""train_pretrain.py end to end on a tiny phantom: files, exact resume, torchrun on CPU, NaN stop."""
import json
import os
import subprocess
import sys

import pytest
import torch

import acdc
import normalisation  # noqa: E402
import slices
import augment
import byol
import train_pretrain
from checkpoints import load_backbone
from resnet import resnet18

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--arch", "resnet18", "--size", "32", "--batch-size", "8",
            "--epochs", "2", "--warmup-epochs", "1", "--workers", "0", "--log-every", "1", "--device", "cpu",
            "--cache", os.path.join(data, "cache"), *extra]


def run(data, out, *extra):
    return train_pretrain.main(train_pretrain.parse_args(tiny_args(data, out, *extra)))


def step_losses(out):
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return {r["step"]: r["loss"] for r in lines if "step" in r and "steps" not in r}


def epoch_line(out, epoch):
    lines = map(json.loads, open(os.path.join(out, "log.jsonl")))
    return next(r for r in lines if "steps" in r and r["epoch"] == epoch)


def test_short_run_writes_every_file_and_the_backbone_loads(tiny_acdc, tmp_path):
    out = tmp_path / "run"
    run(tiny_acdc, out, "--save-backbone-epochs", "0,1")
    assert sorted(os.listdir(out)) == ["backbone.pth", "backbone_ep000.pth", "backbone_ep001.pth", "checkpoint.pt",
                                       "config.json", "curves.svg", "log.jsonl"]  # the lock is gone at the end
    config = json.load(open(out / "config.json"))
    assert config["args"]["arch"] == "resnet18" and config["world_size"] == 1
    assert config["lr_scaled"] == pytest.approx(0.5 * 8 / 256)  # the paper's linear scaling rule
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    epochs = [r for r in records if "steps" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    steps = [r for r in records if "steps" not in r]
    assert all(0 < r["proj_std"] < 1 and 0.99 <= r["tau"] <= 1 for r in steps)
    # backbone.pth is the target backbone, in the paper's plain form, and loads through checkpoints.py
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == steps[-1]["step"]
    state = load_backbone(str(out / "backbone.pth"))
    model = resnet18(in_chans=1)
    model.load_state_dict(state)
    for k, v in state.items():
        assert torch.equal(v, ckpt["model"]["target_backbone." + k])
    assert not torch.equal(state["conv1.weight"], ckpt["model"]["backbone.conv1.weight"])  # target != online
    after_one = torch.load(out / "backbone_ep001.pth", weights_only=True)  # the copy kept after epoch 1
    assert not torch.equal(after_one["conv1.weight"], state["conv1.weight"])
    initial = torch.load(out / "backbone_ep000.pth", weights_only=True)  # before any training
    assert not torch.equal(initial["conv1.weight"], after_one["conv1.weight"])
    assert [e["lr"] > 0 and e["proj_std"] > 0 for e in epochs] == [True, True]  # what curves.svg draws


def test_resume_continues_exactly(tiny_acdc, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(tiny_acdc, whole)
    run(tiny_acdc, split, "--stop-after", "3")            # interrupted in the middle of epoch 0
    assert max(step_losses(split)) == 3
    first = torch.load(split / "checkpoint.pt", weights_only=True).get("partial") or {"time_s": 0}
    run(tiny_acdc, split, "--resume", "auto")
    assert step_losses(split) == step_losses(whole)       # every loss after resuming, bit for bit
    # epoch 0's line covers the whole epoch: an uninterrupted run's loss and steps, both invocations' time
    a, b = epoch_line(whole, 0), epoch_line(split, 0)
    assert (b["loss"], b["steps"]) == (a["loss"], a["steps"])
    assert b["time_s"] > first["time_s"] > 0 and b["images_per_s"] * b["time_s"] == pytest.approx(b["steps"] * 8)
    a = torch.load(whole / "backbone.pth", weights_only=True)
    b = torch.load(split / "backbone.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_paper_inputs_reach_the_network(tiny_acdc, tmp_path, monkeypatch):
    seen = []

    def recording(*args, **kw):  # the views the network is fed
        views = augment.augment(*args, **kw)
        seen.append(views)
        return views
    monkeypatch.setattr(train_pretrain, "augment", recording)
    out = tmp_path / "run"
    run(tiny_acdc, out, "--paper-inputs", "--epochs", "1", "--stop-after", "2")
    mean, std = normalisation.paper_scale()  # the paper's Normalize(67.27, 84.66) after ToTensor's / 255
    values = torch.cat(seen) * std + mean
    assert len(seen) == 4 and values.min() > -0.01 and values.max() < 255.01  # uint8 grey levels (x mod 256)
    assert torch.allclose(values, values.round(), atol=1e-2) and values.std() > 10
    config = json.load(open(out / "config.json"))
    assert config["args"]["paper_inputs"] and config["inputs"].startswith("the paper's")
    assert (config["mean"], config["std"]) == (mean, std)
    cine_only = byol_slices(tiny_acdc)
    frames = slices.LabelledSlices(tiny_acdc, "train", cache_dir=os.path.join(tiny_acdc, "cache"))
    assert config["slices"] == len(cine_only) + len(frames)  # the ED and ES frames twice
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["mean"], ckpt["std"], ckpt["inputs"]) == (mean, std, config["inputs"])
    with pytest.raises(SystemExit):
        train_pretrain.parse_args(["--data", "d", "--paper-inputs", "--norm", "data"])


def test_a_finished_run_is_not_overwritten(tiny_acdc, tmp_path):
    run(tiny_acdc, tmp_path / "run", "--epochs", "1")
    with pytest.raises(SystemExit, match="holds another run"):
        run(tiny_acdc, tmp_path / "run", "--epochs", "1")


def test_norm_paper_is_refused_with_the_way_to_the_paper_inputs(capsys):
    with pytest.raises(SystemExit) as refused:
        train_pretrain.parse_args(["--data", "d", "--norm", "paper"])
    assert refused.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --norm paper is the paper's fine-tuning scale; for its pretraining inputs use --paper-inputs")


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--data"):
        run(str(tmp_path / "nowhere"), tmp_path / "run")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_acdc, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = byol.byol_loss

    def poisoned(p, z):  # two calls a step: NaN from the second step of the second epoch on
        calls["n"] += 1
        return real(p, z) * (float("nan") if calls["n"] > 2 * (steps_per_epoch + 1) else 1)
    steps_per_epoch = len(byol_slices(tiny_acdc)) // 8
    monkeypatch.setattr(byol, "byol_loss", poisoned)
    with pytest.raises(SystemExit) as stop:
        run(tiny_acdc, tmp_path / "run")
    assert stop.value.code == 1
    assert f"non-finite loss at epoch 2, step {steps_per_epoch + 1}" in capsys.readouterr().err  # counted from 1
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the first epoch's end


def byol_slices(data):
    return slices.UnlabelledSlices(data, split="train", cache_dir=os.path.join(data, "cache"))


WRAPPER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import train_pretrain
net = train_pretrain.main(train_pretrain.parse_args(sys.argv[1:]))
torch.save({{k: v for k, v in net.named_parameters()}}, os.path.join({out!r}, "params_rank%s.pt" % os.environ["RANK"]))
"""


def test_torchrun_two_processes_on_cpu(tiny_acdc, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER.format(root=ROOT, out=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
           *tiny_args(tiny_acdc, out, "--epochs", "1")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    a = torch.load(tmp_path / "params_rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "params_rank1.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # online and target alike
    config = json.load(open(out / "config.json"))
    assert config["world_size"] == 2
    epochs = [json.loads(line) for line in open(out / "log.jsonl") if '"steps"' in line]
    assert len(epochs) == 1                                # rank 0 alone writes
    assert sorted(os.listdir(out)) == ["backbone.pth", "checkpoint.pt", "config.json", "curves.svg", "log.jsonl"]


FAILING = """
import os, sys
sys.path.insert(0, {root!r})
import byol, train_pretrain
if os.environ["RANK"] == "1":
    def broken(p, z):
        raise RuntimeError("rank 1 broke")
    byol.byol_loss = broken
train_pretrain.main(train_pretrain.parse_args(sys.argv[1:]))
"""


def test_an_error_on_one_rank_ends_the_whole_job(tiny_acdc, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
           *tiny_args(tiny_acdc, tmp_path / "ddp", "--epochs", "1")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)  # a hang fails here
    assert done.returncode != 0
    assert "RuntimeError: rank 1 broke" in done.stderr   # the failing rank's traceback reaches the user


SIGNALLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import run_folder, train_pretrain
real, calls = train_pretrain.train_step, [0]
def step_then_signal(*args):  # rank 1 alone is told to stop, during its second step
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args)
train_pretrain.train_step = step_then_signal
train_pretrain.main(train_pretrain.parse_args(sys.argv[1:]))
print("rank", os.environ["RANK"], "steps", calls[0], "exit", run_folder.exit_status)
sys.exit(run_folder.exit_status)  # as the script's __main__ does
"""


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_acdc, tmp_path):
    script, out = tmp_path / "signalled.py", tmp_path / "ddp"
    script.write_text(SIGNALLED.format(root=ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
           *tiny_args(tiny_acdc, out, "--epochs", "1", "--log-every", "100")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    # every rank exits 75 (stopped, to be resumed), which torchrun reports as a failed child
    assert done.returncode != 0 and "exitcode  : 75" in done.stderr, done.stderr[-3000:]
    assert "rank 0 steps 2 exit 75" in done.stdout and "rank 1 steps 2 exit 75" in done.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
