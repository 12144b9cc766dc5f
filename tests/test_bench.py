"""bench.py runs every mode on CPU at tiny sizes and reports both figures; structure, not speed."""
import json

import pytest

import bench


@pytest.mark.parametrize("mode", ["pretrain", "segment"])
def test_training_modes_report_ceiling_and_end_to_end(mode, tiny_acdc, capsys):
    result = bench.main(bench.parse_args([mode, "--data", tiny_acdc, "--device", "cpu", "--arch", "resnet18",
                                          "--size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1",
                                          "--workers", "1"]))
    out = capsys.readouterr().out
    assert "ceiling (data on device)" in out and "end to end" in out and "ratio" in out
    line = json.loads(out.strip().splitlines()[-1])  # the last line is one JSON record
    assert line == pytest.approx(result)
    assert line["mode"] == mode and line["device"] == "cpu" and line["batch_size"] == 4
    assert line["ceiling_images_per_s"] > 0 and line["end_to_end_images_per_s"] > 0
    assert line["ratio"] == pytest.approx(line["end_to_end_images_per_s"] / line["ceiling_images_per_s"])
    assert 0 <= line["host_data_wait_share"] < 1 and 0 < line["augment_share"] < 1


def test_evaluate_mode_reports_volumes_per_second(tiny_acdc, capsys):
    result = bench.main(bench.parse_args(["evaluate", "--data", tiny_acdc, "--device", "cpu", "--arch", "resnet18",
                                          "--batch-size", "4", "--steps", "2", "--warmup", "1"]))
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["mode"] == "evaluate" and line["volumes"] == 2 and line["volumes_per_s"] > 0
    assert line == pytest.approx(result)


def test_a_batch_larger_than_the_data_is_a_clear_error(tiny_acdc):
    with pytest.raises(SystemExit, match="--batch-size"):
        bench.main(bench.parse_args(["segment", "--data", tiny_acdc, "--device", "cpu", "--arch", "resnet18",
                                     "--batch-size", "100000", "--steps", "1"]))
