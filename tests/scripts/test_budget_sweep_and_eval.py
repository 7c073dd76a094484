"""run_budget_sweep.sh validation and the held-out accuracy tool (tools/eval_task_accuracy.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BUDGETS": "0.1 0", "METHODS": "tip"}, "ratio must be > 0 with mask 'tip'"),
        ({"METHODS": "pure_opd"}, "pure_opd has no budget"),
        ({"METHODS": "tip bogus"}, "unknown alias 'bogus'"),
        ({"BUDGETS": ""}, "BUDGETS is empty"),
    ],
)
def test_sweep_validates_every_budget_first(tmp_path, env, message):
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / "train" / "run_budget_sweep.sh")],
        env={**os.environ, **env, "OUTPUT_ROOT": str(tmp_path / "sweep")},
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "sweep").exists()


def test_eval_tool_scores_a_checkpoint(tmp_path, tiny_student_dir):
    from slime.embedded.evaluate import main, resolve_model_dir
    from slime.embedded.task import write_splits

    _, held_out = write_splits(tmp_path / "data", 4, 6, seed=0)
    out = tmp_path / "acc.json"
    assert (
        main(["--model", str(tiny_student_dir), "--data", str(held_out), "--out", str(out), "--max-new-tokens", "8"])
        == 0
    )
    record = json.loads(out.read_text())
    assert record["num_prompts"] == 6 and record["accuracy"] == 0.0  # a random model gets nothing right
    assert 1 <= record["mean_response_tokens"] <= 8
    # a --save directory resolves to its latest iter_*/model
    save = tmp_path / "ckpt"
    (save / "iter_0000003").mkdir(parents=True)
    (save / "iter_0000003" / "model").symlink_to(tiny_student_dir, target_is_directory=True)
    (save / "latest_checkpointed_iteration.txt").write_text("3\n")
    assert resolve_model_dir(save) == save / "iter_0000003" / "model"
    assert main(["--model", str(tmp_path), "--data", str(held_out)]) == 2
