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

from slime.utils.arguments import parse_args
from slime.utils.logging_utils import read_metrics
from tests.e2e.test_opd_end_to_end import load_train_module
from tests.e2e.tiny_runs import opd_argv, tiny_pair


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["distributed", "tensor"])
def test_pushed_updates_with_offload(tmp_path, ray_local, mode):
    student, teacher, train_jsonl, _ = tiny_pair(tmp_path, num_train=32)
    argv = opd_argv(student, teacher, train_jsonl, tmp_path / "out", batch=4, n=2, max_len=8, num_rollout=3, extra=[
        "--rollout-num-engines", "1", "--micro-batch-size", "4", "--lr", "1e-2",
        "--weight-update-mode", mode, "--update-weight-buffer-size", "65536", "--offload",
    ])  # fmt: skip
    out = tmp_path / "out"
    train = load_train_module()
    train.train(parse_args(argv))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("rollout_id", -1) >= 0]
    assert [r["rollout_id"] for r in rows] == [0, 1, 2]
    diffs = [r["train/rollout_logp_abs_diff"] for r in rows]
    assert all(math.isfinite(d) and d < 1e-4 for d in diffs), diffs  # rollouts 1, 2 ran on pushed weights
    assert not (out / "weights").exists() or not any((out / "weights").iterdir())
