from __future__ import annotations

import json

from rtcontour.models.ablations import ROWS, seconds_per_step, table, train_command
from rtcontour.models.labels import ORGANS


def _results(mean: float) -> dict:
    per = {organ.roi_name: {"dice": mean, "hd95_mm": 5.0, "n_cases": 3} for organ in ORGANS}
    return {"per_structure": per, "mean_dice": mean}


def test_table_has_one_row_per_result_with_command_speed_and_means(tmp_path):
    baseline, shipped = ROWS[0], ROWS[2]
    for row, mean in ((shipped, 0.7), (baseline, 0.75)):
        (tmp_path / row.name).mkdir()
        (tmp_path / row.name / "validation.json").write_text(json.dumps(_results(mean)))
        (tmp_path / row.name / "train.json").write_text(json.dumps(_results(mean + 0.05)))
    (tmp_path / baseline.name / "train.log").write_text(
        "step 25/12600 loss 0.5 lr 1e-4 12.00 s/step (batch 0.1 s)\n"
        "step 50/12600 loss 0.5 lr 1e-4 14.00 s/step (batch 0.1 s)\n")
    text = table(tmp_path, steps=100, lr=3e-4)
    lines = text.splitlines()
    assert len(lines) == 4  # header, rule, two rows
    assert "--steps 12600 --lr 0.0003" in lines[2] and "| 13.0 |" in lines[2]
    assert "**0.750**" in lines[2] and "0.800 |" in lines[2]
    assert "rtcontour-hn-oar-1.2.0" in lines[3]


def test_train_command_warm_restarts_the_row_on_one_thread_in_float32(tmp_path):
    command = train_command(ROWS[1], tmp_path, 100, 3e-4, tmp_path / "data", tmp_path / "cache")
    assert command[1:3] == ["-m", "rtcontour.models.train"]
    for flag in ("--resume", "--restart-schedule", "--no-bf16", "--spatial-aug"):
        assert flag in command
    assert command[command.index("--threads") + 1] == "1"


def test_seconds_per_step_is_none_without_a_log(tmp_path):
    assert seconds_per_step(tmp_path / "missing.log") is None
