"""training.py: the schedule, the run folder rules, atomic writes, RNG round trip, fault detection."""
import argparse
import math
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

import distributed
import files
import progress
import run_folder
import slices
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_warmup_cosine_values():
    lr = lambda s: training.warmup_cosine(s, total_steps=110, warmup_steps=10, base_lr=1.0, start_lr=0.1)
    assert lr(0) == pytest.approx(0.1)
    assert lr(5) == pytest.approx(0.55)                    # halfway up the linear warmup
    assert lr(10) == pytest.approx(1.0)                    # peak right after the warmup
    assert lr(60) == pytest.approx(0.5)                    # halfway down the cosine
    assert lr(110) == pytest.approx(0.0, abs=1e-12)
    assert lr(200) == pytest.approx(0.0, abs=1e-12)        # clamped past the end
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))  # decays monotonically


def test_prepare_run_refuses_another_run(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    args = lambda resume=None, overwrite=False: argparse.Namespace(  # noqa: E731
        out=out, resume=resume, overwrite=overwrite, trust_checkpoint=False)
    assert run_folder.prepare_run(args(), "byol", {}) is None  # a new folder is fine
    files.write_json(os.path.join(out, "config.json"), {"a": 1})
    with pytest.raises(SystemExit, match="holds another run"):
        run_folder.prepare_run(args(), "byol", {})
    assert run_folder.prepare_run(args("auto"), "byol", {}) is None  # nothing to resume yet
    ckpt = {"kind": "byol", "optimizer": {}, "config": {"experiment": {"seed": 0}}, "epoch": 1, "step": 3}
    files.save_atomic(ckpt, os.path.join(out, "checkpoint.pt"))
    assert run_folder.prepare_run(args("auto"), "byol", {"seed": 0})["step"] == 3
    files.save_atomic({"x": torch.zeros(1)}, os.path.join(out, "best.pt"))
    assert run_folder.prepare_run(args(overwrite=True), "byol", {}) is None  # --overwrite: allowed ...
    assert "best.pt" in os.listdir(out)  # ... but nothing is removed until the new run writes its own
    run_folder.begin(out, {"b": 2}, None)
    assert sorted(os.listdir(out)) == ["config.json", "run.lock"]
    with pytest.raises(SystemExit, match="not found"):
        run_folder.prepare_run(args(str(tmp_path / "missing.pt")), "byol", {})
    run_folder.unlock(out, completely=True)
    assert os.listdir(out) == ["config.json"]


def test_resume_auto_without_a_checkpoint_says_what_it_replaces(tmp_path, capsys):
    """a run killed before its first checkpoint: --resume auto starts afresh, in one line naming the files"""
    out = str(tmp_path / "run")
    os.makedirs(out)
    for name in ("config.json", "log.jsonl", "backbone_ep000.pth"):
        open(os.path.join(out, name), "w").close()
    args = argparse.Namespace(out=out, resume="auto", overwrite=False, trust_checkpoint=False)
    assert run_folder.prepare_run(args, "byol", {}) is None
    run_folder.unlock(out, completely=True)
    assert capsys.readouterr().out == (f"notice: --resume auto found no checkpoint.pt in {out} (a run stopped before "
                                       f"its first): starting afresh, replacing backbone_ep000.pth, config.json, "
                                       f"log.jsonl\n")


def test_save_atomic_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "c.pt")
    files.save_atomic({"w": torch.arange(3)}, path)
    assert os.listdir(tmp_path) == ["c.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    files.save_atomic(training.rng_state(g), str(tmp_path / "rng.pt"))
    expected = (random.random(), torch.rand(2), torch.rand(2, generator=g))
    state = torch.load(str(tmp_path / "rng.pt"), weights_only=True)  # plain containers and tensors only
    random.seed(99), torch.manual_seed(99), g.manual_seed(99)
    training.set_rng_state(state, g, rank=0)
    got = (random.random(), torch.rand(2), torch.rand(2, generator=g))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_health_finds_the_first_non_finite_step():
    health, scaler = training.Health(torch.device("cpu")), torch.amp.GradScaler("cpu", enabled=False)
    for step, value in enumerate([1.0, 2.0, math.nan, 3.0, math.inf]):
        health.watch(torch.tensor(value), step)
    with pytest.raises(FloatingPointError, match="epoch 5, step 2"):  # index 4: the fifth epoch
        health.check(torch.tensor(1.0), scaler, epoch=4)


def test_health_passes_finite_losses():
    health, scaler = training.Health(torch.device("cpu")), torch.amp.GradScaler("cpu", enabled=False)
    health.watch(torch.tensor(0.5), 0)
    assert health.check(torch.tensor(0.5), scaler, 0) == 0.5
    assert health.check(torch.tensor(0.25), scaler, 0) == 0.25


def test_health_stops_on_a_collapsed_fp16_scale():
    health = training.Health(torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** -3)  # what many skipped steps in a row leave
    with pytest.raises(FloatingPointError, match="loss scale collapsed"):
        health.check(torch.tensor(1.0), scaler, 7)


def test_epoch_sampler_orders_by_epoch_and_skips_what_was_seen():
    sampler = slices.SkipDoneSampler(torch.utils.data.DistributedSampler(range(10), num_replicas=1, rank=0, seed=3))
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != whole                       # another epoch, another order
    sampler.set_epoch(2, skip=4)
    assert list(sampler) == whole[4:] and len(sampler) == 6


def test_rank_without_torchrun_fails_at_once_naming_what_is_missing(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit, match="RANK is set .* but LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not"):
        distributed.setup("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1"), monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SystemExit, match="RANK 2 is not below WORLD_SIZE 2"):
        distributed.setup("cpu")


def test_process_group_set_up_times_out_naming_the_address():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import distributed; distributed.setup('cpu', dist_timeout=3)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"after waiting up to --dist-timeout 3 s for 2 ranks at 127.0.0.1:{port}" in done.stderr


@pytest.mark.parametrize("script, argv", [("train_pretrain", []), ("train_segment", ["--arch", "resnet18"]),
                                          ("evaluate", ["--checkpoint", "c.pt"])])
def test_forgetting_data_is_a_usage_error_naming_the_phantom_command(script, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        training.run_main(lambda a: None, __import__(script).parse_args(argv))
    err = capsys.readouterr().err.splitlines()[-1]
    assert e.value.code == 2 and "required: --data" in err and "`python phantom.py data/acdc-synth`" in err
    assert os.listdir(tmp_path) == []  # nothing created


def test_the_estimate_leaves_the_first_step_out_and_counts_validation(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 14.0, 14.0])  # start; after step 1 (compilation: 10 s); after step 3 (2 s a step)
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    run = training.Run(args=argparse.Namespace(batch_size=4, epochs=2), step=0, start_step=0, total_steps=100,
                       env=distributed.Env(0, 1, 0, torch.device("cpu"), True))
    estimate = progress.Estimate(run, validations=[50, 100], val_slices=12)
    for _ in range(3):
        run.step += 1
        estimate.step(end_of_epoch=False)
    # 100 steps x 2 s + 2 validations of 12 slices as forward passes (a third of 2 s / 4 slices each)
    assert capsys.readouterr().out == "estimated 3 min 24 s for 2 epochs (2.0 images/s on cpu)\n"
    clock = iter([16.0])  # one more step: 96 x 2 s and both validations left
    run.step += 1
    assert estimate.left() == "3 min 16 s"
