"""scripts/run_self_distillation.sh: input validation, and (slow) 2 PW-OPSD steps end to end.

The slow test runs the real stack at the tiniest size: the fast-test embedded assets, real Ray,
the embedded rollout server behind sglang-router, the torch trainer with a LoRA student whose
adapter-disabled base is the self-distillation teacher.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "scripts" / "run_self_distillation.sh"


def run_launcher(env_extra: dict[str, str], tmp_path: Path, timeout: float | None = None):
    env = {**os.environ, "OUTPUT_ROOT": str(tmp_path / "out"), **env_extra}
    return subprocess.run(["bash", str(LAUNCHER)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"METHOD": "grpo"}, "METHOD=grpo: expected one of: opsd pwopsd eopd reopold"),
        (
            {"METHOD": "opsd", "STUDENT_HF": "/nonexistent/student"},
            "STUDENT_HF=/nonexistent/student: no such directory",
        ),
        ({"METHOD": "opsd", "NUM_ROLLOUT": "two"}, "NUM_ROLLOUT=two: expected a non-negative integer"),
    ],
)
def test_launcher_rejects_bad_inputs(env, message, tmp_path):
    result = run_launcher(env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.slow
def test_launcher_two_pwopsd_steps(tmp_path):
    env = {
        "METHOD": "pwopsd",
        "EMBEDDED_RECIPE": "fast-test",
        "RUN_NAME": "pw",
        "NUM_ROLLOUT": "2",
        "ROLLOUT_BATCH_SIZE": "4",
        "N_SAMPLES_PER_PROMPT": "2",
        "ROLLOUT_MAX_RESPONSE_LEN": "16",
        "EVAL_INTERVAL": "0",
        "LORA_RANK": "4",
    }
    result = run_launcher(env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "out" / "pw"
    args = (run_dir / "train_args.txt").read_text().splitlines()
    assert "--self-distillation" in args and args[args.index("--loss-type") + 1] == "pwopsd"
    ready = json.loads((tmp_path / "out" / "pw_merged" / ".ready_for_eval").read_text())  # the release's eval flow
    assert ready["step"] == 2 and (tmp_path / "out" / "pw_merged" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 2
    for record in train:
        assert record["train/kept_tokens"] > 0
        assert 0.25 <= record["train/sd_position_weight_mean"] <= 1.0
        assert record["train/sd_teacher_rkl"] >= 0.0
