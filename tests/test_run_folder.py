"""run_folder.py: the run folder's lock (one owner, stale locks taken over), log truncation on resume,
and, through train_segment.py, what the folder rules protect: an old run from a typo, a run from
a resume with other flags, a folder from a second process, a checkpoint from a killed save; a
training in its own process group stopped by Ctrl-C or Slurm's SIGTERM, loader workers included."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import pictures
import results
import run_folder
import train_segment
from checkpoints import CheckpointError
from test_train_segment import records, run


def write_lock(folder, **owner):
    os.makedirs(folder, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01 00:00:00",
              "heartbeat": time.time(), **owner}
    with open(os.path.join(folder, run_folder.LOCK), "w") as f:
        json.dump(record, f)


@pytest.fixture
def other_process():
    """a live process that is not this one, to own a lock"""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_second_run_in_the_same_folder_is_refused(tiny_acdc, tmp_path, other_process):
    out = tmp_path / "run"
    write_lock(out, pid=other_process)
    with pytest.raises(SystemExit, match=rf"--out {out} is in use by another run: host .*, process {other_process}"):
        run(tiny_acdc, out)
    assert os.listdir(out) == [run_folder.LOCK]  # nothing of the second run was written


def test_a_stale_lock_is_taken_over_with_a_notice(tiny_acdc, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "a", pid=dead.pid)  # its process is gone
    write_lock(tmp_path / "b", host="another-node", pid=1, heartbeat=time.time() - run_folder.STALE_S - 5)
    for folder in ("a", "b"):
        run_folder.lock(str(tmp_path / folder))
        owner = json.load(open(tmp_path / folder / run_folder.LOCK))
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        run_folder.unlock(str(tmp_path / folder))
        assert not os.path.exists(tmp_path / folder / run_folder.LOCK)
    out = capsys.readouterr().out
    assert f"process {dead.pid} is gone" in out and "no heartbeat for" in out
    write_lock(tmp_path / "c", host="another-node", pid=1)  # alive by its heartbeat: not taken
    with pytest.raises(SystemExit, match="in use by another run: host another-node"):
        run_folder.lock(str(tmp_path / "c"))


OLD, UNREADABLE = "no heartbeat for", "unreadable lock file"


@pytest.mark.parametrize("record, reason", [
    ({"heartbeat": time.mktime((2023, 1, 1, 0, 0, 0, 0, 0, -1))}, OLD),  # pid 1 lives: another process by now
    ({"heartbeat": float("nan")}, OLD), ({"pid": "abc"}, UNREADABLE), ({"pid": ...}, UNREADABLE),
    ({"pid": 1.0}, UNREADABLE), ({"heartbeat": "2026-01-01"}, UNREADABLE), ({"host": None}, UNREADABLE),
    ([1], UNREADABLE)])
def test_an_old_or_malformed_lock_record_holds_no_folder(tmp_path, capsys, record, reason):
    if isinstance(record, dict):  # over a record that would hold: this host, pid 1 (alive), a fresh heartbeat
        record = {"host": socket.gethostname(), "pid": 1, "started": "2023-01-01", "heartbeat": time.time(), **record}
        record = {k: v for k, v in record.items() if v is not ...}  # ...: no such key
    (tmp_path / run_folder.LOCK).write_text(json.dumps(record))
    assert run_folder.try_lock(str(tmp_path)) is None
    assert json.load(open(tmp_path / run_folder.LOCK))["pid"] == os.getpid()
    run_folder.unlock(str(tmp_path))
    assert f"notice: taking over the stale lock of {tmp_path} ({reason}" in capsys.readouterr().out


def test_the_lock_counts_its_holders(tmp_path):
    folder = str(tmp_path)
    run_folder.lock(folder)
    run_folder.lock(folder)  # the study runner holds it, training takes it again
    run_folder.unlock(folder)
    assert os.path.exists(tmp_path / run_folder.LOCK)
    run_folder.unlock(folder)
    assert not os.path.exists(tmp_path / run_folder.LOCK)


def test_a_typo_with_overwrite_leaves_the_old_run_intact(tiny_acdc, tmp_path):
    out = tmp_path / "run"
    run(tiny_acdc, out, "--epochs", "1")
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    with pytest.raises(CheckpointError, match="missing.pth"):
        run(tiny_acdc, out, "--epochs", "1", "--overwrite", "--weights", str(tmp_path / "missing.pth"))
    run_folder.unlock(str(out), completely=True)  # main() raised; run_main would have given it back
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before


def test_resume_refuses_flags_that_change_what_is_trained(tiny_acdc, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_acdc, out, "--label-fraction", "0.5", "--stop-after", "2")
    assert run_folder.exit_status == 75  # what the script exits with: stopped before its end
    with pytest.raises(SystemExit) as refused:
        run(tiny_acdc, out, "--resume", "auto", "--label-fraction", "1.0", "--loss", "dice")
    message = str(refused.value)
    assert "--label-fraction was 0.5, now 1.0" in message and "--loss was jaccard, now dice" in message
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")  # a folder holding another run
    with pytest.raises(SystemExit, match="holds another run .* would mix the two"):
        run(tiny_acdc, tmp_path / "other", "--resume", str(out / "checkpoint.pt"), "--label-fraction", "0.5")
    torch.save({"kind": "segmentation", "model": {}, "epoch": 0}, tmp_path / "best.pt")  # best.pt's form
    with pytest.raises(SystemExit, match="no optimizer state"):  # best.pt is not a checkpoint to resume
        run(tiny_acdc, tmp_path / "third", "--resume", str(tmp_path / "best.pt"))
    # how it runs may change; so may the data's place (a copy on local scratch): it is the same data
    run(tiny_acdc, out, "--resume", "auto", "--label-fraction", "0.5", "--log-every", "2", "--workers", "1")
    config = json.load(open(out / "config.json"))
    assert config["args"]["log_every"] == 2 and config["experiment"]["label_fraction"] == 0.5
    assert run_folder.exit_status == 0  # finished


def test_resume_removes_what_a_killed_save_left_redone_log_lines_and_a_torn_one(tiny_acdc, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_acdc, out, "--stop-after", "3")
    (out / ".tmp99999.checkpoint.pt").write_bytes(b"\0" * 1000)  # a save killed mid-way
    with open(out / "log.jsonl", "a") as f:  # steps logged after the checkpoint, then killed during an append
        f.write(json.dumps({"epoch": 0, "step": 4, "loss": 9.0, "lr": 0.1, "images_per_s": 1.0}) + "\n")
        f.write('{"epoch": 0, "step": 5, "lo')
    run(tiny_acdc, out, "--resume", "auto")
    assert f"notice: {out}/log.jsonl: its last line is torn (an append cut short): left out" in capsys.readouterr().out
    assert not any(name.startswith(".tmp") for name in os.listdir(out))
    steps = [r["step"] for r in records(out) if "steps" not in r]
    assert steps == sorted(set(steps)) and 9.0 not in [r["loss"] for r in records(out)]


def test_a_signal_stops_a_single_process_after_the_current_step(tiny_acdc, tmp_path, monkeypatch):
    real, calls = train_segment.train_step, {"n": 0}

    def step_then_signal(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), 15)  # SIGTERM during step 2
        return real(*args)
    monkeypatch.setattr(train_segment, "train_step", step_then_signal)
    run(tiny_acdc, tmp_path / "run", "--log-every", "100")  # no logging interval to wait for
    assert calls["n"] == 2
    assert max(r["step"] for r in records(tmp_path / "run") if "step" in r) == 2


def test_after_one_ctrl_c_the_next_ends_the_process_at_once():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGINT, lambda *_: None)  # (what StopSignal must replace)
        stop = run_folder.StopSignal()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # the system's: it ends
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signalled_in_their_group(commands, tmp_path):
    """start each (signal, argv, folder) as `python argv` in its own process group (a terminal's foreground
    job, a Slurm job step); once a log.jsonl under folder has a line (a step done), send the signal to the
    whole group, loader workers included -> [(exit status, output)]"""
    started = []
    for i, (sig, argv, folder) in enumerate(commands):
        output = open(tmp_path / f"output{i}.txt", "w+")
        started.append((subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                          env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True),
                        output, sig, folder))
    waiting, deadline = list(started), time.time() + 300
    try:
        while waiting and time.time() < deadline:
            for item in [w for w in waiting if w[0].poll() is not None
                         or any(p.stat().st_size for p in w[3].rglob("log.jsonl"))]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(item[0].pid, item[2])
                waiting.remove(item)
            time.sleep(0.02)
        outcomes = []
        for proc, output, _, _ in started:
            proc.wait(timeout=max(1, deadline - time.time()))
            output.seek(0)
            outcomes.append((proc.returncode, output.read()))
        return outcomes
    finally:
        for proc, *_ in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_or_sigterm_to_the_process_group_stops_a_training_after_its_step(phantom, tmp_path):
    def train(name):
        return ["train_segment.py", "--data", phantom, "--out", str(tmp_path / name), "--arch", "resnet18",
                "--size", "32", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1", "--workers", "1",
                "--log-every", "1", "--device", "cpu", "--val-batch-size", "8", "--min-size", "0"]
    outcomes = signalled_in_their_group([(signal.SIGINT, train("int"), tmp_path / "int"),
                                         (signal.SIGTERM, train("term"), tmp_path / "term")], tmp_path)
    for name, (status, output) in zip(("int", "term"), outcomes):
        assert status == 75 and "Traceback" not in output and "DataLoader worker" not in output, output
        assert re.search(rf"\nstopped at step [1-5]: {tmp_path / name}/checkpoint.pt written; to continue, run "
                         rf"again with --resume auto\n$", output), output
        assert os.path.exists(tmp_path / name / "checkpoint.pt")


def test_log_truncation_keeps_what_the_checkpoint_holds(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [{"epoch": 0, "step": 1}, {"epoch": 0, "step": 2}, {"epoch": 0, "steps": 2},
             {"epoch": 1, "step": 3}, {"epoch": 1, "step": 4}, {"epoch": 1, "steps": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    run_folder.truncate_log(str(path), step=3, epoch=1)  # stopped after step 3, in epoch 1
    assert [json.loads(line) for line in open(path)] == lines[:4]


def test_a_torn_last_log_line_is_left_out_with_a_notice_and_truncation_removes_it(tmp_path, capsys):
    lines = [{"epoch": 0, "step": 1, "loss": 1.0}, {"epoch": 0, "steps": 1, "loss": 1.0, "val_iou": 0.5},
             {"epoch": 1, "step": 2, "loss": 0.5}, {"epoch": 1, "steps": 1, "loss": 0.5, "val_iou": 0.6}]
    whole = "".join(json.dumps(r) + "\n" for r in lines)
    (tmp_path / "log.jsonl").write_text(whole + '{"epoch": 2, "st')  # a kill or a full disk during an append
    notice = f"notice: {tmp_path}/log.jsonl: its last line is torn (an append cut short): left out\n"
    pictures.draw_curves(str(tmp_path), "torn", [("loss", "loss"), ("val_iou", "IoU")])
    assert os.path.exists(tmp_path / "curves.svg") and capsys.readouterr().out == notice
    assert results.epoch_lines(str(tmp_path)) == lines[1::2] and capsys.readouterr().out == notice
    run_folder.truncate_log(str(tmp_path / "log.jsonl"), step=2, epoch=2)  # what resuming does
    assert (tmp_path / "log.jsonl").read_text() == whole and capsys.readouterr().out == notice
    assert results.epoch_lines(str(tmp_path)) == lines[1::2] and capsys.readouterr().out == ""


RACER = """
import sys, time
sys.path.insert(0, {root!r})
import run_folder
real = run_folder.read_owner
def slow(path):  # widen the window between reading a stale record and acting on it
    owner = real(path)
    time.sleep(0.2)
    return owner
run_folder.read_owner = slow
got = run_folder.try_lock({folder!r}) is None
time.sleep(1.5)  # hold it while the others try
print("owner" if got else "refused", flush=True)
"""


def test_of_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "run", pid=dead.pid)
    code = RACER.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), folder=str(tmp_path / "run"))
    racers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = [r.communicate(timeout=120)[0].split()[-1] for r in racers]
    assert sorted(outcomes) == ["owner", "refused", "refused"], outcomes
