"""study.py on a tiny phantom: a BYOL pretraining and random weights, two label fractions, one seed,
the pretraining-length study at epoch 0 (the backbone before training); planned, stopped, reported half-done, finished by a
pool of two CPU processes, reported, and refused with other settings. Then, without training: impossible
settings, a damaged study.json, and a report over hand-damaged run files. Last, a study in its own process
group stopped by Ctrl-C or Slurm's SIGTERM."""
import csv
import json
import math
import os
import signal
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

import grid
import results
import study
from test_run_folder import signalled_in_their_group

SETTINGS = ["--strategies", "none,pretrain:none:1", "--fractions", "0.5,1", "--seeds", "0", "--lengths", "0",
            "--pretrain-args", "--size 32 --batch-size 8 --warmup-epochs 1 --log-every 5"]
TRAIN = ["--arch", "resnet18", "--size", "32", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1",
         "--workers", "0", "--log-every", "5", "--device", "cpu", "--min-size", "0", "--val-batch-size", "8"]


def test_a_tiny_study_from_plan_to_report(tiny_acdc, tmp_path, capfd):
    folder = str(tmp_path / "study")

    def study_py(command, *extra, train=TRAIN):
        argv = [command, "--study", folder, "--data", tiny_acdc, *SETTINGS, *extra, "--", *train]
        return study.main(study.parse_args(argv))

    # the plan: the pretraining first, 2 x 2 fine-tunings, 1 of the length study
    assert study_py("plan") == 0
    out = capfd.readouterr().out
    assert "6 entries: " in out and out.index("pretraining pretrain:none:1") < out.index("none, fraction 0.5")
    assert study_py("plan", "--count") == 0 and capfd.readouterr().out == "6 1\n"  # for sbatch --array
    entries = grid.plan(folder, study.settings_of(study.parse_args(["plan", "--study", folder])))
    assert [e.kind for e in entries] == ["pretrain"] + ["finetune"] * 5
    waiting = next(i for i, e in enumerate(entries) if e.needs is not None)
    assert study_py("run", "--index", str(waiting)) == study.WAITING  # its pretraining is not done

    # one run, stopped after 2 steps (as a time limit would): partial, then a report of what there is
    first = entries.index(next(e for e in entries if e.strategy == "none" and e.fraction == 0.5))
    assert study_py("run", "--index", str(first), train=TRAIN + ["--stop-after", "2"]) == study.WAITING
    assert grid.state(entries[first]) == "partial"
    assert study_py("report") == 0
    assert "## Not finished" in open(os.path.join(folder, "results.md")).read()
    assert len(list(csv.DictReader(open(os.path.join(folder, "results.csv"))))) == 0

    # a pool of two processes does the rest, resuming the stopped run
    assert study_py("run", "--gpus", "cpu,cpu") == 0
    assert all(grid.state(e) == "done" for e in entries)
    assert "resumed from" in open(os.path.join(entries[first].folder, "output.log")).read()
    assert not os.path.exists(os.path.join(entries[first].folder, "checkpoint.pt"))  # --keep best-fp16
    capfd.readouterr()
    assert study_py("run") == 0  # nothing left to do
    assert "starting" not in capfd.readouterr().out

    # the report: one row per run, equal to its metrics.json; plots with one series per strategy
    assert study_py("report") == 0
    rows = list(csv.DictReader(open(os.path.join(folder, "results.csv"))))
    assert list(rows[0]) == ["strategy", "weights", "fraction", "distinct_train_slices", "seed", "epochs", "steps",
                             "best_val_iou", "best_epoch", "epochs_to_90", "epochs_to_95",
                             "test_iou_with_background", "test_iou_structures", "dice_RV", "dice_MYO", "dice_LV",
                             "hd95_RV", "hd95_MYO", "hd95_LV", "mean_dice", "wall_s", "step_s"]
    assert len(rows) == 5
    for row, entry in zip(rows, [e for e in entries if e.kind == "finetune"]):
        metrics = json.load(open(os.path.join(entry.folder, "test", "metrics.json")))
        assert float(row["mean_dice"]) == pytest.approx(metrics["mean_dice_structures"], rel=1e-5)
        assert float(row["test_iou_with_background"]) == pytest.approx(
            metrics["paper_slice_iou"]["mean_iou_with_background"], rel=1e-5)
        assert float(row["wall_s"]) > float(row["step_s"]) > 0
        epochs = [json.loads(line) for line in open(os.path.join(entry.folder, "log.jsonl")) if '"val_iou"' in line]
        best = max(epochs, key=lambda r: r["val_iou"])  # log.jsonl's "epoch" is 0-based, a person's count is not
        assert int(row["best_epoch"]) == best["epoch"] + 1 and 1 <= int(row["epochs_to_95"]) <= int(row["epochs"])
    ns = "{http://www.w3.org/2000/svg}"
    for name, series in (("data_efficiency.svg", 2 * 2), ("convergence.svg", 2 * 2), ("pretraining_length.svg", 2)):
        # two panels each (test IoU and Dice; the two fractions; test IoU and epochs to 95%)
        root = ET.parse(os.path.join(folder, name)).getroot()
        names = [s.get("data-name") for s in root.iter(f"{ns}polyline") if s.get("class") == "series"]
        assert len(names) == series and set(names) <= {"none", "pretrain:none:1"}, name
    text = open(os.path.join(folder, "results.md")).read()
    assert "## Pretraining length" in text and "Not finished" not in text

    # other settings in the same study folder are refused, naming the flag
    with pytest.raises(SystemExit, match="--seeds"):
        study_py("plan", "--seeds", "0,1")


def test_a_strategy_whose_weights_cannot_be_fetched_is_skipped_with_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    settings = {"strategies": ["none", "resnet50_byol_imagenet2012.pth.tar", "supervised_imagenet",
                               "pretrain:resnet50_byol_imagenet2012.pth.tar:2"],
                "fractions": [1.0], "seeds": [0], "lengths": [], "length_fractions": [1.0], "length_seeds": [13]}
    entries = grid.plan(str(tmp_path / "study"), settings)
    # ImageNet: fetched when run; the Google Drive file: never, nor is a pretraining from it or its fine-tuning
    assert [grid.state(e) for e in entries] == ["unavailable", "to do", "unavailable", "to do", "unavailable"]
    entries = entries[1:]
    assert "drive.google.com" in grid.missing_weights(entries[1])
    monkeypatch.setenv("SSL_MEDSEG_OFFLINE", "1")
    assert grid.state(entries[2]) == "unavailable"
    study.show_plan(entries)
    assert "skipped: supervised_imagenet: not in the cache and downloads are off" in capfd.readouterr().out


@pytest.mark.parametrize("flag, value, shown", [
    ("--fractions", "0.5,0", "0"), ("--fractions", "2", "2"), ("--fractions", "-0.5", "-0.5"),
    ("--fractions", "nan", "nan"), ("--length-fractions", "inf", "inf"), ("--seeds", "0,-1", "-1"),
    ("--length-seeds", "-13", "-13"), ("--lengths", "-1", "-1"), ("--strategies", "none,pretrain:none:-5",
                                                                 "pretrain:none:-5"),
    ("--strategies", "pretrain:none:0", "pretrain:none:0"), ("--strategies", "pretrain:none", "pretrain:none"),
    ("--pretrain-args", "--size 30 --lr 0.1", "'--size 30 --lr 0.1': argument --size")])
def test_impossible_settings_are_refused_before_study_json_is_written(tmp_path, capsys, flag, value, shown):
    for command in ("plan", "run"):
        with pytest.raises(SystemExit) as refused:
            study.main(study.parse_args([command, "--study", str(tmp_path), "--data", str(tmp_path / "no-data"),
                                         flag, value]))
        assert refused.value.code == 2
        assert f"error: argument {flag}: {shown}" in capsys.readouterr().err.splitlines()[-1]
    assert not os.path.exists(tmp_path / "study.json")


@pytest.mark.parametrize("text, error", [('{"data": "/d", "strat', "Unterminated string"), ("", "Expecting value"),
                                         ("[]", "expected a JSON object")])
def test_a_damaged_study_json_is_named_with_how_to_write_it_again(tmp_path, text, error):
    (tmp_path / "study.json").write_text(text)
    for command in ("plan", "report"):
        with pytest.raises(SystemExit, match=error) as refused:
            study.main(study.parse_args([command, "--study", str(tmp_path), "--data", str(tmp_path)]))
        message = str(refused.value.code)
        assert message.startswith(f"error: {tmp_path / 'study.json'}: ") and "run `study.py plan`" in message


def fake_run(folder, seed):
    """a finished fine-tuning's files, as train_segment.py, evaluate.py and study.py write them"""
    os.makedirs(os.path.join(folder, "test"))

    def write(name, obj):
        with open(os.path.join(folder, name), "w") as f:
            f.write(json.dumps(obj))
    structure = {"dice": {"mean": 0.8}, "hd95": {"mean": 2.0}}
    write("config.json", {"args": {"weights": "none", "label_fraction": 1.0, "seed": seed, "epochs": 2},
                          "train_slices": 8, "total_steps": 4})
    write("test/metrics.json", {"challenge": {p: dict.fromkeys(("RV", "MYO", "LV"), structure) for p in ("ED", "ES")},
                                "paper_slice_iou": {"mean_iou_with_background": 0.9, "mean_iou_structures": 0.7},
                                "mean_dice_structures": 0.8})
    write("timing.json", {"wall_s": 2.0, "step_s": 1.0})
    write("result.json", {"kind": "finetune", "strategy": "none"})
    lines = [{"epoch": 0, "step": 1, "loss": 1.0}] + [{"epoch": e, "steps": 2, "val_iou": 0.5 + e / 10} for e in (0, 1)]
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))


def test_report_skips_each_run_with_a_damaged_file_and_reports_the_others(tmp_path, capsys):
    folder = tmp_path / "study"
    damage = {1: ("test/metrics.json", '{"challenge": {"ED"'), 2: ("test/metrics.json", ""),
              3: ("test/metrics.json", "[]"), 4: ("test/metrics.json", None), 5: ("timing.json", '{"wall_s": 2'),
              6: ("timing.json", ""), 7: ("timing.json", "[]"), 8: ("timing.json", None), 9: ("config.json", "{"),
              10: ("config.json", None), 11: ("log.jsonl", '{"epo\n{"epoch": 1, "steps": 2}\n'),
              12: ("log.jsonl", None)}  # 0 and 13 intact, but 13's log has a torn last line
    os.makedirs(folder)
    (folder / "study.json").write_text(json.dumps({"data": str(tmp_path), "strategies": ["none"], "fractions": [1.0],
                                                   "seeds": list(range(14))}))
    for seed in range(14):
        fake_run(folder / "runs" / "none" / "fraction-1" / f"seed-{seed}", seed)
        name, text = damage.get(seed, (None, None))
        path = folder / "runs" / "none" / "fraction-1" / f"seed-{seed}" / str(name)
        if name and text is None:
            os.remove(path)
        elif name:
            path.write_text(text)
    with open(folder / "runs" / "none" / "fraction-1" / "seed-13" / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "steps": 2, "val_i')  # torn by a kill: left out, the run reported

    assert study.main(study.parse_args(["report", "--study", str(folder)])) == 1
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(skipped) == len(damage)
    for line, (seed, (name, _)) in zip(skipped, sorted(damage.items())):
        assert line.startswith(f"skipped none, fraction 1, seed {seed}: {folder}/runs/none/fraction-1/seed-{seed}/"
                               f"{name}: ")
    assert f"notice: {folder}/runs/none/fraction-1/seed-13/log.jsonl: its last line is torn" in out
    assert out.splitlines()[-1] == "2 finished runs, 12 skipped for a damaged file (named above)"
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert [r["seed"] for r in rows] == ["0", "13"] and rows[1]["best_val_iou"] == "0.6"

    os.remove(folder / "results.csv")
    os.mkdir(folder / "results.csv")
    with pytest.raises(SystemExit, match=f"error: the report cannot be written in {folder}: .*results.csv"):
        study.main(study.parse_args(["report", "--study", str(folder)]))


def test_a_run_that_learned_nothing_has_no_convergence_numbers():
    """a best validation IoU of 0 reached nothing: n/a, not '1.0 epochs to 95 %' and 'speed-up 1.00 x'"""
    assert math.isnan(results.epochs_to([(1, 0.0), (2, 0.0)], 0.95))
    assert results.epochs_to([(1, 0.2), (2, 0.5)], 0.95) == 2
    row = {"strategy": "none", "fraction": 1.0, "seed": 0, "best_val_iou": 0.0, "epochs_to_95": float("nan"),
           "pretrain_epochs": None, "test_iou_with_background": 0.5, "mean_dice": 0.5, "wall_s": 1.0, "step_s": 1.0}
    text = results.markdown([row, {**row, "strategy": "other", "best_val_iou": 0.5, "epochs_to_95": 3}], [],
                            "t", "none", 1.0)
    convergence = text[text.index("## Convergence"):]
    line = next(t for t in convergence.splitlines() if t.startswith("| none"))
    assert "n/a" in line and "1.0" not in line and "1.00 x" not in text


def test_ctrl_c_or_sigterm_to_the_process_group_stops_a_study_after_the_step(phantom, tmp_path):
    train = ["--arch", "resnet18", "--size", "32", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1",
             "--workers", "1", "--log-every", "1", "--device", "cpu", "--min-size", "0", "--val-batch-size", "8"]

    def study_py(name):
        return ["study.py", "run", "--study", str(tmp_path / name), "--data", phantom, "--strategies", "none",
                "--fractions", "1", "--seeds", "0", "--", *train]
    outcomes = signalled_in_their_group([(signal.SIGINT, study_py("int"), tmp_path / "int"),
                                         (signal.SIGTERM, study_py("term"), tmp_path / "term")], tmp_path)
    for name, (status, output) in zip(("int", "term"), outcomes):
        run = tmp_path / name / "runs" / "none" / "fraction-1" / "seed-0"
        assert status == 75 and "Traceback" not in output, output
        assert output.endswith("stopped (a signal or --stop-after): run the same command again to continue\n")
        assert "to continue, run again with --resume auto" in (run / "output.log").read_text()
        assert (run / "checkpoint.pt").exists() and not (run / "failed.txt").exists()


def test_plan_marks_the_paper_grid_and_what_the_study_adds(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    settings = {**grid.DEFAULTS, "strategies": ["none", "supervised_imagenet"], "fractions": [0.1, 0.3],
                "seeds": [0]}
    study.show_plan(grid.plan(str(tmp_path / "study"), settings))
    out = capsys.readouterr().out
    for line in ("added none, fraction 0.1, seed 0", "added none, fraction 0.3, seed 0",
                 "paper supervised_imagenet, fraction 0.1, seed 0",
                 "added supervised_imagenet, fraction 0.3, seed 0"):  # 0.3: not one of the paper's fractions
        assert f"to do       {line}  " in out


def test_lengths_paper_are_the_paper_labels_plus_one_and_the_report_prints_both(tmp_path, capsys):
    lengths = study.parse_args(["plan", "--study", str(tmp_path), "--data", "d", "--lengths", "paper"]).lengths
    assert lengths == [*range(1, 12), 13, 15, 17, 19, 21, 23, 25, 26, 51, 101, 201, 301, 401]
    folder = tmp_path / "study"
    os.makedirs(folder)
    (folder / "study.json").write_text(json.dumps({"data": str(tmp_path), "strategies": ["pretrain:none:26"],
                                                   "fractions": [1.0], "seeds": [0], "lengths": [26]}))
    run = next(e for e in grid.plan(str(folder), {**grid.DEFAULTS, **json.loads((folder / "study.json").read_text())})
               if e.kind == "finetune" and e.pretrain_epochs == 26)
    fake_run(run.folder, 13)
    assert study.main(study.parse_args(["report", "--study", str(folder)])) == 0
    assert "| pretrain:none:26 | 26 | ep=25 |" in (folder / "results.md").read_text()  # the paper's ep=25


def test_evaluation_is_ieee_fp32_and_pretraining_gets_only_its_own_norm(tmp_path, monkeypatch):
    evaluated = []
    monkeypatch.setattr(study.train_segment, "main", lambda args: None)
    monkeypatch.setattr(study, "finished", lambda folder, epochs: True)
    monkeypatch.setattr(study.evaluate, "main", evaluated.append)
    entry = grid.Entry("finetune", "none", 1.0, 0, str(tmp_path / "run"), "none", None, None)
    s = {"data": str(tmp_path), "train_args": ["--amp", "bf16"], "lengths": [], "pretrain_args": ""}
    assert study.execute(entry, s, SimpleNamespace(device=None, keep="all"), "[0/1]") == "done"
    assert (evaluated[0].amp, evaluated[0].tf32) == ("off", "off")  # not the fine-tuning's bf16
    pretraining = grid.Entry("pretrain", "pretrain:none:2", None, None, str(tmp_path / "p"), "none", None, 2)
    s["train_args"] = ["--norm", "paper"]
    assert "--norm" not in study.train_args(pretraining, s, None)  # paper: the fine-tuning's scale alone
    s["train_args"] = ["--norm", "data"]
    assert " --norm data " in " ".join(study.train_args(pretraining, s, None)) + " "


def test_data_is_required_unless_study_json_records_it(tmp_path, capsys):
    for command in ("plan", "run"):
        with pytest.raises(SystemExit) as refused:
            study.parse_args([command, "--study", str(tmp_path)])
        assert refused.value.code == 2 and "python phantom.py data/acdc-synth" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    (tmp_path / "study.json").write_text(json.dumps({"data": str(tmp_path)}))
    assert study.parse_args(["plan", "--study", str(tmp_path)]).data is None  # study.json's is used


def test_the_estimate_adds_pretrainings_and_evaluations(tiny_acdc, tmp_path, monkeypatch):
    # an hour a fine-tuning step, two a pretraining step: the figure in hours counts the steps
    monkeypatch.setattr(study.bench, "seconds_per_step", lambda mode, *a: (7200.0 if mode == "pretrain" else 3600.0,
                                                                           "cpu"))
    args = study.parse_args(["plan", "--study", str(tmp_path), "--data", tiny_acdc, "--strategies", "pretrain:none:3",
                             "--fractions", "1", "--seeds", "0", "--pretrain-args", "--batch-size 4", "--",
                             "--batch-size", "8", "--epochs", "2"])
    s = study.settings_of(args)
    text = study.estimate(grid.plan(str(tmp_path), s), s, "cpu")
    fine_tuning = 2 * (grid.count_slices(tiny_acdc) // 8) + grid.count_slices(tiny_acdc, "test") / 8 / 3
    pretraining = 2 * 3 * (grid.count_slices(tiny_acdc, cine=True) // 4)
    assert f"1 pretrainings, 1 fine-tunings and their evaluations, {fine_tuning + pretraining:.1f} h of steps" in text


def test_a_full_disk_fails_the_run_in_one_line_and_stops_the_study(tiny_acdc, tmp_path, monkeypatch, capsys):
    """ENOSPC during a run's training: reported failed, its checkpoint and log kept, no next run, exit 1"""
    trained = []

    def full_disk(args):  # the run got as far as a checkpoint and a log, then the disk filled
        trained.append(args.out)
        for name in ("checkpoint.pt", "log.jsonl"):
            open(os.path.join(args.out, name), "w").close()
        raise OSError(28, "No space left on device", os.path.join(args.out, "best.pt"))
    monkeypatch.setattr(study.train_segment, "main", full_disk)
    real = study.files.write_text
    monkeypatch.setattr(study.files, "write_text", lambda path, text: real(path, text) if "failed" not in path
                        else (_ for _ in ()).throw(OSError(28, "No space left on device", path)))
    code = study.main(study.parse_args(["run", "--study", str(tmp_path), "--data", tiny_acdc, "--strategies", "none",
                                        "--fractions", "0.5,1", "--seeds", "0", "--", "--arch", "resnet18"]))
    out = capsys.readouterr().out
    assert code == 1 and len(trained) == 1 and "Traceback" not in out
    assert f"failed: [Errno 28] No space left on device: '{trained[0]}/best.pt'; its checkpoint.pt and log are " \
           f"kept; the study stops" in out and "stopped (a signal" not in out
    assert sorted(os.listdir(trained[0])) == ["checkpoint.pt", "log.jsonl", "output.log", "timing.json"]
