"""train.py with --weight-update-mode distributed|tensor and --offload: weights reach the engine over a gloo
group, or as shared-memory tensors (the colocated path).

Real Ray, a real embedded engine and teacher server, the torch trainer. Each step the engine releases its
memory during training, resumes it (weights undefined) and receives the new weights (broadcast or shared); the
engine's log-probs of the next rollout then equal the trainer's own (``train/rollout_logp_abs_diff``), which
they would not if the push had failed. No weight directory is written.
"""

from __future__ import annotations

import math

import pytest

from slime.embedded.models import build_tiny_checkpoint
from slime.embedded.task import write_splits
from slime.utils.arguments import parse_args
from slime.utils.logging_utils import read_metrics
from tests.e2e.test_opd_end_to_end import load_train_module


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["distributed", "tensor"])
def test_pushed_updates_with_offload(tmp_path, ray_local, mode):
    student = build_tiny_checkpoint(tmp_path / "student", size="nano", seed=0)
    teacher = build_tiny_checkpoint(tmp_path / "teacher", size="nano", seed=1)
    train_jsonl, _ = write_splits(tmp_path / "data", num_train=32, num_eval=4, seed=0)
    out = tmp_path / "out"
    argv = [
        "--hf-checkpoint", str(student), "--prompt-data", str(train_jsonl),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--rollout-batch-size", "4", "--n-samples-per-prompt", "2", "--rollout-max-response-len", "8",
        "--rollout-num-engines", "1", "--num-rollout", "3",
        "--use-opd", "--opd-type", "sglang", "--opd-teacher-hf-checkpoint", str(teacher),
        "--micro-batch-size", "4", "--lr", "1e-2", "--output-dir", str(out),
        "--weight-update-mode", mode, "--update-weight-buffer-size", "65536", "--offload",
    ]  # fmt: skip
    train = load_train_module()
    train.train(parse_args(argv))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("rollout_id", -1) >= 0]
    assert [r["rollout_id"] for r in rows] == [0, 1, 2]
    diffs = [r["train/rollout_logp_abs_diff"] for r in rows]
    assert all(math.isfinite(d) and d < 1e-4 for d in diffs), diffs  # rollouts 1, 2 ran on pushed weights
    assert not (out / "weights").exists() or not any((out / "weights").iterdir())
